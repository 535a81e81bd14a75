"""Async deliveries that never finished: sent again by the relay, at least once.

A message the broker took can still vanish before any worker records an outcome: kombu's
Redis transport removes a message from its list (``BRPOP``) before the consumer notes it as
unacknowledged, so a worker killed between the two takes the message with it, and nothing
hands it out again (docs/reliability.md). The event is ``dispatched`` and its delivery has
no `Delivery` row, for good.

`resend_unfinished` finds such deliveries and sends them again through the redelivery path
of retries and replays. For each queue it walks the events dispatched longer ago than the
threshold (`resend_after`), in dispatch order, from where its last pass stopped (a
`RelayCheckpoint` row per queue, locked while it works, so that two relays never resend the
same delivery); each pass reads at most one batch, through an index on the dispatch time.
A delivery counts as unfinished when its event records every outcome (``RECORD = "all"``),
the subscription is sent by a Celery worker (``async`` or ``webhook``, not broadcast), its
filter accepts the payload, the relay had seen the subscription wired before the event was
dispatched, and no `Delivery` row exists: not even a pending, held, running or failed one
(retries, pauses and ordered keys each write theirs, and keep their own way of sending them).
The webhook endpoints registered at run time count as wired from their last change (created,
enabled again, edited) plus the time publishers may keep the list they read
(`endpoints.wired_since`); those enabled when the relay looks are checked.

A delivery whose message went out with its row already `pending` is not "without a row"
either: an ordered subscription's (its row is written at publish, numbered: its key waits
behind it for good), and any delivery sent again by a retry, a replay, a resume or the
relay's due retries. The relay sends again such a delivery that is still pending with no
due time, its event dispatched and the row untouched for longer than the threshold
(`_lost_pending`): no worker took it (a worker that holds it back, runs it or fails it
writes the row). Of an ordered key only the first unfinished delivery: the later ones have
no message yet and follow through the gate, each in turn.

A worker can hold a message the relay takes for lost (prefetched or unacknowledged messages
are not in the queue's count) and write its outcome while the relay works. The relay sends
only what is still as it read it: a lost pending delivery still pending, with no due time
and untouched (one conditional ``UPDATE`` claims it, `_resend_pending`), a delivery with no
row still without one (an insert that keeps an existing row, `_resend_absent`). It never
writes a status a worker wrote; a row a worker wrote meanwhile is left alone and not sent.

A backlog is never resent: while the queue holds messages waiting for a consumer, the walk
of that queue stops at its first unfinished delivery and waits for the queue to drain; on a
broker with a visibility timeout (Redis), until it has been seen empty for longer than that
timeout, so that a dead worker's unacknowledged messages are back (`_Drained`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from django_events.delivery import endpoints, ordering
from django_events.delivery.broker import waiting_messages
from django_events.delivery.dispatch import accepted
from django_events.delivery.lost_messages import resend_after, visibility_timeout
from django_events.delivery.messages import PriorRuns
from django_events.delivery.ordering import HAND_ON_GRACE
from django_events.delivery.recording import delivery, event_log_alias
from django_events.exceptions import NewerVersion, UpcastError
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord, RelayCheckpoint
from django_events.operations.failing import record_failed
from django_events.operations.redelivery import NOT_SENT, send_claimed
from django_events.wiring.compiled import Registry, Subscription
from django_events.wiring.registry import get_registry

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("django_events.relay")

CHECKPOINT = "unfinished-deliveries"
#: Seconds, beyond the visibility timeout, for a dead worker's messages to be given back and
#: handled again (kombu's Redis transport restores them every 10 s).
DRAIN_MARGIN = 30.0
#: Seconds between two notes that a queue was seen empty (bounds `RelayCheckpoint.drained`).
DRAIN_NOTE_EVERY = 15.0


@dataclass
class ResendResult:
    """One pass: events checked, deliveries sent again per subscription, and those unsent."""

    checked: int = 0
    resent: dict[str, int] = field(default_factory=dict)
    unsent: int = 0
    busy: bool = False  # another relay holds the checkpoint

    @property
    def total(self) -> int:
        return sum(self.resent.values())


def resend_unfinished(
    *,
    older_than: float | None = None,
    batch_size: int = 500,
    using: str | None = None,
) -> ResendResult:
    """Check one batch of events per queue dispatched over ``older_than`` seconds ago (default
    `resend_after`), and send again their async deliveries that have no outcome.
    ``using``: the event log's alias (default: the one the routers write it to)."""
    using = event_log_alias(using)
    threshold = resend_after() if older_than is None else older_than
    registry = get_registry()
    # Where publishers, the relay's sends and workers read them (the routers' alias), whatever
    # the event log's: the endpoints its events were sent to.
    hooks = [h for h in endpoints.enabled() if h.via != "tasks"]
    queues = sorted(
        {s.queue for e in registry.events.values() for s in e.async_} | {h.queue for h in hooks}
    )
    result = ResendResult()
    for queue in queues:
        queue_hooks = [h for h in hooks if h.queue == queue]
        _resend_queue(queue, threshold, batch_size, using, registry, queue_hooks, result)
    if result.total or result.unsent:
        logger.warning(
            # What is known is that no outcome was recorded: the message may be lost, or a
            # worker killed before it wrote a batched success (the handler ran: it runs again).
            "Resent %d async deliveries with no outcome recorded %gs after their event was "
            "dispatched (their message lost, or a worker killed before it wrote their outcome; "
            "see docs/reliability.md, Deliveries with no outcome): %s%s",
            result.total,
            threshold,
            ", ".join(f"{name} x{count}" for name, count in sorted(result.resent.items())),
            f"; {result.unsent} not sent (recorded failed)" if result.unsent else "",
            extra=log_extra(),
        )
    return result


