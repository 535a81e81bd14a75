"""Deleting old event records and their deliveries (``events_prune``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from django_events.conf import conf
from django_events.delivery.lost_messages import resend_after
from django_events.delivery.recording import event_log_alias
from django_events.models import Delivery, EventRecord, IdempotencyKey

BATCH_SIZE = 5000


#: Deliveries not finished yet: their events are never deleted (a retry waits, a paused
#: subscription holds them, an ordered key waits for its turn, a handler runs).
UNFINISHED = (Delivery.Status.PENDING, Delivery.Status.HELD, Delivery.Status.RUNNING)


@dataclass(frozen=True)
class PruneResult:
    """Rows deleted, and old records kept: with a failure, still pending (the outbox), with
    deliveries not finished, or dispatched less than ``in_flight_for`` seconds ago."""

    events: int
    deliveries: int
    kept_failures: int
    kept_pending: int
    expired_keys: int = 0
    kept_unfinished: int = 0
    kept_in_flight: int = 0
    in_flight_for: float = 0.0


def prune_events(
    older_than: timedelta | None,
    *,
    include_failures: bool = False,
    using: str | None = None,
    batch_size: int = BATCH_SIZE,
    keys_kept_for: timedelta | None = timedelta(0),
) -> PruneResult:
    """Delete records that occurred more than ``older_than`` ago (``None``: none), in batches.

    Records still pending are never deleted (they are the outbox: not yet sent), nor records
    with a delivery not finished (`UNFINISHED`), nor records dispatched less than the
    lost-message threshold ago (`resend_after`): a first delivery has no `Delivery` row until
    a worker records its outcome, so a message still waiting in a queue shows only there.
    Records with a failed delivery, or that failed themselves, are kept unless
    ``include_failures``.
    Inbound idempotency keys are deleted ``keys_kept_for`` after their window expired
    (``None``: kept), whatever their age. ``using``: the event log's alias (default: the one
    the routers write it to).
    """
    using = event_log_alias(using)
    if older_than is None:
        expired_keys = _prune_keys(keys_kept_for, using)
        return PruneResult(0, 0, 0, 0, expired_keys)
    now = timezone.now()
    cutoff = now - older_than
    old = EventRecord.objects.using(using).filter(occurred_at__lt=cutoff)
    under_way = Delivery.objects.using(using).filter(status__in=UNFINISHED).values("event_id")
    # Measured from the dispatch, not the occurrence: an event the relay sent late (the
    # broker was down) has its messages in a queue now. Past this threshold a delivery with
    # no outcome counts as lost (the relay sends it again once its queue drains); a backlog
    # older than that is the operator's to outlast (docs: retention above the longest one).
    in_flight_for = resend_after()
    in_flight = Q(dispatched_at__gt=now - timedelta(seconds=in_flight_for))
    candidates = old.exclude(status=EventRecord.Status.PENDING).exclude(pk__in=under_way)
    candidates = candidates.exclude(in_flight)
    if not include_failures:
        failed = Delivery.objects.using(using).filter(status=Delivery.Status.FAILED)
        candidates = candidates.exclude(status=EventRecord.Status.FAILED).exclude(
            pk__in=failed.values("event_id")
        )
    events = deliveries = 0
    while pks := list(candidates.values_list("pk", flat=True)[:batch_size]):
        with transaction.atomic(using=using):
            # Locked first (a replay writing their deliveries, and on PostgreSQL an idempotent
            # delivery under way, hold their records locked till they commit: this waits for
            # them), then read again: a retry or replay may have reopened a delivery since.
            locked = EventRecord.objects.using(using).filter(pk__in=pks).order_by("pk")
            pks = list(locked.select_for_update().values_list("pk", flat=True))
            pks = list(
                EventRecord.objects.using(using)
                .filter(pk__in=pks)
                .exclude(pk__in=under_way)
                .values_list("pk", flat=True)
            )
            # The statements carry the conditions too: a retry's claim that commits while they
            # wait for its row locks is seen by them (a reopened delivery is not deleted), and
            # a record keeps whatever delivery is left.
            finished = Delivery.objects.using(using).filter(event_id__in=pks)
            finished = finished.exclude(status__in=UNFINISHED)
            deliveries += finished.delete()[0]
            left = Delivery.objects.using(using).filter(event_id=OuterRef("pk"))
            unused = EventRecord.objects.using(using).filter(pk__in=pks).exclude(Exists(left))
            events += unused.delete()[0]
    expired_keys = _prune_keys(keys_kept_for, using)
    kept = old.exclude(status=EventRecord.Status.PENDING)
    kept_unfinished = kept.filter(pk__in=under_way).count()
    kept_in_flight = kept.filter(in_flight).exclude(pk__in=under_way).count()
    return PruneResult(
        expired_keys=expired_keys,
        events=events,
        deliveries=deliveries,
        kept_failures=kept.count() - kept_unfinished - kept_in_flight,
        kept_pending=old.filter(status=EventRecord.Status.PENDING).count(),
        kept_unfinished=kept_unfinished,
        kept_in_flight=kept_in_flight,
        in_flight_for=in_flight_for,
    )


def _prune_keys(kept_for: timedelta | None, using: str) -> int:
    if kept_for is None:
        return 0
    expired = IdempotencyKey.objects.using(using).filter(expires_at__lte=timezone.now() - kept_for)
    return expired.delete()[0]


def prune_retained(*, using: str | None = None) -> PruneResult:
    """Delete what ``DJANGO_EVENTS["RETENTION"]`` no longer keeps (the ``django_events.prune``
    task) on ``using`` (default: where the routers write the event log). Failures, pending
    records and records still in flight (see `prune_events`) are kept, whatever their age."""
    retention = conf.RETENTION
    events, keys = retention["events"], retention["idempotency_keys"]
    return prune_events(
        None if events is None else timedelta(days=events),
        using=using,
        keys_kept_for=None if keys is None else timedelta(days=keys),
    )
