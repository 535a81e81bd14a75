"""The outbox relay: send what was committed but never reached the broker (Celery), or the
task backend (``via: tasks`` on a backend that enqueues after commit)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from django.db import DatabaseError, connections, transaction
from django.db.models import Q
from django.utils import timezone

from django_events.delivery import broker, endpoints
from django_events.delivery.dispatch import accepted
from django_events.delivery.messages import PriorRuns
from django_events.delivery.recording import (
    event_log_alias,
    event_log_read_alias,
    event_of,
    mark_dispatched,
)
from django_events.exceptions import NewerVersion, UpcastError
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord
from django_events.operations.failing import record_failed
from django_events.operations.interrupted import record_interrupted
from django_events.operations.pausing import deliver_orphaned_held
from django_events.operations.redelivery import find_subscription, reaches
from django_events.operations.unfinished import ResendResult, resend_unfinished
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.relay")


@dataclass(frozen=True)
class RelayResult:
    """One pass of the relay: events sent, events left pending, events no longer declared."""

    sent: int = 0
    unsent: int = 0
    undeclared: int = 0
    retried: int = 0  # due retries a worker could not hand to the broker, sent now
    resent: int = 0  # async deliveries with no outcome long after dispatch, sent again
    checked: int = 0  # dispatched events checked for such deliveries
    newer: int = 0  # events of a version newer than declared here, left to a newer relay


def relay_pending(
    *,
    batch_size: int = 500,
    min_age: float = 0.0,
    using: str | None = None,
    resend_after: float | None = None,
) -> RelayResult:
    """Send one batch of pending records, oldest first, with publisher confirms; then one
    batch of due retries that a worker could not hand to the broker (`Delivery.retry_at`);
    then check one batch of events dispatched over ``resend_after`` seconds ago (default:
    `lost_messages.resend_after`) and send again their async deliveries that have no outcome.

    Rows are locked with ``FOR UPDATE SKIP LOCKED`` where the database has it, so several
    relays can run at once; each record is marked dispatched only once the broker took it.
    ``min_age`` (seconds) leaves fresh records to the publisher's own on-commit send.
    ``using``: the event log's alias (default: the one the routers write it to).
    """
    using = event_log_alias(using)
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
        newer = 0
        tasks_committed: bool | None = None  # asked once a pass, only if tasks are wired
        for record in records:
            compiled = registry.events.get(record.name)
            if compiled is None:
                undeclared.append(record.pk)
                continue
            try:  # filters and typed payloads follow the declared version
                data = compiled.upgrade(record.payload, record.version)
            except NewerVersion as exc:  # a relay of the release before: a newer one sends it
                logger.warning("Left pending: %s", exc, extra=log_extra())
                newer += 1
                continue
            except UpcastError as exc:
                # Sent as stored, to every async subscription: each worker records the failure.
                logger.error("%s (event %s)", exc, record.pk, extra=log_extra())
                hooks = [h for h in endpoints.for_event(record.name) if h.via != "tasks"]
                outgoing.append(
                    (event_of(record), compiled.declaration.durable, [*compiled.async_, *hooks])
                )
                continue
            hooks = list(endpoints.for_event(record.name))  # webhook endpoints (run time)
            subscriptions = accepted(compiled.async_, data)
            subscriptions += [h for h in hooks if h.via != "tasks"]
            tasks = accepted(compiled.tasks, data) if compiled.tasks else []
            tasks += [h for h in hooks if h.via == "tasks"]
            if tasks and tasks_committed is None:
                tasks_committed = _tasks_in_transaction(using)
            if tasks_committed:
                tasks = []  # their task rows committed with the record
            if not subscriptions and not tasks:
                nothing_to_send.append(record.pk)
                continue
            event = event_of(record, compiled.typed_payload(data))
            durable = compiled.declaration.durable
            if subscriptions:
                outgoing.append((event, durable, subscriptions))
            if tasks:
                via_tasks.append((event, durable, tasks))
        unsent = (
            broker.send_deliveries(outgoing, using, confirm=True, always_try=True).ids
            if outgoing
            else set()
        )
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
    retried, retries_unsent = _send_due_retries(batch_size, using)
    unsent_count = len(unsent) + retries_unsent
    orphans = deliver_orphaned_held(using=using)
    if orphans.sent or orphans.succeeded or orphans.failed or orphans.not_run or orphans.unsent:
        logger.warning(
            "Delivered the held deliveries of subscriptions no longer paused (held as a resume "
            "ran): %s",
            orphans.summary(),
            extra=log_extra(),
        )
    # The broker refused the sends above: deliveries resent now would be recorded failed.
    unfinished = (
        ResendResult()
        if unsent_count
        else resend_unfinished(older_than=resend_after, batch_size=batch_size, using=using)
    )
    return RelayResult(
        sent=len(sent) + len(nothing_to_send),
        unsent=unsent_count,
        undeclared=len(undeclared),
        retried=retried,
        resent=unfinished.total,
        checked=unfinished.checked,
        newer=newer,
    )


def relay_backlog(
    *,
    batch_size: int = 500,
    min_age: float = 0.0,
    using: str | None = None,
    resend_after: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> RelayResult:
    """Relay passes until the backlog is empty or the broker stops taking it; the totals.
    ``stop`` is asked after each pass (each its own transactions): true ends it there.

    Raises the `DatabaseError` of a database that cannot be reached (see `DatabaseOutage`).
    """
    using = event_log_alias(using)
    sent = retried = resent = checked = 0
    while True:
        result = relay_pending(
            batch_size=batch_size, min_age=min_age, using=using, resend_after=resend_after
        )
        sent += result.sent
        retried += result.retried
        resent += result.resent
        checked += result.checked
        # A full batch: there may be more. Records left for a newer release take batch slots
        # too, but a batch of nothing else would be read again and again.
        took = result.sent + result.undeclared
        more = (took and took + result.newer >= batch_size) or result.checked >= batch_size
        if result.unsent or not more or (stop is not None and stop()):
            return RelayResult(
                sent,
                result.unsent,
                result.undeclared,
                retried,
                resent=resent,
                checked=checked,
                newer=result.newer,
            )


def pending_of_newer_versions(until: datetime, using: str | None = None) -> int:
    """Records pending since ``until`` or before, of a version newer than this process
    declares: the relay leaves them to a relay of the newer release (a rolling deploy).
    ``using``: by default the alias the routers read the event log from."""
    newer = Q()
    for name, compiled in get_registry().events.items():
        newer |= Q(name=name, version__gt=compiled.version)
    if not newer:
        return 0
    pending = EventRecord.objects.using(event_log_read_alias(using)).filter(
        status=EventRecord.Status.PENDING, occurred_at__lte=until
    )
    return pending.filter(newer).count()


class DatabaseOutage:
    """A relay loop's database outage: logged once when it starts and once when it ends."""

    def __init__(self, using: str) -> None:
        self.using = using
        self.down = False

    def failed(self, exc: DatabaseError) -> None:
        """Note a failed pass: close the broken connection (the next pass opens a new one)."""
        try:
            connections[self.using].close()
        except DatabaseError:
            logger.debug(
                "Closing the broken database connection failed", exc_info=True, extra=log_extra()
            )
        if not self.down:
            logger.error(
                "Database %r unreachable; the relay keeps trying: %s",
                self.using,
                exc,
                exc_info=exc,
                extra=log_extra(),
            )
        self.down = True

    def passed(self) -> None:
        """Note a pass that reached the database."""
        if self.down:
            self.down = False
            logger.warning("Database %r reachable again", self.using, extra=log_extra())