def _resend_queue(
    queue: str,
    threshold: float,
    batch_size: int,
    using: str,
    registry: Registry,
    hooks: Sequence[endpoints.EndpointSubscription],
    result: ResendResult,
) -> None:
    """One batch of ``queue``'s walk (``hooks``: its enabled endpoints); adds what it did
    to ``result``."""
    now = timezone.now()
    horizon = now - timedelta(seconds=threshold)
    locking = connections[using].features.has_select_for_update
    # Without row locks (SQLite) one relay runs, in autocommit (as the outbox relay does).
    with transaction.atomic(using=using) if locking else nullcontext():
        # A first pass looks back one threshold: events dispatched before are not checked.
        name = f"{CHECKPOINT}:{queue}"
        checkpoint = _checkpoint(using, name, horizon - timedelta(seconds=threshold), locking)
        if checkpoint is None:
            result.busy = True
            return
        before = (checkpoint.subscriptions, checkpoint.drained)
        since = _wired_since(checkpoint, registry, queue, now)
        since.update((h.name, endpoints.wired_since(h)) for h in hooks)
        after = Q(dispatched_at__gt=checkpoint.dispatched_at)
        if checkpoint.event_id is not None:
            after |= Q(dispatched_at=checkpoint.dispatched_at, pk__gt=checkpoint.event_id)
        records = list(
            EventRecord.objects.using(using)
            .filter(after, status=EventRecord.Status.DISPATCHED, dispatched_at__lte=horizon)
            .order_by("dispatched_at", "pk")[:batch_size]
        )
        cutoff = _Drained(checkpoint, queue, now, drain_settle())
        unfinished, checked = _unfinished(records, registry, hooks, queue, since, using, cutoff)
        result.checked += checked
        subscriptions: dict[str, Subscription] = {
            **registry.subscriptions,
            **{h.name: h for h in hooks},
        }
        for subscription_name, lost in _lost_pending(
            queue, registry, hooks, horizon, batch_size, using, cutoff
        ).items():
            sent = _resend_pending(subscriptions[subscription_name], lost, horizon, using)
            result.resent[subscription_name] = result.resent.get(subscription_name, 0) + sent
        again = now + timedelta(seconds=threshold)
        for subscription_name, waiting in unfinished.items():
            sent, unsent = _resend_absent(subscriptions[subscription_name], waiting, again, using)
            result.resent[subscription_name] = result.resent.get(subscription_name, 0) + sent
            result.unsent += unsent
        if checked:
            last = records[checked - 1]
            assert last.dispatched_at is not None  # filtered on it
            checkpoint.dispatched_at, checkpoint.event_id = last.dispatched_at, last.pk
        # Written only when it moved: a pass with nothing to check writes nothing.
        if checked or (checkpoint.subscriptions, checkpoint.drained) != before:
            checkpoint.updated_at = now
            checkpoint.save(using=using)


