"""The outbox relay: send what was committed but never reached the broker (Celery), or the
task backend (``via: tasks`` on a backend that enqueues after commit)."""

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
        outgoing, via_tasks, nothing_to_send, undeclared = [], [], [], []
        tasks_committed: bool | None = None  # asked once a pass, only if tasks are wired
        for record in records:
            compiled = registry.events.get(record.name)
            if compiled is None:
                undeclared.append(record.pk)
                continue
            subscriptions = accepted(compiled.async_, record.payload)
            tasks = accepted(compiled.tasks, record.payload) if compiled.tasks else []
            if tasks and tasks_committed is None:
                tasks_committed = _tasks_in_transaction(using)
            if tasks_committed:
                tasks = []  # their task rows committed with the record
            if not subscriptions and not tasks:
                nothing_to_send.append(record.pk)
                continue
            event = event_of(record, compiled.typed_payload(record.payload))
            durable = compiled.declaration.durable
            if subscriptions:
                outgoing.append((event, durable, subscriptions))
            if tasks:
                via_tasks.append((event, durable, tasks))
        unsent = broker.send_deliveries(outgoing, using, confirm=True) if outgoing else set()
        if via_tasks:
            from django_events.delivery import tasks_backend

            # An event with both kinds stays pending until both took it: the next pass sends
            # both again (at least once).
            unsent |= tasks_backend.send_deliveries(via_tasks, using)
        sent = list({event.id for event, _, _ in [*outgoing, *via_tasks] if event.id not in unsent})
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


def _tasks_in_transaction(alias: str) -> bool:
    from django_events.delivery import tasks_backend

    return tasks_backend.enqueues_in_transaction(alias)


def requeue_lost_tasks(*, older_than: float) -> int:
    """Requeue ``via: tasks`` deliveries whose database-backend task has been running for
    more than ``older_than`` seconds (its ``db_worker`` was killed); the number requeued."""
    if not any(s.via == "tasks" for s in get_registry().subscriptions.values()):
        return 0
    from django_events.delivery import tasks_backend

    return len(tasks_backend.requeue_lost(older_than))
