"""The outbox relay: send what was committed but never reached the broker."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone

from django_events.delivery import broker
from django_events.delivery.dispatch import accepted
from django_events.delivery.recording import event_of, mark_dispatched
from django_events.exceptions import NewerVersion, UpcastError
from django_events.logs import log_extra
from django_events.models import EventRecord
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.relay")


@dataclass(frozen=True)
class RelayResult:
    """One pass of the relay: events sent, events left pending, events no longer declared."""

    sent: int = 0
    unsent: int = 0
    undeclared: int = 0


def relay_pending(
    *, batch_size: int = 500, min_age: float = 0.0, using: str = DEFAULT_DB_ALIAS
) -> RelayResult:
    """Send one batch of pending records, oldest first, with publisher confirms.

    Rows are locked with ``FOR UPDATE SKIP LOCKED`` where the database has it, so several
    relays can run at once; each record is marked dispatched only once the broker took it.
    ``min_age`` (seconds) leaves fresh records to the publisher's own on-commit send.
    """
    registry = get_registry()
    cutoff = timezone.now() - timedelta(seconds=min_age)
    features = connections[using].features
    # Without row locks (SQLite) a transaction held while sending would only block the
    # workers' writes; there a single relay runs in autocommit.
    locking = features.has_select_for_update
    with transaction.atomic(using=using) if locking else nullcontext():
        pending = EventRecord.objects.using(using).filter(
            status=EventRecord.Status.PENDING, occurred_at__lte=cutoff
        )
        if locking:
            pending = pending.select_for_update(
                skip_locked=features.has_select_for_update_skip_locked
            )
        records = list(pending.order_by("occurred_at")[:batch_size])
        outgoing, nothing_to_send, undeclared = [], [], []
        for record in records:
            compiled = registry.events.get(record.name)
            if compiled is None:
                undeclared.append(record.pk)
                continue
            try:  # filters and typed payloads follow the declared version
                data = compiled.upgrade(record.payload, record.version)
            except NewerVersion as exc:  # a relay of the release before: a newer one sends it
                logger.warning("Left pending: %s", exc, extra=log_extra())
                continue
            except UpcastError as exc:
                # Sent as stored, to every async subscription: each worker records the failure.
                logger.error("%s (event %s)", exc, record.pk, extra=log_extra())
                outgoing.append(
                    (event_of(record), compiled.declaration.durable, list(compiled.async_))
                )
                continue
            subscriptions = accepted(compiled.async_, data)
            if not subscriptions:
                nothing_to_send.append(record.pk)
                continue
            event = event_of(record, compiled.typed_payload(data))
            outgoing.append((event, compiled.declaration.durable, subscriptions))
        unsent = broker.send_deliveries(outgoing, using, confirm=True) if outgoing else set()
        sent = [event.id for event, _, _ in outgoing if event.id not in unsent]
        mark_dispatched(using, sent + nothing_to_send)
        if undeclared:
            logger.error(
                "%d pending event(s) are no longer declared; marked failed",
                len(undeclared),
                extra=log_extra(),
            )
            EventRecord.objects.using(using).filter(pk__in=undeclared).update(
                status=EventRecord.Status.FAILED
            )
    return RelayResult(
        sent=len(sent) + len(nothing_to_send), unsent=len(unsent), undeclared=len(undeclared)
    )