def drain_settle(app: Celery | None = None) -> float:
    """Seconds a queue must have been seen empty before the deliveries of events dispatched
    until then may count as lost: a dead worker's unacknowledged messages come back only
    after the broker's visibility timeout (kombu's Redis transport restores them every 10 s
    after it); 0 for brokers that give them back at once (RabbitMQ)."""
    timeout = visibility_timeout(app)
    return timeout + DRAIN_MARGIN if timeout else 0.0


class _Drained:
    """The latest time ``queue`` was seen empty at least ``settle`` seconds ago: every message
    sent before then had been taken by a worker, and had time to come back had the worker
    died. Asks the broker at most once (the first call), and notes what it saw on the
    checkpoint (``RelayCheckpoint.drained``, newest last)."""

    def __init__(
        self, checkpoint: RelayCheckpoint, queue: str, now: datetime, settle: float
    ) -> None:
        self.checkpoint, self.queue, self.now, self.settle = checkpoint, queue, now, settle
        self.asked = False
        self.cutoff: datetime | None = None

    def __call__(self) -> datetime | None:
        if self.asked:
            return self.cutoff
        self.asked = True
        waiting = waiting_messages(self.queue)
        if waiting != 0:
            # Messages wait (a backlog), or the broker cannot say: nothing is resent now.
            logger.info(
                "Unfinished deliveries of queue %r wait: %s message(s) in the queue",
                self.queue,
                "unknown" if waiting is None else waiting,
                extra=log_extra(),
            )
            return None
        seen = [datetime.fromisoformat(t) for t in self.checkpoint.drained]
        settled = [t for t in [*seen, self.now] if (self.now - t).total_seconds() >= self.settle]
        self.cutoff = settled[-1] if settled else None
        if not seen or (self.now - seen[-1]).total_seconds() >= DRAIN_NOTE_EVERY:
            seen.append(self.now)
        kept = [t for t in seen if self.cutoff is None or t >= self.cutoff]
        self.checkpoint.drained = [t.isoformat() for t in kept]
        return self.cutoff


def _checkpoint(using: str, name: str, start: datetime, locking: bool) -> RelayCheckpoint | None:
    """The checkpoint row ``name``, locked (created at ``start``); None if another relay
    holds it."""
    features = connections[using].features
    rows = RelayCheckpoint.objects.using(using).filter(name=name)
    if locking:
        rows = rows.select_for_update(skip_locked=features.has_select_for_update_skip_locked)
    checkpoint = rows.first()
    if checkpoint is None:
        if RelayCheckpoint.objects.using(using).filter(name=name).exists():
            return None
        RelayCheckpoint.objects.using(using).bulk_create(
            [RelayCheckpoint(name=name, dispatched_at=start, subscriptions={})],
            ignore_conflicts=True,
        )
        checkpoint = rows.first()
        if checkpoint is not None and not checkpoint.subscriptions:
            # The first pass takes today's wiring as the wiring of the window it looks back on.
            checkpoint.subscriptions = {"*": start.isoformat()}
    return checkpoint


def _wired_since(
    checkpoint: RelayCheckpoint, registry: Registry, queue: str, now: datetime
) -> dict[str, datetime]:
    """When the relay first saw each async subscription of ``queue`` wired (new ones: now),
    noted on ``checkpoint``; events dispatched before that were not sent to it."""
    seen: dict[str, str] = dict(checkpoint.subscriptions)
    first = seen.pop("*", None)
    for subscription in registry.subscriptions.values():
        if subscription.queue == queue and subscription.name not in seen:
            seen[subscription.name] = first or now.isoformat()
    checkpoint.subscriptions = seen
    return {name: datetime.fromisoformat(when) for name, when in seen.items()}


