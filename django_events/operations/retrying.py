"""Retrying failed deliveries (the admin's "Retry selected" and ``events_retry``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from django.db import connections, transaction
from django.db.models import Count, QuerySet
from django.utils import timezone

from django_events.delivery import ordering
from django_events.delivery.endpoints import EndpointSubscription, is_endpoint_name
from django_events.delivery.messages import PriorRuns
from django_events.delivery.pausing import paused_names
from django_events.delivery.recording import FINISHED, event_log_alias, event_log_read_alias
from django_events.models import Delivery, EventRecord
from django_events.operations.redelivery import (
    RedeliveryResult,
    batched,
    find_subscription,
    reaches,
    redeliver,
)
from django_events.wiring.compiled import Subscription
from django_events.wiring.redaction import STALE_PAYLOAD, mask_values_in_text, redact_text
from django_events.wiring.registry import get_registry

BATCH_SIZE = 500
# The worker never retries a broadcast copy either: the Delivery row stands for every copy.
BROADCAST_NOT_RETRIED = (
    "a broadcast is not retried (a retry would run on every worker again); mark it resolved"
)


def select_failures(
    *,
    subscription: str | None = None,
    event: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    using: str | None = None,
) -> QuerySet[Delivery]:
    """Failed deliveries, narrowed by subscription, event name and time of the failure.

    On ``using``, by default the alias the routers write the event log to: `retry_failures`
    and `mark_resolved` write where the QuerySet reads.
    """
    failures = Delivery.objects.using(event_log_alias(using)).filter(status=Delivery.Status.FAILED)
    if subscription:
        failures = failures.filter(subscription=subscription)
    if event:
        failures = failures.filter(event__name=event)
    if since:
        failures = failures.filter(updated_at__gte=since)
    if until:
        failures = failures.filter(updated_at__lt=until)
    return failures


def retry_failures(
    deliveries: QuerySet[Delivery], *, batch_size: int = BATCH_SIZE
) -> RedeliveryResult:
    """Deliver each failed delivery in ``deliveries`` again, through the normal path.

    Async deliveries are claimed (status failed -> pending) with row locks where the
    database has them, so two retries at once do not send a delivery twice; their messages
    go out before the claim commits: a process that dies in between leaves the deliveries
    failed (to retry again), never pending with no message. Sync handlers run after the
    commit, outside it, each claimed (failed -> running) just before its run, so a process
    that dies midway leaves the rest failed. Deliveries no longer failed are left alone, and
    so are those of a disabled webhook endpoint (``result.disabled``), whose attempts would fail
    without a call.
    """
    using = deliveries.db
    failed = deliveries.filter(status=Delivery.Status.FAILED)
    ids = list(failed.order_by("pk").values_list("pk", flat=True))
    result = RedeliveryResult()
    for chunk in batched(ids, batch_size):
        sends: list[RedeliveryResult] = []
        with transaction.atomic(using=using):
            groups = _claim(chunk, using, result)
            for subscription, records, prior in groups:
                if subscription.is_queued:
                    sends.append(redeliver(subscription, records, prior, using=using))
        for sent in sends:  # read after the commit: an ordered subscription's sends run at it
            result.add(sent)
        for subscription, records, prior in groups:
            if not subscription.is_queued:  # each row claimed from failed as it runs
                claim_from = Delivery.Status.FAILED
                result.add(
                    redeliver(subscription, records, prior, using=using, claim_from=claim_from)
                )
    return result


def _claim(
    ids: Sequence[int], using: str, result: RedeliveryResult
) -> list[tuple[Subscription, list[EventRecord], dict[UUID, PriorRuns]]]:
    """Lock the deliveries of ``ids`` still failed (inside a transaction), and mark those of
    async subscriptions pending (a sync one's run claims its own, see `redeliver`)."""
    registry = get_registry()
    features = connections[using].features
    groups: dict[str, tuple[Subscription, list[EventRecord], dict[UUID, PriorRuns]]] = {}
    rows = Delivery.objects.using(using).filter(pk__in=ids, status=Delivery.Status.FAILED)
    if features.has_select_for_update:
        rows = rows.select_for_update(skip_locked=features.has_select_for_update_skip_locked)
    failures = list(
        rows.order_by("pk").only("pk", "event_id", "subscription", "attempts", "uncounted")
    )
    records = EventRecord.objects.using(using).in_bulk([f.event_id for f in failures])
    claimed = []
    found: dict[str, Subscription | None] = {}  # an endpoint's is read once a batch
    for failure in failures:
        subscription = found.get(failure.subscription)
        if failure.subscription not in found:
            subscription = found[failure.subscription] = find_subscription(
                failure.subscription, registry
            )
        record = records[failure.event_id]
        if subscription is None:
            gone = (
                "the webhook endpoint was deleted"
                if is_endpoint_name(failure.subscription)
                else "the subscription is no longer declared"
            )
            result.skipped.append(f"{failure.subscription} <- {record.pk}: {gone}")
            continue
        if isinstance(subscription, EndpointSubscription) and subscription.disabled:
            # A worker would fail each at once, without a call: left as they are.
            result.disabled[failure.subscription] += 1
            continue
        if not reaches(subscription, record.name):
            result.skipped.append(
                f"{failure.subscription} <- {record.pk}: "
                f"event {record.name!r} no longer reaches this subscription"
            )
            continue
        if subscription.declaration.broadcast:
            result.skipped.append(f"{failure.subscription} <- {record.pk}: {BROADCAST_NOT_RETRIED}")
            continue
        group = groups.setdefault(subscription.name, (subscription, [], {}))
        group[1].append(record)
        group[2][record.pk] = PriorRuns(failure.attempts, failure.uncounted)
        if subscription.is_queued:
            claimed.append(failure.pk)
    Delivery.objects.using(using).filter(pk__in=claimed).update(status=Delivery.Status.PENDING)
    return list(groups.values())


def mark_resolved(deliveries: QuerySet[Delivery]) -> int:
    """Mark failed deliveries resolved (nothing runs); return how many changed.

    An ordered delivery resolved no longer holds its key: the next one of the key is sent.
    Its keys are read and handed on on ``deliveries.db``: give a QuerySet of the database to
    write (`select_failures`, or ``.using(...)``), not one that reads a replica.
    """
    failed = deliveries.filter(status=Delivery.Status.FAILED)
    keys = [
        (subscription, key)
        for subscription, key in failed.filter(sequence__isnull=False).values_list(
            "subscription", "ordering_key"
        )
        if key is not None
    ]
    count = failed.update(status=Delivery.Status.RESOLVED, updated_at=timezone.now())
    if keys:
        ordering.release(deliveries.db, keys)
    return count


def held_deliveries(using: str | None = None) -> list[dict[str, object]]:
    """Held deliveries by subscription and key: how many wait, behind what, and whether
    their subscription is paused (then they wait for events_resume, whatever is ahead).
    Those without a key (an unordered subscription's, held by a pause) wait behind nothing:
    their ``head`` is None. A key or an error that is, or quotes, a value the event redacts
    comes masked. ``using``: by default the alias the routers read the event log from."""
    using = event_log_read_alias(using)
    paused = paused_names(using, fresh=True)
    rows = (
        Delivery.objects.using(using)
        .filter(status=Delivery.Status.HELD)
        .values("subscription", "ordering_key")
        .annotate(held=Count("pk"))
        .order_by("subscription", "ordering_key")
    )
    found: list[dict[str, object]] = []
    for row in rows:
        if row["ordering_key"] is None:  # not the first unfinished row of the subscription
            found.append({**row, "head": None, "paused": row["subscription"] in paused})
            continue
        first = (
            Delivery.objects.using(using)
            .filter(subscription=row["subscription"], ordering_key=row["ordering_key"])
            .exclude(status__in=FINISHED)
            .order_by("sequence")
            .values("event_id", "status", "attempts", "last_error", "event__name", "event__payload")
            .first()
        )
        head = None
        if first is not None:
            # The key is a payload value of the key's events, the head's among them, and the
            # error may quote the payload: mask what the event redacts, as the admin does.
            name, payload = first["event__name"], first["event__payload"]
            if row["ordering_key"]:
                row["ordering_key"] = masked_text(row["ordering_key"], name, payload)
            head = {
                "event_id": first["event_id"],
                "status": first["status"],
                "attempts": first["attempts"],
                "last_error": masked_text(first["last_error"], name, payload),
            }
        found.append({**row, "head": head, "paused": row["subscription"] in paused})
    return found


def masked_text(text: str, name: str, payload: object) -> str:
    """``text`` (an error, a traceback, a webhook's answer, an ordering key) with the values
    that event ``name`` redacts in ``payload`` masked, as the admin and events_list show it.

    For an event no longer declared, whose ``redact`` list is unknown, every value of the
    payload is masked, as its payload is. A stale payload's schema error is shown as
    recorded: its problems were masked by path then.
    """
    if not text or text.startswith(STALE_PAYLOAD):
        return text
    compiled = get_registry().events.get(name)
    if compiled is None:
        return mask_values_in_text(text, payload)
    if not compiled.declaration.redact:
        return text
    return redact_text(text, payload, compiled.declaration.redact)
