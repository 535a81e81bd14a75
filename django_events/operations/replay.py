"""Replaying stored events to one subscription (``events_replay``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from django_events.delivery.endpoints import EndpointSubscription
from django_events.delivery.messages import PriorRuns
from django_events.delivery.recording import event_log_alias
from django_events.exceptions import EventError
from django_events.models import Delivery, EventRecord
from django_events.operations.redelivery import (
    RedeliveryResult,
    batched,
    find_subscription,
    reaches,
    redeliver,
    unknown_subscription,
)
from django_events.wiring.registry import get_registry

BATCH_SIZE = 500


class ReplayError(EventError):
    """A replay was asked for something that cannot be replayed (nothing was sent)."""


def replay_events(
    subscription: str,
    *,
    events: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    using: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> tuple[int, RedeliveryResult]:
    """Deliver stored events again to ``subscription``; return (events matched, result).

    ``events`` names the events to replay (default: every event the subscription receives),
    ``since``/``until`` bound their ``occurred_at``. The subscription's ``when`` filter
    still applies: events it would not have received are skipped, and so are events an
    ``idempotent`` subscription already handled successfully, and events whose record is
    deleted (by events_prune) before their delivery is written. ``using``: the event log's
    alias (default: the one the routers write it to).
    """
    using = event_log_alias(using)
    registry = get_registry()
    target = find_subscription(subscription, registry)
    if target is None:
        raise ReplayError(unknown_subscription(subscription, registry))
    if isinstance(target, EndpointSubscription) and not (
        target.endpoint and target.endpoint.enabled
    ):
        # Each delivery would fail at once, without a call: "Webhook endpoint disabled".
        raise ReplayError(f"Webhook endpoint {subscription!r} is disabled: enable it first")
    if target.declaration.broadcast:
        # One Delivery row stands for every worker's copy: a copy's success never updates it.
        raise ReplayError(
            f"Subscription {subscription!r} is a broadcast: a replay would run on every worker "
            "again and could not be recorded"
        )
    received = [name for name in registry.events if reaches(target, name)]
    for name in events:
        if name not in received:
            raise ReplayError(
                f"Subscription {subscription!r} does not receive event {name!r} "
                f"(it receives: {', '.join(sorted(received)) or 'nothing'})"
            )
    records = EventRecord.objects.using(using).filter(name__in=list(events) or received)
    if since:
        records = records.filter(occurred_at__gte=since)
    if until:
        records = records.filter(occurred_at__lt=until)
    result = RedeliveryResult()
    matched = 0
    for chunk in batched(records.order_by("occurred_at").iterator(batch_size), batch_size):
        matched += len(chunk)
        accepted = []
        for record in chunk:
            if target.accepts is None or target.accepts(record.payload):
                accepted.append(record)
            else:
                result.skipped.append(f"{record.pk}: filtered out by the subscription's `when`")
        existing = (
            Delivery.objects.using(using)
            .filter(subscription=target.name, event_id__in=[r.pk for r in accepted])
            .values_list("event_id", "attempts", "status")
        )
        prior, done = {}, set()
        for event_id, attempts, status in existing:
            # A replay is a new round: the runs before it count as runs (attempts carry on)
            # but not towards max_attempts, so a transient error is retried as on a first run.
            prior[event_id] = PriorRuns(attempts, uncounted=attempts)
            if status == Delivery.Status.SUCCEEDED:
                done.add(event_id)
        if target.declaration.idempotent and done:
            # At most one successful run per event: replaying a success would break that.
            result.skipped.extend(f"{pk}: already succeeded (idempotent)" for pk in done)
            accepted = [r for r in accepted if r.pk not in done]
        # Locked as their deliveries are written: events_prune may delete old records.
        result.add(redeliver(target, accepted, prior, using=using, lock_records=True))
    return matched, result
