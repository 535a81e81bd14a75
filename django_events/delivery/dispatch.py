"""After commit: send async deliveries, then run sync handlers, recording what happened."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.db import DatabaseError
from django.utils import timezone

from django_events.delivery import broker
from django_events.delivery.execution import run_handler
from django_events.delivery.failure_logs import log_failure
from django_events.delivery.marking import marker, marks_later
from django_events.delivery.pausing import paused_names
from django_events.delivery.recording import (
    delivery,
    ensure_records,
    mark_dispatched,
    save_deliveries,
)
from django_events.events import Event
from django_events.exceptions import RetryLater
from django_events.logs import batch_log_extra
from django_events.models import Delivery, EventRecord
from django_events.signals import send_delivery_failed
from django_events.wiring.compiled import CompiledEvent, HandlerImportError, Subscription
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.dispatch")


@dataclass(slots=True)
class Outgoing:
    """A published event on its way out, with the subscriptions its filters let through."""

    event: Event
    compiled: CompiledEvent
    sync: Sequence[Subscription]
    async_: Sequence[Subscription]
    recorded: bool
    tasks: Sequence[Subscription] = ()  # via Django's Tasks, on commit


def accepted(subscriptions: Sequence[Subscription], data: dict[str, Any]) -> list[Subscription]:
    """The subscriptions whose ``when`` filter lets an event with payload ``data`` through."""
    if not subscriptions:  # the common case: skip building a comprehension
        return []
    return [s for s in subscriptions if s.accepts is None or s.accepts(data)]


#: Sends async deliveries; returns the ids of the events it could not hand over.
Sender = Callable[[Sequence[broker.SendItem], str], set[UUID]]


def dispatch(batch: Sequence[Outgoing], alias: str, send: Sender | None = None) -> None:
    """Deliver a committed batch (async ones through ``send``, the broker by default).

    Never raises into the code that committed, unless ``send`` does (`events_eager`).
    """
    try:
        _send_async(batch, alias, send)
    finally:  # only events_eager() raises from there: sync handlers still run
        run_sync(batch, alias)


def _send_async(batch: Sequence[Outgoing], alias: str, send: Sender | None) -> None:
    outgoing: list[broker.SendItem] = []
    via_tasks: list[broker.SendItem] = []
    for o in batch:  # one plain loop: a batch of one with only sync deliveries is common
        if o.async_:
            outgoing.append((o.event, o.compiled.declaration.durable, o.async_))
        if o.tasks:
            via_tasks.append((o.event, o.compiled.declaration.durable, o.tasks))
    if not outgoing and not via_tasks:
        return
    if (
        send is None
        and not via_tasks
        and all(o.recorded for o in batch if o.async_)
        and marks_later(alias)
    ):
        # The common case: the broker's confirms and the UPDATE marking the records
        # dispatched are left to this process's background marker (delivery/marking.py); a
        # record it never marks stays pending for the relay.
        broker.send_deliveries(outgoing, alias, marker=marker())
        return
    unsent: set[object] = set()
    if outgoing:
        unsent.update(
            send(outgoing, alias) if send else broker.send_deliveries(outgoing, alias).ids
        )
    if via_tasks:
        from django_events.delivery import tasks_backend

        unsent.update(tasks_backend.send_deliveries(via_tasks, alias))
    sent_ids = [
        o.event.id
        for o in batch
        if (o.async_ or o.tasks) and o.recorded and o.event.id not in unsent
    ]
    try:
        mark_dispatched(alias, sent_ids)
        # RECORD='failures' wrote no record: an unsent event needs one now, for the relay.
        unrecorded = [o.event for o in batch if not o.recorded and o.event.id in unsent]
        if unrecorded:
            ensure_records(alias, unrecorded, EventRecord.Status.PENDING)
    except DatabaseError:
        # The messages are out; records left pending are sent again by the relay (at least once).
        logger.exception(
            "Could not mark %d event(s) dispatched",
            len(sent_ids),
            extra=batch_log_extra([o.event for o in batch]),
        )


def run_sync(batch: Sequence[Outgoing], alias: str) -> None:
    """Run the sync deliveries of a committed batch, recording what happened (`dispatch`
    without the async part, for a batch that has none)."""
    interceptors = get_registry().interceptors
    rows: list[Delivery] = []
    unrecorded_failures: list[Event] = []
    failed: list[tuple[Event, Delivery]] = []
    held: list[tuple[Event, Subscription]] = []
    paused: frozenset[str] | None = None  # read once, if a sync delivery is due
    for item in batch:
        for subscription in item.sync:
            if paused is None:
                paused = paused_names(alias)
            if subscription.name in paused:  # held: resuming runs it
                rows.append(delivery(item.event.id, subscription.name, "sync", "held", 0))
                held.append((item.event, subscription))
                if not item.recorded:
                    unrecorded_failures.append(item.event)
                continue
            row = run_sync_handler(subscription, item.event, interceptors, item.recorded)
            if row is None:
                continue
            rows.append(row)
            if row.status == Delivery.Status.FAILED:
                failed.append((item.event, row))
            if not item.recorded:
                unrecorded_failures.append(item.event)
    if not rows:
        return
    try:
        if unrecorded_failures:
            ensure_records(alias, unrecorded_failures, EventRecord.Status.DISPATCHED)
        save_deliveries(alias, rows)
    except DatabaseError:
        logger.exception(
            "Could not record %d sync delivery outcome(s)",
            len(rows),
            extra=batch_log_extra([o.event for o in batch]),
        )
    # After the rows are written, so a receiver finds them; a sync delivery is never retried.
    for event, row in failed:
        failed_signal(event, row)
    if held:
        _run_resumed(held, alias, interceptors)


def _run_resumed(
    held: Sequence[tuple[Event, Subscription]], alias: str, interceptors: Sequence[object]
) -> None:
    """Run the deliveries just recorded held whose subscription was resumed meanwhile.

    The pauses read were up to `pausing.CACHE_SECONDS` old: a resume in between read the held
    rows before these were written, and nothing else would run them. Each row is claimed from
    ``held`` first, so one a resume claimed meanwhile runs there, not twice.
    """
    try:
        paused = paused_names(alias, fresh=True)
        resumed = [(e, s) for e, s in held if s.name not in paused]
        for event, subscription in resumed:
            claimed = Delivery.objects.using(alias).filter(
                event_id=event.id, subscription=subscription.name, status=Delivery.Status.HELD
            )
            if not claimed.update(status=Delivery.Status.RUNNING, updated_at=timezone.now()):
                continue
            row = run_sync_handler(subscription, event, interceptors)
            if row is not None:
                save_deliveries(alias, [row])
                if row.status == Delivery.Status.FAILED:
                    failed_signal(event, row)
    except DatabaseError:  # events_relay runs held ones a minute on, fails running ones
        logger.exception(
            "Could not run the held sync deliveries of a subscription resumed meanwhile",
            extra=batch_log_extra([event for event, _ in held]),
        )


def failed_signal(event: Event, row: Delivery) -> None:
    """Send `delivery_failed` for the failed sync delivery ``row`` of ``event``."""
    send_delivery_failed(
        event=event,
        event_id=event.id,
        subscription=row.subscription,
        mode=row.mode,
        attempts=row.attempts,
        error=row.last_error,
        exception=getattr(row, "exception", None),
    )


# A sync handler's RetryLater reads "retry in 60s": no retry comes (docs/failure control).
SYNC_NOT_RETRIED = " (not retried: sync deliveries are not; events_retry runs it again)"


def run_sync_handler(
    subscription: Subscription,
    event: Event,
    interceptors: Sequence[object],
    record_success: bool = True,
    prior_attempts: int = 0,
) -> Delivery | None:
    """Run one sync handler, isolated: its exception is logged, not raised.

    Returns the `Delivery` row to save: always for a failure, for a success only with
    ``record_success`` (building model instances is not free on this hot path).
    """
    started = time.perf_counter()
    try:
        run_handler(subscription, event, interceptors, prior_attempts + 1)
    except Exception as exc:  # noqa: BLE001 - any error of user code: logged and recorded
        log_failure(
            logger,
            logging.ERROR,
            event,
            subscription,
            "Sync handler failed: subscription %r, event %s %s",
            subscription.name,
            event.name,
            event.id,
            exc_info=True,
        )
        # A handler that does not import never ran: `Delivery.attempts` counts runs.
        ran = not isinstance(exc, HandlerImportError)
        row = delivery(
            event.id,
            subscription.name,
            "sync",
            Delivery.Status.FAILED,
            prior_attempts + ran,
            f"{type(exc).__name__}: {exc}"
            + (SYNC_NOT_RETRIED if isinstance(exc, RetryLater) else ""),
            traceback.format_exc(),
            (time.perf_counter() - started) * 1000,
        )
        row.exception = exc  # type: ignore[attr-defined]  # for delivery_failed, not saved
        return row
    if not record_success:
        return None
    took = (time.perf_counter() - started) * 1000
    return delivery(
        event.id,
        subscription.name,
        "sync",
        Delivery.Status.SUCCEEDED,
        prior_attempts + 1,
        duration_ms=took,
    )
