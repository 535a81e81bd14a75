"""The worker side of an async delivery, independent of Celery's task machinery."""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    InterfaceError,
    InternalError,
    OperationalError,
    close_old_connections,
    transaction,
)
from django.utils.dateparse import parse_datetime

from django_events.delivery.batching import recorder
from django_events.delivery.execution import run_handler
from django_events.delivery.recording import delivery, ensure_records, save_deliveries
from django_events.delivery.sealing import Unsealable, open_event
from django_events.events import Event
from django_events.exceptions import NewerVersion, UpcastError
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord
from django_events.wiring.compiled import HandlerImportError, Registry, Subscription
from django_events.wiring.redaction import redact_text, stale_payload_error
from django_events.wiring.registry import get_registry
from django_events.wiring.validation import json_problems, storable_text

logger = logging.getLogger("django_events.worker")

# Handler runs one delivery may count, manual retries included. No retry policy comes near
# it; a message claiming more (or fewer than none) is forged or corrupt, and would otherwise
# never reach its last attempt, or overflow `Delivery.attempts` (PostgreSQL: DataError).
MAX_ATTEMPTS = 1_000_000

# What recording an outcome can come to: the outage of a database is worth waiting out; a
# statement the database refuses (DataError, IntegrityError...) fails the same way each time.
RECORDED, OUTAGE, REFUSED = "recorded", "outage", "refused"
# InternalError too: PostgreSQL reports an aborted transaction or a crashed backend with it.
_OUTAGES = (OperationalError, InterfaceError, InternalError)


class MalformedMessage(ValueError):
    """A message that is not a well-formed ``django_events.deliver`` argument."""


@dataclass(frozen=True)
class Outcome:
    """What became of one message: done, or retry after ``retry_in`` seconds."""

    status: str
    retry_in: float | None = None
    error: Exception | None = None
    # The message to retry with, when it is not the same one (a wait that counts no attempt).
    retry_with: Any = None


@dataclass(frozen=True)
class _Message:
    subscription: str
    event: dict[str, Any]
    alias: str
    prior_attempts: int
    rerun: bool


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
        attempt = _attempt(message, retries)
    except MalformedMessage as exc:
        # Keys only: a payload may hold fields that `redact` keeps out of logs.
        shape = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        logger.error(
            "Rejected a malformed django_events message (%s): %s", exc, shape, extra=log_extra()
        )
        return Outcome("rejected")
    event_name = message.event["name"]
    registry = get_registry()
    subscription = registry.subscriptions.get(message.subscription)
    compiled = registry.events.get(event_name)
    try:
        # Authenticated encryption: what opens was sealed by a publisher with our keys.
        message = replace(message, event=open_event(message.event))
    except Unsealable as exc:
        return _give_up(message, attempt, f"Cannot open the event's payload: {exc}")
    if subscription is None or compiled is None:
        what = (
            f"subscription {message.subscription!r}"
            if subscription is None
            else f"event {event_name!r}"
        )
        return _give_up(message, attempt, f"Unknown {what}: not declared on this worker")
    if subscription not in compiled.async_ and subscription not in compiled.tasks:
        return _give_up(
            message,
            attempt,
            f"Subscription {subscription.name!r} does not receive event {event_name!r} "
            "asynchronously on this worker",
        )
    data = message.event["payload"]
    event_message = message.event
    version = event_message.get("version", 1)
    if version != compiled.declaration.version:
        try:
            data = compiled.upgrade(data, int(version))
        except NewerVersion as exc:
            return _wait_for_newer(raw, message, subscription, attempt, retries, exc)
        except UpcastError as exc:
            details = redact_text(str(exc), data, compiled.declaration.redact)
            return _give_up(message, attempt, details)
        except (TypeError, ValueError) as exc:  # int() of a version that is not a number
            return _give_up(message, attempt, f"Malformed event in message: version {exc}")
        event_message = {**event_message, "payload": data, "version": compiled.version}
    problems = compiled.validator.problems(data, compiled.declaration.redact)
    if problems:
        return _give_up(message, attempt, stale_payload_error(event_name, problems))
    try:
        event = Event.from_message(event_message, compiled.typed_payload(data))
    except (KeyError, TypeError, ValueError) as exc:
        return _give_up(message, attempt, f"Malformed event in message: {exc}")
    # A retry or replay has a Delivery row already (pending): its success must replace it.
    batch = batch_success and not message.rerun
    return _run(registry, subscription, event, message.alias, attempt, retries, batch)