def _lost_pending(
    queue: str,
    registry: Registry,
    hooks: Sequence[endpoints.EndpointSubscription],
    horizon: datetime,
    batch_size: int,
    using: str,
    drained: Callable[[], datetime | None],
) -> dict[str, list[Delivery]]:
    """The pending deliveries of ``queue`` whose message is lost, by subscription: with no due
    time, the row untouched and its event dispatched before ``horizon``, sent before the
    queue was last seen drained (see `_Drained`); of an ordered key, only its first
    unfinished delivery. Not a broadcast's (a copy per worker: no one outcome)."""
    names = [
        s.name
        for s in registry.subscriptions.values()
        if s.queue == queue and s.is_queued and s.via == "celery" and not s.declaration.broadcast
    ]
    names += [h.name for h in hooks]
    if not names:
        return {}
    untouched = Delivery.objects.using(using).filter(
        subscription__in=names,
        status=Delivery.Status.PENDING,
        retry_at__isnull=True,
        updated_at__lte=horizon,
    )
    # Of an ordered key, its first unfinished delivery, read as the gate reads it, once a key:
    # checking each pending row against those before it cost a pass a read a row of a key's
    # backlog, and on SQLite a walk through the key's history a row (11 s a pass at 20,000
    # behind 2,000 succeeded: docs/performance-log.md).
    heads = ordering.first_unfinished_of(using, untouched.filter(sequence__isnull=False))
    lost_rows = list(
        untouched.filter(
            event__status=EventRecord.Status.DISPATCHED,
            event__dispatched_at__lte=horizon,
        )
        .filter(Q(sequence__isnull=True) | Q(pk__in=heads))  # unordered, or its key's first
        .select_related("event")
        .order_by("updated_at")[:batch_size]
    )
    if not lost_rows:
        return {}
    cutoff = drained()
    lost: dict[str, list[Delivery]] = {}
    for row in lost_rows:
        dispatched = row.event.dispatched_at
        assert dispatched is not None  # filtered on it
        if cutoff is not None and max(row.updated_at, dispatched) <= cutoff:
            lost.setdefault(row.subscription, []).append(row)
    return lost


def _unfinished(
    records: list[EventRecord],
    registry: Registry,
    hooks: Sequence[endpoints.EndpointSubscription],
    queue: str,
    since: Mapping[str, datetime],
    using: str,
    drained: Callable[[], datetime | None],
) -> tuple[dict[str, list[EventRecord]], int]:
    """The records of each subscription of ``queue`` whose delivery has no outcome, and how
    many of ``records`` were checked: the batch stops before a record whose check has to
    wait (its message may still be in the queue or with a worker, see `_Drained`; a version
    newer than this process)."""
    if not records:
        return {}, 0
    have = set(
        Delivery.objects.using(using)
        .filter(event_id__in=[r.pk for r in records])
        .values_list("event_id", "subscription")
    )
    unfinished: dict[str, list[EventRecord]] = {}
    for checked, record in enumerate(records):
        compiled = registry.events.get(record.name)
        if compiled is None or not compiled.records_all:
            continue  # undeclared now, or its successes leave no row to look for
        subscriptions: list[Subscription]
        try:
            data = compiled.upgrade(record.payload, record.version)
        except NewerVersion as exc:
            # Its filters are unknown here: left to a relay of the release that sent it.
            logger.warning("Unfinished deliveries not checked: %s", exc, extra=log_extra())
            return unfinished, checked
        except UpcastError:
            subscriptions = list(compiled.async_)  # sent as stored: the worker records it
        else:
            subscriptions = accepted(compiled.async_, data)
        subscriptions += [h for h in hooks if h.receives(record.name)]
        assert record.dispatched_at is not None  # filtered on it
        missing = [
            subscription
            for subscription in subscriptions
            if subscription.queue == queue
            and not subscription.declaration.broadcast  # a copy per worker: no one outcome
            and (record.pk, subscription.name) not in have
            and record.dispatched_at >= since[subscription.name]
        ]
        if missing:
            cutoff = drained()
            if cutoff is None or record.dispatched_at > cutoff:
                return unfinished, checked  # come back once the queue drained and settled
        for subscription in missing:
            unfinished.setdefault(subscription.name, []).append(record)
    return unfinished, len(records)


