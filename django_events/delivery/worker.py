"""The worker side of an async delivery, independent of Celery's task machinery."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, close_old_connections, transaction
from django.utils import timezone

from django_events.delivery.batching import recorder
from django_events.delivery.execution import run_handler
from django_events.delivery.failing import judge
from django_events.delivery.pausing import paused_names
from django_events.delivery.recording import delivery, ensure_records, save_deliveries
from django_events.events import Event
from django_events.exceptions import RetryLater
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord
from django_events.signals import send_delivery_failed
from django_events.wiring.compiled import Registry, Subscription
from django_events.wiring.redaction import redact_text
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.worker")


@dataclass(frozen=True)
class Outcome:
    """What became of one message: done, or retry after ``retry_in`` seconds.

    ``message``: the message the retry must carry when it differs from this one (a
    ``RetryLater(counts=False)`` run is remembered in it); None: the same message.
    """

    status: str
    retry_in: float | None = None
    error: Exception | None = None
    message: dict[str, Any] | None = None
    uncounted: bool = False


@dataclass(frozen=True)
class _Message:
    subscription: str
    event: dict[str, Any]
    alias: str
    prior_attempts: int
    rerun: bool
    uncounted: int = 0  # runs that raised RetryLater(counts=False)


def process_message(
    message: Any, retries: int, *, manage_connections: bool = True, batch_success: bool = False
) -> Outcome:
    """Run the handler a message names; record the outcome. ``retries`` is Celery's count.

    Stale database connections are closed before the handler runs, as Django does when a
    request starts, so a restarted database never wedges a worker (``manage_connections``
    false leaves them alone: in-process runs inside a test's transaction). ``batch_success``
    hands a first attempt's success row to this process's `BatchedRecorder` instead of
    writing it before returning (``SUCCESS_RECORDS = "batched"``).
    """
    if manage_connections:
        # Once, before: a connection that broke or aged during this delivery is closed before
        # the next one, and Celery's Django fixup closes such connections after each task.
        close_old_connections()
    return _process(message, retries, batch_success)


def _process(raw: Any, retries: int, batch_success: bool) -> Outcome:
    try:
        message = _parse(raw)
        event_name = message.event["name"]
    except (KeyError, TypeError, ValueError) as exc:
        # Keys only: a payload may hold fields that `redact` keeps out of logs.
        shape = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        logger.error(
            "Rejected a malformed django_events message (%s): %s", exc, shape, extra=log_extra()
        )
        return Outcome("rejected")
    registry = get_registry()
    subscription = registry.subscriptions.get(message.subscription)
    compiled = registry.events.get(event_name)
    attempt = message.prior_attempts + retries + 1
    if subscription is None or compiled is None:
        what = (
            f"subscription {message.subscription!r}"
            if subscription is None
            else f"event {event_name!r}"
        )
        return _give_up(message, attempt, f"Unknown {what}: not declared on this worker")
    data = message.event.get("payload")
    if not isinstance(data, dict):
        return _give_up(message, attempt, f"Malformed event in message: payload is {data!r}")
    problems = compiled.validator.problems(data)
    if problems:
        details = redact_text("; ".join(map(str, problems)), data, compiled.declaration.redact)
        return _give_up(message, attempt, f"Payload no longer valid for {event_name!r}: {details}")
    try:
        event = Event.from_message(message.event, compiled.typed_payload(data))
    except (KeyError, TypeError, ValueError) as exc:
        return _give_up(message, attempt, f"Malformed event in message: {exc}")
    if subscription.name in paused_names(message.alias):
        held = _hold(message, subscription, event, attempt)
        if held is not None:
            return held
    # A retry or replay has a Delivery row already (pending): its success must replace it.
    batch = batch_success and not message.rerun
    outcome = _run(
        registry,
        subscription,
        event,
        message.alias,
        attempt,
        retries,
        batch,
        message.uncounted,
        message.rerun,
    )
    if outcome.uncounted:
        outcome = replace(outcome, message={**raw, "uncounted": message.uncounted + 1})
    return outcome


def _parse(raw: Any) -> _Message:
    if not isinstance(raw, dict) or not isinstance(raw.get("event"), dict):
        raise ValueError("not a django_events delivery message")
    alias = raw.get("db") or DEFAULT_DB_ALIAS
    if alias not in settings.DATABASES:
        alias = DEFAULT_DB_ALIAS
    return _Message(
        str(raw["subscription"]),
        raw["event"],
        alias,
        int(raw.get("prior_attempts", 0)),
        raw.get("rerun") is True,
        int(raw.get("uncounted", 0)),
    )


def _run(
    registry: Registry,
    subscription: Subscription,
    event: Event,
    alias: str,
    attempt: int,
    retries: int,
    batch_success: bool,
    uncounted: int = 0,
    rerun: bool = False,
) -> Outcome:
    records_all = registry.events[event.name].records_all
    broadcast = subscription.declaration.broadcast
    # A broadcast copy is never retried: a retry would reach every worker again.
    max_attempts = 1 if broadcast else subscription.retry.max_attempts
    started = time.perf_counter()
    try:
        if subscription.declaration.idempotent:
            _run_idempotent(registry, subscription, event, alias, attempt, records_all)
        else:
            run_handler(subscription, event, registry.interceptors, attempt)
    except Exception as exc:
        took = (time.perf_counter() - started) * 1000
        error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        if broadcast:  # one row for every worker's copy: say whose copy failed
            error = f"on {socket.gethostname()} pid {os.getpid()}: {error}"
        verdict = judge(
            exc, subscription, attempt - uncounted, retries, event.occurred_at, timezone.now()
        )
        final = verdict.final
        if verdict.note:
            error = f"{error} ({verdict.note})"
        status = Delivery.Status.FAILED if final else Delivery.Status.PENDING
        if isinstance(exc, RetryLater) and not final:
            logger.info(
                "Handler asked for a retry in %gs (attempt %d)",
                exc.seconds,
                attempt,
                extra=log_extra(event, subscription),
            )
        else:
            logger.warning(
                "Handler failed (attempt %d of %d)",
                attempt - uncounted,
                max_attempts,
                exc_info=True,
                extra=log_extra(event, subscription),
            )
        recorded = _record_quietly(
            alias, event, [_row(event, subscription, status, attempt, error, tb, took)], always=True
        )
        # A final failure nobody can see (the database is down too) would be an event lost:
        # keep retrying until the outcome can be recorded.
        if final and recorded:
            send_delivery_failed(
                event=event,
                event_id=event.id,
                subscription=subscription.name,
                mode="async",
                attempts=attempt,
                error=error,
                exception=exc,
            )
            return Outcome("failed", error=exc)
        if verdict.retry_in is None:
            return Outcome("retry", retry_in=subscription.retry.delay(retries + 1), error=exc)
        return Outcome("retry", retry_in=verdict.retry_in, error=exc, uncounted=not verdict.counted)
    took = (time.perf_counter() - started) * 1000
    # A rerun (attempt > 1) updates the failure recorded before, whatever RECORD says.
    if (records_all or attempt > 1) and not subscription.declaration.idempotent:
        if batch_success and attempt == 1:  # nothing recorded before it to overwrite
            recorder().add(alias, event.id, subscription.name)
        else:
            # The handler ran: failing to record that must not run it again.
            # A broadcast copy's success never hides another worker's failure of that event.
            row = _row(event, subscription, Delivery.Status.SUCCEEDED, attempt, duration_ms=took)
            _record_quietly(alias, event, [row], always=False, overwrite=not broadcast)
    elif rerun and not subscription.declaration.idempotent:
        # A first run sent again (a resumed held delivery) of an event recorded only on
        # failure: its row exists, pending, and must not stay so; none is created.
        _finish_existing(alias, event, subscription, attempt, took)
    return Outcome("succeeded")


def _finish_existing(
    alias: str, event: Event, subscription: Subscription, attempt: int, took: float
) -> None:
    try:
        Delivery.objects.using(alias).filter(
            event_id=event.id, subscription=subscription.name
        ).update(
            status=Delivery.Status.SUCCEEDED,
            attempts=attempt,
            last_error="",
            traceback="",
            duration_ms=took,
            updated_at=timezone.now(),
        )
    except DatabaseError:
        logger.exception("Could not record the delivery outcome", extra=log_extra(event))


def _hold(
    message: _Message, subscription: Subscription, event: Event, attempt: int
) -> Outcome | None:
    """Record the delivery held (its subscription is paused); None: resumed meanwhile, run it.

    The message is acknowledged: the ``held`` row is what resuming sends again, in order.
    """
    row = _row(event, subscription, Delivery.Status.HELD, attempt - 1)
    if not _record_quietly(message.alias, event, [row], always=True):
        return Outcome("retry", retry_in=subscription.retry.delay(1))
    # A resume between the cached read and the row's write would not see this row.
    if subscription.name not in paused_names(message.alias, fresh=True):
        return None
    logger.info("Subscription paused: delivery held", extra=log_extra(event, subscription))
    return Outcome("held")


def _run_idempotent(
    registry: Registry,
    subscription: Subscription,
    event: Event,
    alias: str,
    attempt: int,
    records_all: bool,
) -> None:
    """Run at most once successfully: the handler's writes and the success commit together."""
    if not records_all:
        ensure_records(alias, [event], EventRecord.Status.DISPATCHED)
    with transaction.atomic(using=alias):
        # Insert-or-keep, then lock: a concurrent redelivery waits here for this one to finish.
        Delivery.objects.using(alias).bulk_create(
            [_row(event, subscription, Delivery.Status.RUNNING, attempt - 1)],
            ignore_conflicts=True,
        )
        status = (
            Delivery.objects.using(alias)
            .select_for_update()
            .filter(event_id=event.id, subscription=subscription.name)
            .values_list("status", flat=True)
            .get()
        )
        if status == Delivery.Status.SUCCEEDED:
            logger.info(
                "Idempotent delivery already succeeded; skipped",
                extra=log_extra(event, subscription),
            )
            return
        started = time.perf_counter()
        run_handler(subscription, event, registry.interceptors, attempt)
        took = (time.perf_counter() - started) * 1000
        row = _row(event, subscription, Delivery.Status.SUCCEEDED, attempt, duration_ms=took)
        save_deliveries(alias, [row])


def _give_up(message: _Message, attempt: int, error: str) -> Outcome:
    """A poison message: record it as a failed delivery (no retry, nothing imported)."""
    extra = _message_log_extra(message)
    logger.error("%s (event %s)", error, message.event.get("id"), extra=extra)
    try:
        event = Event.from_message(message.event)
    except (KeyError, TypeError, ValueError):
        logger.error("Cannot record the failure: the message's event is malformed", extra=extra)
        return Outcome("rejected")
    row = delivery(event.id, message.subscription, "async", Delivery.Status.FAILED, attempt, error)
    if _record_quietly(message.alias, event, [row], always=True):
        send_delivery_failed(
            event=event,
            event_id=event.id,
            subscription=message.subscription,
            mode="async",
            attempts=attempt,
            error=error,
        )
    return Outcome("failed")


def _message_log_extra(message: _Message) -> dict[str, Any]:
    """``log_extra`` read from a message whose event may not rebuild."""
    extra = log_extra(None, message.subscription)
    for field, key in (
        ("event_id", "id"),
        ("event_name", "name"),
        ("correlation_id", "correlation_id"),
    ):
        value = message.event.get(key)
        extra[field] = None if value is None else str(value)
    return extra


def _record_quietly(
    alias: str, event: Event, rows: list[Delivery], *, always: bool, overwrite: bool = True
) -> bool:
    """Save delivery rows; log (not raise) a database error and return False."""
    try:
        if always:
            ensure_records(alias, [event], EventRecord.Status.DISPATCHED)
        if overwrite:
            save_deliveries(alias, rows)
        else:
            Delivery.objects.using(alias).bulk_create(rows, ignore_conflicts=True)
    except DatabaseError:
        logger.exception("Could not record the delivery outcome", extra=log_extra(event))
        return False
    return True


def _row(
    event: Event,
    subscription: Subscription,
    status: str,
    attempt: int,
    error: str = "",
    tb: str = "",
    duration_ms: float | None = None,
) -> Delivery:
    return delivery(event.id, subscription.name, "async", status, attempt, error, tb, duration_ms)