def _send_due_retries(batch_size: int, using: str) -> tuple[int, int]:
    """Send the retries whose time has come; return how many were sent and left unsent.

    A sent row stays pending with no due time, touched now: should its message be lost too,
    the relay's check of pending rows untouched since sends it again (`operations.unfinished`).
    """
    registry = get_registry()
    features = connections[using].features
    locking = features.has_select_for_update
    read_at = timezone.now()
    with transaction.atomic(using=using) if locking else nullcontext():
        due = Delivery.objects.using(using).filter(
            status=Delivery.Status.PENDING, retry_at__lte=read_at
        )
        if locking:
            due = due.select_for_update(skip_locked=features.has_select_for_update_skip_locked)
        rows = list(
            due.order_by("retry_at").only(
                "pk", "event_id", "subscription", "attempts", "uncounted"
            )[:batch_size]
        )
        if not rows:
            return 0, 0
        records = EventRecord.objects.using(using).in_bulk([row.event_id for row in rows])
        outgoing: dict[str, list[broker.SendItem]] = {}  # by path: "celery" or "tasks"
        paths: dict[int, str] = {}
        prior: dict[tuple[UUID, str], PriorRuns] = {}
        gone: list[int] = []
        for row in rows:
            subscription = find_subscription(row.subscription, registry)
            record = records[row.event_id]
            compiled = registry.events.get(record.name)
            if subscription is None or compiled is None or not reaches(subscription, record.name):
                gone.append(row.pk)
                continue
            event = event_of(record, compiled.typed_payload(record.payload))
            paths[row.pk] = subscription.via
            item = (event, compiled.declaration.durable, [subscription])
            outgoing.setdefault(subscription.via, []).append(item)
            prior[(event.id, subscription.name)] = PriorRuns(row.attempts, row.uncounted)
        unsent = {path: _send_due(path, items, using, prior) for path, items in outgoing.items()}
        sent = [
            row.pk for row in rows if row.pk in paths and row.event_id not in unsent[paths[row.pk]]
        ]
        # Without row locks a worker may have written an outcome already (a new retry's due
        # time is later than this read): left as written.
        Delivery.objects.using(using).filter(
            pk__in=sent, status=Delivery.Status.PENDING, retry_at__lte=read_at
        ).update(retry_at=None, updated_at=timezone.now())
        if gone:
            logger.error(
                "%d due retr(y/ies) no longer reach their subscription; marked failed",
                len(gone),
                extra=log_extra(),
            )
            # As read: a worker may have written an outcome since (see above).
            still_due = Delivery.objects.using(using).filter(
                pk__in=gone, status=Delivery.Status.PENDING, retry_at__lte=read_at
            )
            record_failed(still_due, "Not retried: the event no longer reaches this subscription.")
    return len(sent), len(rows) - len(sent) - len(gone)