def _resend_pending(
    subscription: Subscription, lost: Sequence[Delivery], horizon: datetime, using: str
) -> int:
    """Send again the lost pending deliveries ``lost`` (`_lost_pending`) that no worker wrote
    since they were read; how many are to be sent (once the pass commits).

    A worker can hold a message the queue's count leaves out (prefetched, unacknowledged)
    and finish it after the read: a delivery is claimed only if its row is still as read
    (pending, no due time, untouched since ``horizon``), in one conditional ``UPDATE`` that
    makes it due for the relay's retries in `HAND_ON_GRACE` seconds (should this process
    not send it); the send clears that. Its status is never written.
    """
    now = timezone.now()
    due = now + timedelta(seconds=HAND_ON_GRACE)
    rows = Delivery.objects.using(using).filter(pk__in=[d.pk for d in lost])
    rows.filter(
        status=Delivery.Status.PENDING, retry_at__isnull=True, updated_at__lte=horizon
    ).update(retry_at=due, updated_at=now)
    # ``due`` marks this pass's claim (a worker's outcome clears `retry_at`).
    claimed = set(
        rows.filter(status=Delivery.Status.PENDING, retry_at=due).values_list("pk", flat=True)
    )
    _note_left_alone(subscription, len(lost) - len(claimed))
    lost = [d for d in lost if d.pk in claimed]
    if not lost:
        return 0

    def send() -> None:
        records = [d.event for d in lost]
        # Unconfirmed or refused, a message stays due for the relay's retries.
        unsent = send_claimed(
            subscription,
            records,
            {d.event_id: PriorRuns(d.attempts, d.uncounted) for d in lost},
            using=using,
        ).ids
        sent = [d.pk for d in lost if d.event_id not in unsent]
        Delivery.objects.using(using).filter(pk__in=sent, retry_at=due).update(retry_at=None)
        if unsent:
            logger.warning(
                "The broker did not take %d lost delivery(ies) sent again; the relay's "
                "retries send them",
                len(unsent),
                extra=log_extra(None, subscription.name),
            )

    # Sent once the pass commits (with its claim), as a hand-on is.
    transaction.on_commit(send, using=using)
    return len(lost)


def _resend_absent(
    subscription: Subscription, records: Sequence[EventRecord], again: datetime, using: str
) -> tuple[int, int]:
    """Send again the deliveries of ``records`` that still have no `Delivery` row; how many
    were sent and not sent.

    A row is inserted only where none exists (a worker may have written one since the read),
    pending and due for the relay's retries at ``again`` should this message be lost too
    (any outcome a worker writes clears it); only the rows this inserted are sent. Those the
    broker refused are recorded failed, unless a worker wrote the row meanwhile; one sent
    with no confirm is left as inserted (the broker may hold it)."""
    mode = subscription.mode
    rows = []
    for record in records:
        row = delivery(record.pk, subscription.name, mode, Delivery.Status.PENDING, 0)
        row.retry_at = again
        rows.append(row)
    Delivery.objects.using(using).bulk_create(rows, ignore_conflicts=True)
    mine = Delivery.objects.using(using).filter(
        event_id__in=[r.pk for r in records],
        subscription=subscription.name,
        status=Delivery.Status.PENDING,
        retry_at=again,
    )
    claimed = set(mine.values_list("event_id", flat=True))
    _note_left_alone(subscription, len(records) - len(claimed))
    records = [r for r in records if r.pk in claimed]
    if not records:
        return 0, 0
    # One sent with no confirm stays pending and due at ``again``: the broker may hold it.
    unsent = send_claimed(subscription, records, {}, using=using).refused
    if unsent:
        record_failed(mine.filter(event_id__in=unsent), NOT_SENT)
    return len(records) - len(unsent), len(unsent)


def _note_left_alone(subscription: Subscription, count: int) -> None:
    if count:
        logger.info(
            "%d delivery(ies) taken for lost not sent again: a worker wrote them meanwhile",
            count,
            extra=log_extra(None, subscription.name),
        )
