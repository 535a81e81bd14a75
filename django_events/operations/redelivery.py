"""Delivering stored events again to one subscription: the path retries and replays share.

Async subscriptions get a new task message through the normal broker path, carrying the
runs already recorded (``prior_attempts``: `PriorRuns`), so ``Delivery.attempts`` never
resets and ``RetryLater(counts=False)`` runs stay uncounted; sync ones
run in this process. Either way the ``Delivery`` row records it: pending/running first,
then succeeded or failed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from difflib import get_close_matches
from itertools import islice
from typing import TypeVar
from uuid import UUID

from django.db import connections, transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from django_events.delivery import broker, endpoints, ordering
from django_events.delivery.dispatch import failed_signal, run_sync_handler
from django_events.delivery.messages import NO_RUNS, PriorRuns
from django_events.delivery.pausing import paused_names
from django_events.delivery.recording import delivery, event_of, save_deliveries
from django_events.exceptions import NewerVersion, UpcastError
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord
from django_events.operations.failing import record_failed
from django_events.wiring.compiled import CompiledEvent, Registry, Subscription
from django_events.wiring.redaction import redact_text
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.redelivery")
T = TypeVar("T")
NOT_SENT = "Not sent again: the broker was unreachable; retry later."
GONE = "its record was deleted meanwhile (events_prune)"


@dataclass
class RedeliveryResult:
    """What a retry or replay did; ``skipped`` says why each skipped item was left alone."""

    sent: int = 0
    # Sync deliveries run in this process: their handler ran and succeeded, ran and failed,
    # or could not run (recorded failed with the reason: a newer event version, a failed
    # upcast, a payload the schema now refuses, a handler that does not import).
    succeeded: int = 0
    failed: int = 0
    not_run: int = 0
    unsent: int = 0
    # Left pending for events_relay: sent with no confirm (the broker may hold them), or an
    # ordered subscription's the broker did not take (due for the relay's retries).
    to_relay: int = 0
    held: int = 0  # sync ones of a paused subscription: events_resume runs them
    # An ordered subscription's, sent when the caller's transaction commits (the admin's,
    # under ATOMIC_REQUESTS): not sent yet when this result was read.
    at_commit: int = 0
    skipped: list[str] = field(default_factory=list)
    # Failures of disabled webhook endpoints left failed, by endpoint subscription name: each
    # attempt would fail without a call (enable the endpoint, then retry them).
    disabled: Counter[str] = field(default_factory=Counter)

    def add(self, other: RedeliveryResult) -> None:
        self.sent += other.sent
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.not_run += other.not_run
        self.unsent += other.unsent
        self.to_relay += other.to_relay
        self.held += other.held
        self.at_commit += other.at_commit
        self.skipped.extend(other.skipped)
        self.disabled.update(other.disabled)

    @property
    def ok(self) -> bool:
        return not (
            self.failed
            or self.not_run
            or self.unsent
            or self.to_relay
            or self.skipped
            or self.disabled
        )

    @property
    def anything_done(self) -> bool:
        """Whether a delivery was sent, run, held or left for the relay or the commit."""
        return bool(
            self.sent
            or self.succeeded
            or self.failed
            or self.not_run
            or self.to_relay
            or self.held
            or self.at_commit
        )

    def summary(self) -> str:
        parts = [
            f"{self.sent} re-enqueued for a worker",
            f"{self.succeeded} ran and succeeded",
            f"{self.failed} ran and failed",
        ]
        if self.not_run:
            parts.append(f"{self.not_run} not run (recorded failed with the reason)")
        if self.unsent:
            parts.append(f"{self.unsent} not sent (broker unreachable)")
        if self.to_relay:
            parts.append(
                f"{self.to_relay} left pending for events_relay (the broker did not confirm or "
                "take them; do not retry them)"
            )
        if self.held:
            parts.append(f"{self.held} held (the subscription is paused: events_resume runs them)")
        if self.at_commit:
            parts.append(
                f"{self.at_commit} to be sent when the current transaction commits (ordered; "
                "events_relay sends any the broker does not take)"
            )
        for name, count in sorted(self.disabled.items()):
            endpoint = name.removeprefix(endpoints.PREFIX)
            parts.append(f"{count} left failed: endpoint {endpoint} is disabled; enable it first")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return "; ".join(parts) + "."


def redeliver(
    subscription: Subscription,
    records: Sequence[EventRecord],
    prior_attempts: Mapping[UUID, PriorRuns],
    *,
    using: str,
    claim_from: str | None = None,
    lock_records: bool = False,
) -> RedeliveryResult:
    """Deliver ``records`` (events declared in the registry) to ``subscription`` again.

    A sync subscription's deliveries run one at a time, each claimed just before its run:
    with ``claim_from`` (a `Delivery.Status`), only a row still in that status is run (one
    another process claimed meanwhile is left alone); without, whatever its row says (a
    replay). An async subscription's rows are the caller's to claim.

    With ``lock_records`` (a replay, whose records no delivery row keeps from events_prune),
    the records are locked in the transaction that writes their rows, and those deleted
    since the caller read them are skipped: nothing is sent or run for them.
    """
    if not records:
        return RedeliveryResult()
    registry = get_registry()
    compiled = {r.name: registry.event(r.name) for r in records}
    if not subscription.is_queued:
        return _run(
            subscription, records, compiled, prior_attempts, using, claim_from, lock_records
        )
    if not lock_records:
        return _send(subscription, records, compiled, prior_attempts, using)
    result, gone = RedeliveryResult(), list[str]()
    with transaction.atomic(using=using):
        stored = _still_stored(records, using, gone)
        if stored:  # an ordered subscription's are sent at the commit (`_send_ordered`)
            result = _send(subscription, stored, compiled, prior_attempts, using)
    result.skipped.extend(gone)
    return result


def _still_stored(records: Sequence[EventRecord], using: str, gone: list[str]) -> list[EventRecord]:
    """Lock ``records`` till the end of the transaction (where the database has row locks);
    return those still stored, and add a note for each one deleted to ``gone``.

    events_prune locks what it deletes and then reads their deliveries again: it waits for
    this transaction, then sees the rows it wrote. ``FOR NO KEY UPDATE`` (PostgreSQL) keeps
    a DELETE waiting, not a worker's insert of another delivery row of the event.
    """
    features = connections[using].features
    rows = EventRecord.objects.using(using).filter(pk__in=[r.pk for r in records])
    rows = rows.order_by("pk").select_for_update(no_key=features.has_select_for_no_key_update)
    found = set(rows.values_list("pk", flat=True))
    gone.extend(f"{r.pk}: {GONE}" for r in records if r.pk not in found)
    return [r for r in records if r.pk in found]


def send_claimed(
    subscription: Subscription,
    records: Sequence[EventRecord],
    prior_attempts: Mapping[UUID, PriorRuns],
    *,
    using: str,
) -> broker.Unsent:
    """Send ``records``' messages to ``subscription`` as the relay sends (with publisher
    confirms, trying the broker even during an outage it knows of); the events the broker
    is not known to have taken.

    Writes no `Delivery` row: the caller has claimed the rows in the state it sends them for.
    """
    registry = get_registry()
    items = [
        (event_of(r), registry.event(r.name).declaration.durable, [subscription]) for r in records
    ]
    prior = {(r.pk, subscription.name): prior_attempts.get(r.pk, NO_RUNS) for r in records}
    return _send_items(subscription, items, using, prior, relay=True)


def _send(
    subscription: Subscription,
    records: Sequence[EventRecord],
    compiled: Mapping[str, CompiledEvent],
    prior: Mapping[UUID, PriorRuns],
    using: str,
) -> RedeliveryResult:
    items = [(event_of(r), compiled[r.name].declaration.durable, [subscription]) for r in records]
    prior_attempts = {(r.pk, subscription.name): prior.get(r.pk, NO_RUNS) for r in records}
    # A worker records the success of a first run only for events that record everything:
    # a pending row created for any other event would stay pending for good.
    create = [r.pk for r in records if compiled[r.name].records_all]
    if subscription.declaration.ordering_key is not None:
        return _send_ordered(subscription, records, items, prior, prior_attempts, create, using)
    # Marked pending and sent in one transaction: a process that dies before the commit
    # leaves the rows as they were (a failure stays one), never pending with no message.
    # A message the broker took can still be lost (a worker killed as it takes it): the
    # relay's check of pending rows untouched since (`operations.unfinished`) sends it again.
    # So is one sent with no confirm: the broker may hold it, and a worker run it, so it is
    # not recorded failed (a retry of it would run the handler twice). A broadcast's row has
    # no such check: it is.
    with transaction.atomic(using=using):
        _mark(subscription, records, prior, Delivery.Status.PENDING, using, create=create)
        unsent = _send_items(subscription, items, using, prior_attempts)
        broadcast = subscription.declaration.broadcast
        failed = unsent.ids if broadcast else set(unsent.refused)
        if failed:
            _unsent(subscription, failed, prior, using)
        _carry_runs(subscription, [r.pk for r in records if r.pk not in failed], prior, using)
    unconfirmed = 0 if broadcast else len(unsent.unconfirmed)
    if unconfirmed:
        logger.warning(
            "The broker did not confirm %d delivery(ies) sent again; left pending: events_relay "
            "sends them again if no worker records an outcome",
            unconfirmed,
            extra=log_extra(None, subscription.name),
        )
    return RedeliveryResult(
        sent=len(records) - len(unsent.ids), unsent=len(failed), to_relay=unconfirmed
    )


def _send_ordered(
    subscription: Subscription,
    records: Sequence[EventRecord],
    items: Sequence[broker.SendItem],
    prior: Mapping[UUID, PriorRuns],
    prior_attempts: Mapping[tuple[UUID, str], PriorRuns],
    create: Sequence[UUID],
    using: str,
) -> RedeliveryResult:
    """Mark an ordered subscription's deliveries pending, then send them once that commits.

    Sent before the commit, a replayed message could reach a worker that still reads the
    delivery as succeeded: it would skip it as a duplicate, and the row, pending once the
    commit lands, would hold its key for good. The rows are due for events_relay in
    `ordering.HAND_ON_GRACE` seconds in case this process dies before sending.
    """
    due = timezone.now() + timedelta(seconds=ordering.HAND_ON_GRACE)
    result = RedeliveryResult(at_commit=len(records))
    ids = [r.pk for r in records]

    def send() -> None:
        # Unconfirmed or refused, a message stays due: the gate skips a second one it ran.
        unsent = _send_items(subscription, items, using, prior_attempts).ids
        sent = [pk for pk in ids if pk not in unsent]
        Delivery.objects.using(using).filter(
            event_id__in=sent, subscription=subscription.name, retry_at=due
        ).update(retry_at=None)
        if unsent:
            logger.warning(
                "The broker did not take %d delivery(ies) sent again; events_relay sends them",
                len(unsent),
                extra=log_extra(None, subscription.name),
            )
        result.at_commit, result.sent, result.to_relay = 0, len(sent), len(unsent)

    with transaction.atomic(using=using):
        _mark(subscription, records, prior, Delivery.Status.PENDING, using, create=create, due=due)
        # Refused at the commit, they stay due for the relay, which sends them from the rows.
        _carry_runs(subscription, ids, prior, using)
        # Inside a caller's transaction (a retry's claim) this runs when that one commits: the
        # result returned is final only then (the caller reads it after its commit). One
        # read before (an outer transaction's) counts them `at_commit`.
        transaction.on_commit(send, using=using)
    return result


def _send_items(
    subscription: Subscription,
    items: Sequence[broker.SendItem],
    using: str,
    prior_attempts: Mapping[tuple[UUID, str], PriorRuns],
    relay: bool = False,
) -> broker.Unsent:
    if subscription.via == "tasks":
        from django_events.delivery import tasks_backend

        refused = tasks_backend.send_deliveries(items, using, prior_attempts=prior_attempts)
        return broker.Unsent(refused=frozenset(refused))
    # The relay waits for the broker's confirms and tries it even during a known outage.
    return broker.send_deliveries(
        items,
        using,
        prior_attempts=prior_attempts,
        confirm=True if relay else None,
        always_try=relay,
    )


def _unsent(
    subscription: Subscription, unsent: set[UUID], prior: Mapping[UUID, PriorRuns], using: str
) -> None:
    """Record deliveries the broker did not take as failed (kept: an earlier error)."""
    pending = Delivery.Status.PENDING  # until recorded failed below, with delivery_failed
    Delivery.objects.using(using).bulk_create(
        [_row(subscription, pk, pending, prior.get(pk, NO_RUNS)) for pk in unsent],
        ignore_conflicts=True,
    )
    rows = Delivery.objects.using(using).filter(event_id__in=unsent, subscription=subscription.name)
    record_failed(rows, NOT_SENT, keep_error=True)


def _run(
    subscription: Subscription,
    records: Sequence[EventRecord],
    compiled: Mapping[str, CompiledEvent],
    prior: Mapping[UUID, PriorRuns],
    using: str,
    claim_from: str | None,
    lock: bool,
) -> RedeliveryResult:
    result = RedeliveryResult()
    if subscription.name in paused_names(using, fresh=True):
        result.held = _hold(subscription, records, prior, using, claim_from, lock, result.skipped)
        return result
    interceptors = get_registry().interceptors
    for record in records:
        # Claimed one by one: a process killed midway leaves the delivery it was running
        # `running` and the ones after it as they were (failed, held: still retryable).
        attempts = _claim_run(subscription, record, prior, using, claim_from, lock, result.skipped)
        if attempts is None:
            continue
        row = _run_one(subscription, record, compiled[record.name], attempts, interceptors)
        if row is None:
            continue
        save_deliveries(using, [row])
        if row.status == Delivery.Status.SUCCEEDED:
            result.succeeded += 1
            continue
        failed_signal(event_of(record), row)
        if row.attempts > attempts:  # `Delivery.attempts` counts the handler's runs
            result.failed += 1
        else:
            result.not_run += 1
    return result


def _hold(
    subscription: Subscription,
    records: Sequence[EventRecord],
    prior: Mapping[UUID, PriorRuns],
    using: str,
    claim_from: str | None,
    lock: bool,
    gone: list[str],
) -> int:
    """Record a paused sync subscription's deliveries held instead of running them (as a
    publish would); how many. With ``claim_from``, only rows still in that status; with
    ``lock``, only those whose records are still stored (see `redeliver`)."""
    if claim_from is None:
        with transaction.atomic(using=using):
            if lock:
                records = _still_stored(records, using, gone)
            create = [r.pk for r in records]
            _mark(subscription, records, prior, Delivery.Status.HELD, using, create=create)
        return len(records)
    rows = Delivery.objects.using(using).filter(
        event_id__in=[r.pk for r in records], subscription=subscription.name, status=claim_from
    )
    return rows.update(status=Delivery.Status.HELD, updated_at=timezone.now())


def _claim_run(
    subscription: Subscription,
    record: EventRecord,
    prior: Mapping[UUID, PriorRuns],
    using: str,
    claim_from: str | None,
    lock: bool,
    gone: list[str],
) -> int | None:
    """Mark one sync delivery `running`: its runs so far, or None if this process is not to
    run it (see `redeliver`; a record deleted meanwhile is noted in ``gone``)."""
    row = Delivery.objects.using(using).filter(event_id=record.pk, subscription=subscription.name)
    if claim_from is None:
        with transaction.atomic(using=using):
            if lock and not _still_stored([record], using, gone):
                return None
            _mark(subscription, [record], prior, Delivery.Status.RUNNING, using, create=[record.pk])
    elif not row.filter(status=claim_from).update(
        status=Delivery.Status.RUNNING, updated_at=timezone.now()
    ):
        return None
    # Read again once claimed: another retry may have run it since ``prior`` was read.
    return row.values_list("attempts", flat=True).get()


def _run_one(
    subscription: Subscription,
    record: EventRecord,
    event_type: CompiledEvent,
    attempts: int,
    interceptors: Sequence[object],
) -> Delivery | None:
    """The outcome of one run (None only if ``run_sync_handler`` records no success)."""
    try:
        data = event_type.upgrade(record.payload, record.version, validate=False)
    except (NewerVersion, UpcastError) as exc:
        # The handler did not run: a failure, its count of runs as it was. (Of a newer
        # version too: no worker takes a sync delivery later, a retry from a process of the
        # release that declares it does.)
        error = (
            _not_run_here(exc)
            if isinstance(exc, NewerVersion)
            else redact_text(str(exc), record.payload, event_type.declaration.redact)
        )
        failed = Delivery.Status.FAILED
        return delivery(record.pk, subscription.name, subscription.mode, failed, attempts, error)
    problems = event_type.validator.problems(data, event_type.declaration.redact)
    if problems:  # masked by path
        error = event_type.payload_error(record.version, problems)
        return delivery(
            record.pk, subscription.name, subscription.mode, Delivery.Status.FAILED, attempts, error
        )
    event = event_of(record, event_type.typed_payload(data))
    if data is not record.payload:  # upcast: handlers see the declared version
        event = replace(event, data=data, version=event_type.version)
    return run_sync_handler(subscription, event, interceptors, True, attempts)


def _not_run_here(exc: NewerVersion) -> str:
    return (
        f"Not run: event {exc.name!r} is version {exc.version}; this process knows up to "
        f"version {exc.known}. Retry it from a process that declares version {exc.version}."
    )


def _mark(
    subscription: Subscription,
    records: Sequence[EventRecord],
    prior: Mapping[UUID, PriorRuns],
    status: str,
    using: str,
    *,
    create: Sequence[UUID],
    due: datetime | None = None,
) -> None:
    """Show the redelivery as under way: set the status of existing rows, create ``create``.

    ``due``: when events_relay is to send them, should this process not (`Delivery.retry_at`).
    """
    ids = [r.pk for r in records]
    Delivery.objects.using(using).bulk_create(
        [_row(subscription, pk, status, prior.get(pk, NO_RUNS)) for pk in create],
        ignore_conflicts=True,
    )
    due_time = {} if due is None else {"retry_at": due}
    Delivery.objects.using(using).filter(event_id__in=ids, subscription=subscription.name).update(
        status=status, updated_at=timezone.now(), **due_time
    )


def _carry_runs(
    subscription: Subscription, ids: Sequence[UUID], prior: Mapping[UUID, PriorRuns], using: str
) -> None:
    """Write the uncounted runs the messages of ``ids`` carry onto their rows (a replay's
    runs before it), so that what the relay or a hand-on sends from a row counts as the
    message did. Only for messages sent: a refused one's failure keeps its own count."""
    runs = {pk: prior[pk].uncounted for pk in ids if pk in prior}
    if not runs:
        return
    uncounted = Case(
        *(When(event_id=pk, then=Value(n)) for pk, n in runs.items()),
        default=F("uncounted"),
        output_field=Delivery._meta.get_field("uncounted"),
    )
    Delivery.objects.using(using).filter(
        event_id__in=list(runs), subscription=subscription.name
    ).update(uncounted=uncounted)


