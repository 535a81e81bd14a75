"""Pausing and resuming a subscription (``events_pause``, ``events_resume``, the wiring page).

While a subscription is paused its deliveries are held (`Delivery` rows with status ``held``,
written by the worker, or after commit for sync subscriptions) and nothing runs its handler.
Resuming removes the pause, then delivers the held rows again through the normal path, in the
order their events occurred: async ones as new task messages, sync ones in this process.

``using`` is the event log's database alias: by default the one the routers write it to (the
functions that only read: read it from), ``default`` without routers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from django.db import connections, transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from django_events.delivery import ordering
from django_events.delivery.endpoints import DELETED, is_endpoint_name, subscription_name
from django_events.delivery.messages import PriorRuns
from django_events.delivery.pausing import ORPHAN_AFTER, forget, paused_names
from django_events.delivery.recording import event_log_alias, event_log_read_alias
from django_events.models import Delivery, EventRecord, PausedSubscription
from django_events.operations.failing import record_failed
from django_events.operations.redelivery import (
    RedeliveryResult,
    batched,
    find_subscription,
    redeliver,
    unknown_subscription,
)
from django_events.wiring.compiled import Subscription

BATCH_SIZE = 500


class PauseError(ValueError):
    """The subscription cannot be paused or resumed (unknown, or inline)."""


def pausable(name: str) -> Subscription:
    """The subscription ``name`` (declared, or a webhook endpoint's ``endpoint:<id>``) if it
    can be paused (raises `PauseError`)."""
    subscription = find_subscription(name)
    if subscription is None and is_endpoint_name(name):
        raise PauseError(f"Unknown subscription {name!r}: no such webhook endpoint")
    if subscription is None:
        raise PauseError(unknown_subscription(name))
    if subscription.mode == "inline":
        raise PauseError(
            f"Subscription {name!r} is inline: it runs in the publisher's transaction "
            "and cannot be paused"
        )
    return subscription


def pause(name: str, *, by: str = "", using: str | None = None) -> bool:
    """Pause subscription ``name``; False if it was paused already."""
    pausable(name)
    _, created = PausedSubscription.objects.using(event_log_alias(using)).get_or_create(
        subscription=name, defaults={"paused_by": by}
    )
    forget()
    return created


def resume(
    name: str, *, using: str | None = None, batch_size: int = BATCH_SIZE
) -> RedeliveryResult:
    """Resume subscription ``name`` and deliver what was held meanwhile, oldest event first.

    A subscription no longer declared is resumed too (its pause removed); nothing can run its
    held rows, so they are recorded failed, listed as skipped: a retry once it is declared
    again, or marked resolved, and pruned like any failure. (A deleted endpoint's were
    recorded failed as it was deleted, see `endpoint_deleted`: only a worker holding one at
    that very moment leaves one here.)
    """
    using = event_log_alias(using)
    deleted, _ = PausedSubscription.objects.using(using).filter(subscription=name).delete()
    forget()
    subscription = find_subscription(name)
    result = RedeliveryResult()
    if subscription is None:
        if is_endpoint_name(name):
            what, error = "its webhook endpoint was deleted", DELETED
        else:
            what = "is no longer declared"
            error = (
                f"Not run: subscription {name!r} is no longer declared. Retry it once it is "
                "declared again, or mark it resolved."
            )
        count = record_failed(held(name, using=using), error)
        if count:
            result.skipped.append(f"{count} held deliveries recorded failed: {name!r} {what}")
        elif not deleted:
            raise PauseError(unknown_subscription(name))
        return result
    ids = list(held(name, using=using).values_list("pk", flat=True))
    result.add(_deliver_held(subscription, ids, using, batch_size))
    return result


def deliver_orphaned_held(
    *, older_than: float = ORPHAN_AFTER, using: str | None = None
) -> RedeliveryResult:
    """Deliver the rows held over ``older_than`` seconds ago of subscriptions not paused (each
    relay pass does): what a resume could not see.

    A process that read the pauses before a resume committed (a resume in an admin request's
    transaction; a read up to a second old, see `delivery.pausing`) can write a held row
    after the resume listed them. Publishers and workers take back such a row when they read
    the pauses again, but not past a resume's uncommitted delete, nor when the database fails
    the take-back (a worker then acknowledges the message); nothing else would run it.
    Each row is claimed from held as a resume claims it, so none runs twice.

    An ordered key's held rows wait for their turn: the gate hands each on in order when the
    delivery before it finishes. One with none unfinished before it (the key's first) has
    nothing to wait for: its key is handed on here, as a finish would (`ordering.release`).
    """
    using = event_log_alias(using)
    paused = paused_names(using, fresh=True)
    horizon = timezone.now() - timedelta(seconds=older_than)
    late = held(using=using).filter(updated_at__lte=horizon).exclude(subscription__in=paused)
    names = set(late.order_by().values_list("subscription", flat=True).distinct())
    ordered = {name for name in names if _is_ordered(name)}
    # The gate holds a row only while its subscription is ordered: one whose ordering_key a
    # deploy removed has nothing to hand its key's rows on, so they go as any held rows.
    unordered = late.filter(Q(sequence__isnull=True) | ~Q(subscription__in=ordered))
    result = RedeliveryResult()
    for name in sorted(set(unordered.values_list("subscription", flat=True))):
        subscription = find_subscription(name)
        if subscription is None:  # events_resume records an undeclared one's rows failed
            continue
        ids = list(unordered.filter(subscription=name).values_list("pk", flat=True))
        result.add(_deliver_held(subscription, ids, using, BATCH_SIZE))
    gated = late.filter(sequence__isnull=False, subscription__in=ordered)
    result.sent += _hand_on_first_held(gated, using)
    return result


def _hand_on_first_held(late: QuerySet[Delivery], using: str) -> int:
    """Hand on the keys whose first unfinished delivery is one of the held rows ``late`` (of
    ordered subscriptions); how many deliveries that sent (each once: only a row still held
    is handed on).

    Key by key, its first unfinished delivery read as the gate reads it (an index's first
    entry): a key blocked behind a failed delivery holds every later one of it, and comparing
    each with those before it grew as their square, every relay pass.
    """
    keys = set(late.order_by().values_list("subscription", "ordering_key").distinct())
    heads: dict[int, tuple[str, str]] = {}
    for name, key in keys:
        if key is None:
            continue
        first = ordering.first_unfinished(using, name, key)
        if first is not None and first[1] == Delivery.Status.HELD:
            heads[first[0]] = (name, key)
    handed: list[tuple[str, str]] = []
    for ids in batched(heads, BATCH_SIZE):  # held over the orphan threshold too
        still_late = late.filter(pk__in=ids).order_by().values_list("pk", flat=True)
        handed += [heads[pk] for pk in still_late]
    return ordering.release(using, handed)


def _is_ordered(name: str) -> bool:
    """Whether the subscription ``name`` is declared, with an ``ordering_key``."""
    subscription = find_subscription(name)
    return subscription is not None and subscription.declaration.ordering_key is not None


def _deliver_held(
    subscription: Subscription, ids: list[int], using: str, batch_size: int
) -> RedeliveryResult:
    """Deliver the held rows ``ids`` of ``subscription`` again, oldest event first."""
    result = RedeliveryResult()
    for chunk in batched(ids, batch_size):
        sent = RedeliveryResult()
        with transaction.atomic(using=using):
            # A sync subscription's run claims each row itself (see `redeliver`).
            claimed = _claim(chunk, using, mark_pending=subscription.is_queued)
            records = EventRecord.objects.using(using).in_bulk([d.event_id for d in claimed])
            ordered = [records[d.event_id] for d in claimed]
            prior = {d.event_id: PriorRuns(d.attempts, d.uncounted) for d in claimed}
            # Sent before the claim commits (as retries are): a process that dies in between
            # leaves them held, never pending with no message.
            if subscription.is_queued:
                sent = redeliver(subscription, ordered, prior, using=using)
        result.add(sent)  # after the commit: an ordered subscription's sends run at it
        if not subscription.is_queued:  # each row claimed from held as it runs
            result.add(
                redeliver(
                    subscription, ordered, prior, using=using, claim_from=Delivery.Status.HELD
                )
            )
    return result


def endpoint_deleted(endpoint_id: UUID, *, using: str | None = None) -> int:
    """Webhook endpoint ``endpoint_id`` was deleted: record what it still had waiting (held
    while it was paused, or pending: a retry's turn to come) as failed, as a worker records
    a message for a deleted endpoint, and remove its pause. How many were recorded failed.

    Nothing could deliver them any more, and held or pending they would keep their events
    from pruning for good.
    """
    using = event_log_alias(using)
    name = subscription_name(endpoint_id)
    PausedSubscription.objects.using(using).filter(subscription=name).delete()
    forget()
    rows = Delivery.objects.using(using).filter(subscription=name)
    # A pending one's retry is on its way to a worker, which records it failed, with
    # delivery_failed, when it comes ("not declared on this worker"): no signal twice.
    pending = rows.filter(status=Delivery.Status.PENDING).update(
        status=Delivery.Status.FAILED, last_error=DELETED, retry_at=None, updated_at=timezone.now()
    )
    return pending + record_failed(rows.filter(status=Delivery.Status.HELD), DELETED)


def held(name: str | None = None, *, using: str | None = None) -> QuerySet[Delivery]:
    """Held deliveries (of subscription ``name``), oldest event first; on the alias the
    routers write the event log to by default, as `resume` delivers and records them there."""
    rows = Delivery.objects.using(event_log_alias(using)).filter(status=Delivery.Status.HELD)
    if name is not None:
        rows = rows.filter(subscription=name)
    return rows.order_by("event__occurred_at", "event_id")


def is_paused(name: str, *, using: str | None = None) -> bool:
    """Whether subscription ``name`` is paused now (read from the database)."""
    return (
        PausedSubscription.objects.using(event_log_read_alias(using))
        .filter(subscription=name)
        .exists()
    )


def _claim(ids: list[int], using: str, *, mark_pending: bool) -> list[Delivery]:
    """Lock the rows of ``ids`` still held, in event order (inside a transaction); mark
    them pending if ``mark_pending``."""
    features = connections[using].features
    rows = Delivery.objects.using(using).filter(pk__in=ids, status=Delivery.Status.HELD)
    if features.has_select_for_update:
        # Only the held rows: ordering joins their events, whose rows the background marker
        # or a relay may be updating, and a locked row is skipped (left held) here.
        rows = rows.select_for_update(
            skip_locked=features.has_select_for_update_skip_locked,
            of=("self",) if features.has_select_for_update_of else (),
        )
    claimed = list(
        rows.order_by("event__occurred_at", "event_id").only(
            "pk", "event_id", "attempts", "uncounted"
        )
    )
    if mark_pending:
        Delivery.objects.using(using).filter(pk__in=[d.pk for d in claimed]).update(
            status=Delivery.Status.PENDING
        )
    return claimed


def pause_state(*, using: str | None = None) -> dict[str, dict[str, Any]]:
    """Subscriptions paused or holding deliveries: name -> ``paused`` (bool), ``held`` (count)."""
    using = event_log_read_alias(using)
    state: dict[str, dict[str, Any]] = {}
    for name in PausedSubscription.objects.using(using).values_list("subscription", flat=True):
        state[name] = {"paused": True, "held": 0}
    counts = (
        Delivery.objects.using(using)
        .filter(status=Delivery.Status.HELD)
        .values_list("subscription")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for name, n in counts:
        state.setdefault(name, {"paused": False, "held": 0})["held"] = n
    return state
