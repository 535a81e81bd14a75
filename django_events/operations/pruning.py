"""Deleting old event records and their deliveries (``events_prune``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db import DEFAULT_DB_ALIAS, transaction
from django.utils import timezone

from django_events.models import Delivery, EventRecord, IdempotencyKey

BATCH_SIZE = 5000


@dataclass(frozen=True)
class PruneResult:
    """Rows deleted, and old records kept: with a failure, or still pending (the outbox)."""

    events: int
    deliveries: int
    kept_failures: int
    kept_pending: int
    expired_keys: int = 0


def prune_events(
    older_than: timedelta,
    *,
    include_failures: bool = False,
    using: str = DEFAULT_DB_ALIAS,
    batch_size: int = BATCH_SIZE,
) -> PruneResult:
    """Delete records that occurred more than ``older_than`` ago, in batches.

    Records still pending are never deleted (they are the outbox: not yet sent). Records with
    a failed delivery, or that failed themselves, are kept unless ``include_failures``.
    Inbound idempotency keys past their retention window are deleted too, whatever their age.
    """
    cutoff = timezone.now() - older_than
    old = EventRecord.objects.using(using).filter(occurred_at__lt=cutoff)
    candidates = old.exclude(status=EventRecord.Status.PENDING)
    if not include_failures:
        failed = Delivery.objects.using(using).filter(status=Delivery.Status.FAILED)
        candidates = candidates.exclude(status=EventRecord.Status.FAILED).exclude(
            pk__in=failed.values("event_id")
        )
    events = deliveries = 0
    while pks := list(candidates.values_list("pk", flat=True)[:batch_size]):
        with transaction.atomic(using=using):
            deliveries += Delivery.objects.using(using).filter(event_id__in=pks).delete()[0]
            events += EventRecord.objects.using(using).filter(pk__in=pks).delete()[0]
    expired_keys = (
        IdempotencyKey.objects.using(using).filter(expires_at__lte=timezone.now()).delete()[0]
    )
    return PruneResult(
        expired_keys=expired_keys,
        events=events,
        deliveries=deliveries,
        kept_failures=old.exclude(status=EventRecord.Status.PENDING).count(),
        kept_pending=old.filter(status=EventRecord.Status.PENDING).count(),
    )