def _row(subscription: Subscription, event_id: UUID, status: str, prior: PriorRuns) -> Delivery:
    """A new `Delivery` row of a delivery sent or run again, with its runs so far."""
    return delivery(
        event_id,
        subscription.name,
        subscription.mode,
        status,
        prior.attempts,
        uncounted=prior.uncounted,
    )


def find_subscription(name: str, registry: Registry | None = None) -> Subscription | None:
    """The subscription ``name``: declared, or a webhook endpoint's (``endpoint:<id>``)."""
    registry = registry or get_registry()
    found = registry.subscriptions.get(name)
    if found is None and endpoints.is_endpoint_name(name):
        return endpoints.find(name)
    return found


def unknown_subscription(name: str, registry: Registry | None = None) -> str:
    """The error for a subscription name nobody declared, with the names it may mean: those
    it ends (a default name is ``<event>:<handler path>``), else the closest."""
    names = list((registry or get_registry()).subscriptions)
    ends = [n for n in names if n.endswith((f".{name}", f":{name}"))]
    meant = sorted(ends)[:3] or get_close_matches(name, names, n=3)
    guess = f"; did you mean {' or '.join(map(repr, meant))}?" if meant else ""
    return f"Unknown subscription {name!r}{guess} (events_list lists them)"


def reaches(subscription: Subscription, event_name: str) -> bool:
    """Whether events named ``event_name`` are delivered to ``subscription`` today."""
    compiled = get_registry().events.get(event_name)
    if compiled is None:
        return False
    if isinstance(subscription, endpoints.EndpointSubscription):
        return subscription.receives(event_name)
    return any(
        s is subscription
        for s in (*compiled.inline, *compiled.sync, *compiled.async_, *compiled.tasks)
    )


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of up to ``size`` items (``itertools.batched`` is Python 3.12+)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
