"""Writing delivery outcomes (and, with RECORD='failures', the record they need)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from datetime import datetime
from functools import reduce
from typing import Any
from uuid import UUID

from django.db import connections, router, transaction
from django.db.models import Q
from django.utils import timezone

from django_events.delivery import postgresql
from django_events.events import Event
from django_events.models import Delivery, EventRecord
from django_events.wiring.validation import storable_text

#: Statuses after which a delivery is done: nothing runs it again but a retry or replay.
FINISHED = (Delivery.Status.SUCCEEDED, Delivery.Status.RESOLVED)


def event_log_alias(using: str | None = None) -> str:
    """``using``, else the database alias the routers write the event log to (``default``
    without routers): where `publish()` records events by default."""
    return using or router.db_for_write(EventRecord)


def event_log_read_alias(using: str | None = None) -> str:
    """``using``, else the database alias the routers read the event log from (``default``
    without routers): where a QuerySet of it reads by default."""
    return using or router.db_for_read(EventRecord)


def record_for(event: Event, status: str) -> EventRecord:
    """Build (without saving) the `EventRecord` of ``event``."""
    return EventRecord(
        id=event.id,
        name=event.name,
        payload=event.data,
        version=event.version,
        headers=event.headers,
        occurred_at=event.occurred_at,
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        status=status,
    )


def insert_records(alias: str, records: Sequence[tuple[Event, str]]) -> None:
    """Insert the records of new (event, status) pairs in one statement."""
    connection = connections[alias]
    if connection.vendor == "postgresql":
        postgresql.insert_records(connection, records)
    else:
        EventRecord.objects.using(alias).bulk_create([record_for(e, s) for e, s in records])


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
        version=record.version,
    )


def ensure_records(alias: str, events: Sequence[Event], status: str) -> None:
    """Insert records for events that have none yet (existing ones are left alone)."""
    EventRecord.objects.using(alias).bulk_create(
        [record_for(e, status) for e in events], ignore_conflicts=True
    )


def mark_dispatched(alias: str, ids: Sequence[UUID]) -> None:
    """Mark the records of ``ids`` dispatched, now (no signals, as `QuerySet.update`)."""
    if not ids:
        return
    connection = connections[alias]
    now = timezone.now()
    with transaction.mark_for_rollback_on_error(alias):
        if connection.vendor == "postgresql":
            postgresql.mark_dispatched(connection, ids, now)
        else:
            EventRecord.objects.using(alias).filter(pk__in=ids).update(
                status=EventRecord.Status.DISPATCHED, dispatched_at=now
            )


def clear_due(alias: str, rows: Sequence[tuple[int, datetime]]) -> None:
    """Clear the relay due time of the `Delivery` rows (id, ``retry_at``) still due then:
    handed-on deliveries whose messages the broker took (a row changed since keeps its own)."""
    for start in range(0, len(rows), 500):  # a bounded statement
        chunk = rows[start : start + 500]
        due = reduce(operator.or_, (Q(pk=pk, retry_at=at) for pk, at in chunk))
        Delivery.objects.using(alias).filter(due).update(retry_at=None)


def save_deliveries(alias: str, deliveries: Sequence[Delivery]) -> None:
    """Insert or update deliveries, keyed by (event, subscription)."""
    connection = connections[alias]
    if len(deliveries) == 1 and connection.vendor == "postgresql":
        postgresql.upsert_delivery(connection, deliveries[0])
        return
    Delivery.objects.using(alias).bulk_create(
        deliveries,
        update_conflicts=True,
        unique_fields=["event", "subscription"],
        update_fields=list(postgresql.OUTCOME_FIELDS),
    )


def save_unless_finished(alias: str, row: Delivery) -> bool:
    """Insert ``row``, or write its outcome over its (event, subscription) row unless that one
    succeeded or was resolved (`FINISHED`); return whether it was written."""
    Delivery.objects.using(alias).bulk_create([row], ignore_conflicts=True)
    unfinished = Delivery.objects.using(alias).filter(
        event_id=row.event_id, subscription=row.subscription
    )
    outcome = {name: getattr(row, name) for name in postgresql.OUTCOME_FIELDS}
    return bool(unfinished.exclude(status__in=FINISHED).update(**outcome))


def delivery(
    event_id: UUID,
    subscription: str,
    mode: str,
    status: str,
    attempts: int,
    error: str = "",
    traceback: str = "",
    duration_ms: float | None = None,
    response: Any = None,
    uncounted: int = 0,
) -> Delivery:
    """Build (without saving) one `Delivery` row.

    ``duration_ms``: the handler's run time; ``response``: a webhook's answer;
    ``uncounted``: of the ``attempts``, the runs that raised ``RetryLater(counts=False)``.
    """
    now = timezone.now()
    row = Delivery(
        event_id=event_id,
        subscription=subscription,
        mode=mode,
        status=status,
        attempts=attempts,
        uncounted=uncounted,
        last_error=storable(error),
        traceback=storable(traceback),
        created_at=now,
        updated_at=now,
        duration_ms=duration_ms,
    )
    if response is not None:
        row.response_status = response.status
        row.response_ms = response.milliseconds
        row.response_body = storable(response.body)
    return row


def storable(text: str) -> str:
    """``text`` that every database stores: NUL and lone surrogates written as escapes.

    Handler errors quote what they like (a payload's bytes, a file name), and PostgreSQL
    refuses NUL in text columns.
    """
    if storable_text(text):
        return text
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped.replace("\x00", "\\x00")