def _send_due(
    path: str,
    items: list[broker.SendItem],
    using: str,
    prior: dict[tuple[UUID, str], PriorRuns],
) -> set[UUID]:
    """Send due deliveries the way their subscriptions go (``via``); the event ids not sent
    (refused: an unconfirmed one counts as sent)."""
    if path == "tasks":
        from django_events.delivery import tasks_backend

        return tasks_backend.send_deliveries(items, using, prior_attempts=prior)
    unsent = broker.send_deliveries(
        items, using, confirm=True, always_try=True, prior_attempts=prior
    )
    # One sent with no confirm may be with the broker: no longer due, so the next pass does
    # not send it again unchecked; the check of lost messages (`operations.unfinished`)
    # sends it only if its queue does not hold it.
    return set(unsent.refused)


def _tasks_in_transaction(alias: str) -> bool:
    from django_events.delivery import tasks_backend

    return tasks_backend.enqueues_in_transaction(alias)


@dataclass(frozen=True)
class DeadRuns:
    """What `recover_dead_runs` found: ``via: tasks`` tasks requeued, sync runs failed."""

    requeued: int
    interrupted: int


def recover_dead_runs(*, older_than: float, using: str | None = None) -> DeadRuns:
    """Take deliveries running for over ``older_than`` seconds for dead, as each relay pass
    does first (``events_relay`` and the ``django_events.relay`` task alike): requeue the
    ``via: tasks`` ones (`requeue_lost_tasks`), record the sync ones failed
    (`interrupted.record_interrupted`) on ``using`` (default: where the routers write the
    event log)."""
    return DeadRuns(
        requeued=requeue_lost_tasks(older_than=older_than),
        interrupted=record_interrupted(older_than=older_than, using=event_log_alias(using)),
    )


def requeue_lost_tasks(*, older_than: float) -> int:
    """Requeue ``via: tasks`` deliveries whose database-backend task has been running for
    more than ``older_than`` seconds (its ``db_worker`` was killed); the number requeued."""
    if not any(s.via == "tasks" for s in get_registry().subscriptions.values()):
        return 0
    from django_events.delivery import tasks_backend

    return len(tasks_backend.requeue_lost(older_than))