def _wait_for_newer(
    raw: dict[str, Any],
    message: _Message,
    subscription: Subscription,
    attempt: int,
    retries: int,
    exc: NewerVersion,
) -> Outcome:
    """A rolling deploy: the event is newer than this worker. Retry later, run nothing.

    The retried message counts one attempt less, so waiting never uses up ``max_attempts``;
    its `Delivery` row says what it waits for (pending, attempts unchanged).
    """
    error = f"Waiting for a newer worker: {exc}"
    extra = _message_log_extra(message)
    logger.warning("%s (event %s)", error, message.event.get("id"), extra=extra)
    try:
        event = Event.from_message(message.event)
    except (KeyError, TypeError, ValueError):
        return _give_up(message, attempt, f"Malformed event in message (it waits for {exc})")
    status = Delivery.Status.PENDING
    row = delivery(event.id, subscription.name, "async", status, attempt - 1, error)
    _record_quietly(message.alias, event, [row], always=True)
    delay = max(1.0, subscription.retry.delay(min(retries + 1, 8)))
    waiting = {**raw, "prior_attempts": message.prior_attempts - 1, "rerun": True}
    return Outcome("waiting", retry_in=delay, error=exc, retry_with=waiting)


def _parse(raw: Any) -> _Message:
    """Check a message's shape, all of it, before anything reads it (raises `MalformedMessage`).

    Only `build_message` writes these messages, but anyone who can write to the broker can
    send one: what passes here can be rebuilt into an `Event` and recorded.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("event"), dict):
        raise MalformedMessage("not a django_events delivery message")
    subscription = raw.get("subscription")
    if not isinstance(subscription, str) or not storable_text(subscription):
        raise MalformedMessage("subscription is not a string")
    alias = raw.get("db") or DEFAULT_DB_ALIAS
    if not isinstance(alias, str) or alias not in settings.DATABASES:
        alias = DEFAULT_DB_ALIAS
    prior = raw.get("prior_attempts", 0)
    # Below 0 only while waiting for a newer worker (each wait is one uncounted retry);
    # _attempt checks that the runs it adds up to are a count.
    if not _is_int(prior) or not -MAX_ATTEMPTS < prior < MAX_ATTEMPTS:
        raise MalformedMessage(f"prior_attempts is not an integer from 0 to {MAX_ATTEMPTS - 1}")
    if not isinstance(raw.get("rerun", False), bool):
        raise MalformedMessage("rerun is not a boolean")
    event = raw["event"]
    _check_event(event)
    return _Message(subscription, event, alias, prior, raw.get("rerun") is True)


def _check_event(event: dict[str, Any]) -> None:
    """The checks `Event.from_message` leaves out, and those that keep `Delivery` storable."""
    name = event.get("name")
    if not isinstance(name, str) or not storable_text(name):
        raise MalformedMessage("event name is not a string")
    for key in ("id", "correlation_id", "causation_id"):
        value = event.get(key)
        if value is None and key == "causation_id":
            continue
        if not isinstance(value, str):
            raise MalformedMessage(f"event {key} is not a UUID string")
        try:
            UUID(value)
        except ValueError:
            raise MalformedMessage(f"event {key} is not a UUID string") from None
    occurred_at = event.get("occurred_at")
    try:
        parsed = parse_datetime(occurred_at) if isinstance(occurred_at, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise MalformedMessage("event occurred_at is not an aware ISO 8601 date and time")
    headers = event.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and storable_text(k) and storable_text(v)
        for k, v in headers.items()
    ):
        raise MalformedMessage("event headers do not map strings to strings")
    payload = event.get("payload")
    if not isinstance(payload, dict):
        raise MalformedMessage("event payload is not an object")
    problems = json_problems(payload)
    if problems:  # values a database refuses: neither the event nor its failure can be stored
        raise MalformedMessage(f"event payload cannot be stored: {problems[0]}")


def _attempt(message: _Message, retries: Any) -> int:
    """The number of this run of the handler (Celery's ``retries`` is a header too)."""
    if not _is_int(retries) or not 0 <= message.prior_attempts + retries < MAX_ATTEMPTS:
        raise MalformedMessage(f"retries is not an integer from 0 to {MAX_ATTEMPTS - 1}")
    attempt: int = message.prior_attempts + retries + 1
    return attempt


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _run(
    registry: Registry,
    subscription: Subscription,
    event: Event,
    alias: str,
    attempt: int,
    retries: int,
    batch_success: bool,
) -> Outcome:
    records_all = registry.events[event.name].records_all
    broadcast = subscription.declaration.broadcast
    # A broadcast copy is never retried: a retry would reach every worker again.
    max_attempts = 1 if broadcast else subscription.retry.max_attempts
    try:
        subscription.handler()
    except HandlerImportError as exc:
        # Retrying cannot make a missing module appear: a deploy has to fix it.
        return _handler_unavailable(subscription, event, alias, attempt, retries, exc)
    try:
        if subscription.declaration.idempotent:
            _run_idempotent(registry, subscription, event, alias, attempt, records_all)
        else:
            run_handler(subscription, event, registry.interceptors, attempt)
    except Exception as exc:
        error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        if broadcast:  # one row for every worker's copy: say whose copy failed
            error = f"on {socket.gethostname()} pid {os.getpid()}: {error}"
        final = attempt >= max_attempts
        status = Delivery.Status.FAILED if final else Delivery.Status.PENDING
        logger.warning(
            "Handler failed (attempt %d of %d)",
            attempt,
            max_attempts,
            exc_info=True,
            extra=log_extra(event, subscription),
        )
        recorded = _record_quietly(
            alias, event, [_row(event, subscription, status, attempt, error, tb)], always=True
        )
        # A final failure nobody can see (the database is down too) would be an event lost:
        # keep retrying until the outcome can be recorded. One the database refuses would be
        # refused at every retry: it is logged (above and by _record_quietly) instead.
        if final and recorded != OUTAGE:
            logger.error(
                "Delivery failed for good after %d attempt(s): %s",
                attempt,
                error,
                extra=log_extra(event, subscription),
            )
            return Outcome("failed", error=exc)
        return Outcome("retry", retry_in=subscription.retry.delay(retries + 1), error=exc)
    # A rerun (attempt > 1) updates the failure recorded before, whatever RECORD says.
    if (records_all or attempt > 1) and not subscription.declaration.idempotent:
        if batch_success and attempt == 1:  # nothing recorded before it to overwrite
            recorder().add(alias, event.id, subscription.name)
        else:
            # The handler ran: failing to record that must not run it again.
            # A broadcast copy's success never hides another worker's failure of that event.
            row = _row(event, subscription, Delivery.Status.SUCCEEDED, attempt)
            _record_quietly(alias, event, [row], always=False, overwrite=not broadcast)
    return Outcome("succeeded")


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
        run_handler(subscription, event, registry.interceptors, attempt)
        save_deliveries(alias, [_row(event, subscription, Delivery.Status.SUCCEEDED, attempt)])


def _handler_unavailable(
    subscription: Subscription,
    event: Event,
    alias: str,
    attempt: int,
    retries: int,
    exc: HandlerImportError,
) -> Outcome:
    """The handler does not import on this worker: fail the delivery at once, no retry."""
    error = f"{type(exc).__name__}: {exc}"
    logger.error(
        "Delivery failed without retry: subscription %r: %s",
        subscription.name,
        exc,
        extra=log_extra(event, subscription),
    )
    tb = "".join(traceback.format_exception(exc))
    row = _row(event, subscription, Delivery.Status.FAILED, attempt, error, tb)
    if _record_quietly(alias, event, [row], always=True):
        return Outcome("failed", error=exc)
    # As for a handler's failure: retry until the outcome can be recorded.
    return Outcome("retry", retry_in=subscription.retry.delay(retries + 1), error=exc)


def wiring_problems(consumed: Collection[str] | None = None) -> list[tuple[str | None, str]]:
    """What keeps this process from running its async subscriptions: (subscription, problem).

    Configuration errors (subscription ``None``), and async subscriptions on the ``consumed``
    queues (all when ``None``) whose handler does not import. A worker logs them at start.
    """
    registry = get_registry()
    found: list[tuple[str | None, str]] = [
        (None, f"Configuration error: {problem}")
        for problem in registry.problems
        if problem.is_error
    ]
    for subscription in registry.subscriptions.values():
        if subscription.mode != "async":
            continue
        if consumed is not None and subscription.queue not in consumed:
            continue
        where = f"Subscription {subscription.name!r} (queue {subscription.queue!r})"
        try:
            subscription.handler()
        except HandlerImportError as exc:
            found.append(
                (subscription.name, f"{where}: {exc}; its deliveries will fail without retry")
            )
        except Exception as exc:  # noqa: BLE001 - reported; a delivery will raise it again
            path = subscription.declaration.handler
            found.append(
                (
                    subscription.name,
                    f"{where}: handler {path!r} raised on import: {type(exc).__name__}: {exc}",
                )
            )
    return found


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
    _record_quietly(message.alias, event, [row], always=True)
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
) -> str:
    """Save delivery rows; log (not raise) a database error.

    Return `RECORDED`, `OUTAGE` (the database could not be reached: worth a retry) or
    `REFUSED` (it refused the statement, and would again).
    """
    try:
        if always:
            ensure_records(alias, [event], EventRecord.Status.DISPATCHED)
        if overwrite:
            save_deliveries(alias, rows)
        else:
            Delivery.objects.using(alias).bulk_create(rows, ignore_conflicts=True)
    except _OUTAGES:
        logger.exception("Could not record the delivery outcome", extra=log_extra(event))
        return OUTAGE
    except DatabaseError:
        logger.exception(
            "The database refused the delivery outcome; it is not retried",
            extra=log_extra(event),
        )
        return REFUSED
    return RECORDED


def _row(
    event: Event,
    subscription: Subscription,
    status: str,
    attempt: int,
    error: str = "",
    tb: str = "",
) -> Delivery:
    return delivery(event.id, subscription.name, "async", status, attempt, error, tb)
