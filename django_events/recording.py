"""Writing delivery outcomes (and, with RECORD='failures', the record they need)."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from django.utils import timezone

from .events import Event
from .models import Delivery, EventRecord

UPSERT_FIELDS = ["mode", "status", "attempts", "last_error", "traceback", "updated_at"]


def record_for(event: Event, status: str) -> EventRecord:
    """Build (without saving) the `EventRecord` of ``event``."""
    return EventRecord(
        id=event.id,
        name=event.name,
        payload=event.data,
        headers=event.headers,
        occurred_at=event.occurred_at,
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        status=status,
    )


def event_of(record: EventRecord, payload: object = None) -> Event:
    """Rebuild the `Event` a stored record holds (``payload``: the typed form, if any)."""
    return Event(
        id=record.pk,
        name=record.name,
        payload=record.payload if payload is None else payload,
        headers=record.headers,
        occurred_at=record.occurred_at,
        correlation_id=record.correlation_id,
        causation_id=record.causation_id,
        data=record.payload,
    )


def ensure_records(alias: str, events: Sequence[Event], status: str) -> None:
    """Insert records for events that have none yet (existing ones are left alone)."""
    EventRecord.objects.using(alias).bulk_create(
        [record_for(e, status) for e in events], ignore_conflicts=True
    )


def save_deliveries(alias: str, deliveries: Sequence[Delivery]) -> None:
    """Insert or update deliveries, keyed by (event, subscription)."""
    Delivery.objects.using(alias).bulk_create(
        deliveries,
        update_conflicts=True,
        unique_fields=["event", "subscription"],
        update_fields=UPSERT_FIELDS,
    )


def delivery(
    event_id: UUID,
    subscription: str,
    mode: str,
    status: str,
    attempts: int,
    error: str = "",
    traceback: str = "",
) -> Delivery:
    """Build (without saving) one `Delivery` row."""
    now = timezone.now()
    return Delivery(
        event_id=event_id,
        subscription=subscription,
        mode=mode,
        status=status,
        attempts=attempts,
        last_error=error,
        traceback=traceback,
        created_at=now,
        updated_at=now,
    )
