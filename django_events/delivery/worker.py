"""The worker side of an async delivery, independent of Celery's task machinery."""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    InternalError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)
from django.db.models import QuerySet
from django.utils import timezone

from django_events.delivery import endpoints, ordering, postgresql, webhooks
from django_events.delivery.batching import Answer, recorder
from django_events.delivery.execution import run_handler
from django_events.delivery.failing import judge
from django_events.delivery.failure_logs import log_failure
from django_events.delivery.lost_messages import resend_after
from django_events.delivery.messages import (
    MESSAGE_VERSION,
    DeliveryMessage,
    MalformedMessage,
    event_from_body,
    parse_message,
)
from django_events.delivery.migration_state import lacks_migrations
from django_events.delivery.pausing import ORPHAN_AFTER, paused_names
from django_events.delivery.recording import (
    delivery,
    ensure_records,
    save_deliveries,
    save_unless_finished,
    storable,
)
from django_events.delivery.sealing import Unsealable, open_event
from django_events.events import Event
from django_events.exceptions import NewerVersion, RetryLater, UpcastError
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord
from django_events.signals import send_delivery_failed
from django_events.wiring.compiled import HandlerImportError, Registry, Subscription
from django_events.wiring.declarations import RetryPolicy
from django_events.wiring.redaction import redact_text
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.worker")

# Seconds between tries to save a success while the database cannot be reached (doubling).
RECORD_RETRY_FIRST = 0.1
RECORD_RETRY_MAX = 5.0

# Seconds a retry that ran nothing (the database out of reach for it) waits at least.
RAN_NOTHING_MIN_WAIT = 1.0

# What recording an outcome can come to: the outage of a database is worth waiting out; a
# statement the database refuses (DataError, IntegrityError...) fails the same way each time.
RECORDED, OUTAGE, REFUSED = "recorded", "outage", "refused"
#: `_record_quietly` found the delivery succeeded or resolved: the message was a duplicate.
DUPLICATE = "duplicate"
# InternalError too: PostgreSQL reports an aborted transaction or a crashed backend with it.
_OUTAGES = (OperationalError, InterfaceError, InternalError)


def _is_outage(error: DatabaseError, alias: str) -> bool:
    """Whether ``error`` is worth waiting out: the database unreachable, or not migrated yet
    (a worker started before ``migrate``: SQLite reports that as an `OperationalError` too).
    A missing column or table of a database whose migrations are all applied is no outage:
    nothing would bring it back."""
    if isinstance(error, _OUTAGES):
        return True
    return postgresql.is_unmigrated(error) and lacks_migrations(alias)


@dataclass(frozen=True)
class Outcome:
    """What became of one message: done, or retry after ``retry_in`` seconds."""

    status: str
    retry_in: float | None = None
    error: Exception | None = None
    # The message to retry with, when it is not the same one (a wait that counts no attempt).
    retry_with: Any = None
    # (database alias, event id, subscription) of a retry: the row `defer_retry` marks.
    retry_of: tuple[str, UUID, str] | None = None
    # The run raised RetryLater(counts=False): its retry's message remembers it.
    uncounted: bool = False
    # A retry before the handler ran (the database could not be read or written for it):
    # its run is this attempt again, so max_attempts and the backoff count handler runs only.
    same_attempt: bool = False
    # Why a retry that is not the handler's own is asked for: what the log of a broadcast
    # copy, which is dropped instead, says.
    waits_for: str = ""


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
        # the next one (Celery's Django fixup closes every connection after each task too,
        # unless CELERY_DB_REUSE_MAX is set: check W215).
        close_old_connections()
    return _process(message, retries, batch_success)


def _process(raw: Any, retries: int, batch_success: bool) -> Outcome:
    try:
        message = parse_message(raw)
        attempt = message.attempt(retries)
    except MalformedMessage as exc:
        # Keys only: a payload may hold fields that `redact` keeps out of logs.
        shape = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        logger.error(
            "Rejected a malformed django_events message (%s): %s", exc, shape, extra=log_extra()
        )
        return Outcome("rejected")
    if not message.database_known:  # before anything reads or writes a database for it
        return _wait_for_database(raw, message, retries)
    # What a message given up before its handler runs records: the runs before it (DESIGN:
    # `Delivery.attempts` counts handler runs), as a sync retry records them.
    prior_runs = attempt - 1
    event_name = message.event["name"]
    if message.version != MESSAGE_VERSION:
        return _give_up(
            message,
            prior_runs,
            f"Message format v{message.version} is unknown to this worker (it reads "
            f"v{MESSAGE_VERSION}): deploy the release that sent it, then retry the delivery",
        )
    registry = get_registry()
    subscription: Subscription | None = registry.subscriptions.get(message.subscription)
    if subscription is None and endpoints.is_endpoint_name(message.subscription):
        try:
            subscription = endpoints.find(message.subscription)
        except DatabaseError as exc:  # nothing ran: the endpoint is read again next time
            logger.warning("Cannot read the webhook endpoint: %s", exc, extra=log_extra())
            _close_broken(message.alias)
            retry = Outcome(
                "retry",
                retry_in=RECORD_RETRY_MAX,
                error=exc,
                same_attempt=True,
                waits_for=f"the webhook endpoint could not be read: {exc}",
            )
            return _again(raw, message, retry)
    compiled = registry.events.get(event_name)
    try:
        # Authenticated encryption: what opens was sealed by a publisher with our keys.
        message = replace(message, event=open_event(message.event))
    except Unsealable as exc:
        return _give_up(message, prior_runs, f"Cannot open the event's payload: {exc}")
    if subscription is None or compiled is None:
        what = (
            f"subscription {message.subscription!r}"
            if subscription is None
            else f"event {event_name!r}"
        )
        return _give_up(message, prior_runs, f"Unknown {what}: not declared on this worker")
    if (
        not subscription.receives(event_name)
        if isinstance(subscription, endpoints.EndpointSubscription)
        else subscription not in compiled.async_ and subscription not in compiled.tasks
    ):
        return _give_up(
            message,
            prior_runs,
            f"Subscription {subscription.name!r} does not receive event {event_name!r} "
            "asynchronously on this worker",
        )
    event_message = message.event
    data = event_message["payload"]
    version = event_message.get("version", 1)
    upcast = None
    declared = compiled.declaration
    redact = declared.redact
    if version != declared.version:
        try:
            version = int(version)
            data = compiled.upgrade(data, version, validate=False)  # checked once, below
        except NewerVersion as exc:
            return _wait_for_newer(raw, message, subscription, attempt, retries, exc)
        except UpcastError as exc:
            return _give_up(message, prior_runs, redact_text(str(exc), data, redact))
        except (TypeError, ValueError) as exc:  # int() of a version that is not a number
            return _give_up(message, prior_runs, f"Malformed event in message: version {exc}")
        upcast = (data, declared.version)
    problems = compiled.validator.problems(data, redact)
    if problems:
        return _give_up(message, prior_runs, compiled.payload_error(version, problems))
    try:
        event = event_from_body(event_message, compiled.typed_payload(data), upcast=upcast)
    except (KeyError, TypeError, ValueError) as exc:
        return _give_up(message, prior_runs, f"Malformed event in message: {exc}")
    rerun = message.rerun
    if subscription.name in paused_names(message.alias):
        held = _hold(message, subscription, event, attempt)
        if held is not None:
            return _again(raw, message, held)
        rerun = True  # resumed meanwhile: its row, taken back, waits for the outcome as one resumed
    # A retry or replay has a Delivery row already (pending): its success must replace it.
    batch = batch_success and not rerun
    outcome = _run(
        registry,
        subscription,
        event,
        message.alias,
        attempt,
        retries,
        batch,
        message.uncounted,
        rerun,
    )
    if outcome.uncounted:
        outcome = replace(outcome, retry_with={**raw, "uncounted": message.uncounted + 1})
    return _again(raw, message, outcome)


def _again(raw: dict[str, Any], message: DeliveryMessage, outcome: Outcome) -> Outcome:
    """``outcome`` with the message its retry sends, if that retry ran nothing: one prior
    attempt less, as Celery's (or the task's) retry count adds one. A broadcast copy's
    retry is not sent: it is dropped (`_drop_copy`)."""
    if outcome.retry_in is not None and _is_broadcast(message.subscription):
        return _drop_copy(message, outcome)
    if not outcome.same_attempt:
        return outcome
    # At least a second, as a wait for a newer worker: with `backoff: 0` these retries would
    # spin through the broker while the database is out, and use up the count a message carries.
    wait = max(RAN_NOTHING_MIN_WAIT, outcome.retry_in or 0.0)
    return replace(outcome, retry_in=wait, retry_with=_same_attempt(raw, message))


def _same_attempt(raw: dict[str, Any], message: DeliveryMessage) -> dict[str, Any]:
    return {**raw, "prior_attempts": message.prior_attempts - 1}


def _is_broadcast(name: str) -> bool:
    """Whether ``name`` is a broadcast subscription on this worker."""
    subscription = get_registry().subscriptions.get(name)
    return subscription is not None and subscription.declaration.broadcast


def _this_worker() -> str:
    """This worker process, as a broadcast copy's log and failed row name it."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def _drop_copy(message: DeliveryMessage, outcome: Outcome) -> Outcome:
    """A broadcast copy that would be sent again: a retry goes to the fanout exchange it
    came from, so every worker would get (and run) another copy. It is dropped on this
    worker instead, with an error naming the worker and why (``outcome.waits_for``).
    """
    error = outcome.error
    why = outcome.waits_for or (f"{type(error).__name__}: {error}" if error else outcome.status)
    logger.error(
        "The broadcast copy of subscription %r, event %s %s is dropped on this worker (%s), "
        "not sent again (a retry would reach every worker): %s",
        message.subscription,
        message.event.get("name"),
        message.event.get("id"),
        _this_worker(),
        why,
        extra=_message_log_extra(message),
    )
    return Outcome("failed", error=error)


def _wait_for_newer(
    raw: dict[str, Any],
    message: DeliveryMessage,
    subscription: Subscription,
    attempt: int,
    retries: int,
    exc: NewerVersion,
) -> Outcome:
    """A rolling deploy: the event is newer than this worker. Retry later, run nothing.

    The retried message counts one attempt less, so waiting never uses up ``max_attempts``;
    its `Delivery` row says what it waits for (pending, attempts unchanged). A broadcast
    copy does not wait (its retry would reach every worker again): it is recorded failed.
    """
    if subscription.declaration.broadcast:
        return _give_up(
            message,
            attempt - 1,
            f"Not run on this worker: {exc}. A broadcast copy is not sent again (it would "
            "reach every worker)",
        )
    error = f"Waiting for a newer worker: {exc}"
    extra = _message_log_extra(message)
    logger.warning("%s (event %s)", error, message.event.get("id"), extra=extra)
    try:
        event = event_from_body(message.event)
    except (KeyError, TypeError, ValueError):
        return _give_up(
            message,
            attempt - 1,
            f"Malformed event in message (it waits for a newer worker: {exc})",
        )
    row = _row(
        event,
        subscription,
        Delivery.Status.PENDING,
        attempt - 1,
        error,
        uncounted=message.uncounted,
    )
    keep = _finished_wins(message.rerun, subscription)
    if _record_quietly(message.alias, event, [row], always=True, keep_finished=keep) == DUPLICATE:
        return _duplicate(event, subscription.name)
    delay = max(RAN_NOTHING_MIN_WAIT, subscription.retry.delay(min(retries + 1, 8)))
    waiting = {**_same_attempt(raw, message), "rerun": True}
    return Outcome("waiting", retry_in=delay, error=exc, retry_with=waiting)


class UnknownDatabase(LookupError):
    """A delivery message names a database alias that this process's ``DATABASES`` lacks."""


def _wait_for_database(raw: dict[str, Any], message: DeliveryMessage, retries: int) -> Outcome:
    """The message names a database this worker does not have: run nothing, record nothing.

    The delivery's outcome belongs in that database, next to its event: recorded on another
    one, the event's own log would never see it (the relay would send it again: a second
    run), or it would fail where the tables are not. So the message is sent again for a
    worker that has the database, counting no attempt, as a wait for a newer worker does.
    A broadcast copy is not (its retry would reach every worker again): it is dropped.
    """
    subscription = get_registry().subscriptions.get(message.subscription)
    known = ", ".join(map(repr, settings.DATABASES))
    error = UnknownDatabase(
        f"Database {message.alias!r} is not in this worker's DATABASES ({known})"
    )
    queue = f"queue {subscription.queue!r}" if subscription is not None else "its queue"
    where = (
        f"subscription {message.subscription!r}, event {message.event['name']} "
        f"{message.event.get('id')}"
    )
    fix = (
        f"give this worker the DATABASES of the publishers (with {message.alias!r}), or "
        f"stop it consuming {queue}"
    )
    extra = _message_log_extra(message)
    if subscription is not None and subscription.declaration.broadcast:
        logger.error(
            "%s: the broadcast copy of %s was not run on this worker, and is not sent again; "
            "to fix: %s",
            error,
            where,
            fix,
            extra=extra,
        )
        return Outcome("rejected", error=error)
    policy = subscription.retry if subscription is not None else RetryPolicy()
    delay = max(RAN_NOTHING_MIN_WAIT, policy.delay(min(retries + 1, 8)))
    logger.error(
        "%s: %s not run; sent again in %.3g s for a worker that has it; to fix: %s",
        error,
        where,
        delay,
        fix,
        extra=extra,
    )
    return Outcome("waiting", retry_in=delay, error=error, retry_with=_same_attempt(raw, message))


def _attempts_text(run: int, uncounted: int, max_attempts: int) -> str:
    """Which attempt of ``max_attempts`` run ``run`` is, for the log: ``attempt 2 of 3``, or
    ``run 60, attempt 2 of 3`` once runs did not count (``RetryLater(counts=False)``, a
    replay's runs before it): the run number alone read as an attempt beyond the limit."""
    counted = f"attempt {run - uncounted} of {max_attempts}"
    return f"run {run}, {counted}" if uncounted else counted


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
    try:
        subscription.handler()
    except HandlerImportError as exc:
        # Retrying cannot make a missing module appear: a deploy has to fix it.
        return _handler_unavailable(
            subscription, event, alias, attempt, uncounted, retries, exc, rerun
        )
    if isinstance(subscription, endpoints.EndpointSubscription) and subscription.disabled:
        # Nothing is sent: no attempt counted. Enabling it and retrying sends it.
        disabled = webhooks.WebhookFailed(endpoints.DISABLED, retry=False)
        return _handler_unavailable(
            subscription, event, alias, attempt, uncounted, retries, disabled, rerun
        )
    if subscription.declaration.ordering_key is None:
        return _run_claimed(
            registry, subscription, event, alias, attempt, retries, batch_success, uncounted, rerun
        )
    claimed = _claim_turn(subscription, event, alias, retries)
    if isinstance(claimed, Outcome):
        return claimed
    try:
        return _run_claimed(
            registry,
            subscription,
            event,
            alias,
            attempt,
            retries,
            batch_success,
            uncounted,
            rerun,
            claimed,
        )
    finally:  # the run's lock, unless its finish released it (a failure, a skip, an error)
        ordering.end_run(claimed)


def _run_claimed(
    registry: Registry,
    subscription: Subscription,
    event: Event,
    alias: str,
    attempt: int,
    retries: int,
    batch_success: bool,
    uncounted: int,
    rerun: bool,
    claimed: ordering.Claim | None = None,
) -> Outcome:
    """`_run` once the handler imports and, for an ordered delivery, its turn is ``claimed``."""
    records_all = registry.events[event.name].records_all
    broadcast = subscription.declaration.broadcast
    # A broadcast copy is never retried: a retry would reach every worker again.
    max_attempts = 1 if broadcast else subscription.retry.max_attempts
    ordered = claimed is not None
    key = None if claimed is None else claimed.key  # an ordered delivery's, claim to finish
    run = None if claimed is None else claimed.lock
    started = time.perf_counter()
    try:
        if subscription.declaration.idempotent:
            _run_idempotent(
                registry, subscription, event, alias, attempt, uncounted, records_all, key, run
            )
        else:
            run_handler(subscription, event, registry.interceptors, attempt)
    except _NothingRan as exc:
        outage = exc.outage  # what Celery's retry line shows too
        logger.warning(
            "Cannot reach the database to run the idempotent delivery: %s",
            outage,
            extra=log_extra(event, subscription),
        )
        _close_broken(alias)
        delay = subscription.retry.delay(retries + 1)
        return Outcome(
            "retry",
            retry_in=delay,
            error=outage,
            same_attempt=True,
            waits_for=f"the database could not be reached to run it: {outage}",
        )
    except Exception as exc:  # noqa: BLE001 - any error of user code: logged and recorded
        took = (time.perf_counter() - started) * 1000
        error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        if broadcast:  # one row for every worker's copy: say whose copy failed
            error = f"on {_this_worker()}: {error}"
        verdict = judge(exc, subscription, attempt - uncounted, event.occurred_at, timezone.now())
        final = verdict.final
        # Kept on the row with those before it: a retry sent from the row goes on counting.
        skips_count = verdict.retry_in is not None and not verdict.counted
        if verdict.note:
            error = f"{error} ({verdict.note})"
        response = None
        if isinstance(exc, webhooks.WebhookFailed):  # 410, other 4xx: no retry can succeed
            final, response = final or not exc.retry, exc.response
        status = Delivery.Status.FAILED if final else Delivery.Status.PENDING
        attempts = _attempts_text(attempt, uncounted, max_attempts)
        if isinstance(exc, RetryLater) and not final:
            logger.info(
                "Handler asked for a retry in %gs (%s%s)",
                exc.seconds,
                attempts,
                ", not counted" if skips_count else "",
                extra=log_extra(event, subscription),
            )
        else:
            log_failure(
                logger,
                logging.WARNING,
                event,
                subscription,
                "Handler failed (%s): subscription %r, event %s %s",
                attempts,
                subscription.name,
                event.name,
                event.id,
                exc_info=True,
            )
        delay = (
            subscription.retry.delay(attempt - uncounted)
            if verdict.retry_in is None
            else verdict.retry_in
        )
        retry_in = webhooks.retry_delay(exc, delay, subscription.retry.max_backoff)
        row = _row(
            event,
            subscription,
            status,
            attempt,
            error,
            tb,
            took,
            response,
            uncounted=uncounted + skips_count,
        )
        if not final and (not ordered or subscription.via == "tasks"):
            # The retry goes as a message with a countdown, which a worker killed as it takes
            # it (Redis, the filesystem transport) loses: the row falls due for the relay's
            # retries one threshold after the retry's own time; any outcome written clears it.
            # (An ordered key's first delivery has the relay's own check for a lost message,
            # for Celery's: a task the backend lost or failed has no other.)
            row.retry_at = timezone.now() + timedelta(seconds=retry_in + resend_after())
        recorded = _record_quietly(alias, event, [row], always=True)
        # A final failure nobody can see (the database is down too) would be an event lost:
        # keep retrying until the outcome can be recorded. One the database refuses would be
        # refused at every retry: it is logged (above and by _record_quietly) instead.
        if final and recorded != OUTAGE:
            log_failure(
                logger,
                logging.ERROR,
                event,
                subscription,
                "Delivery failed for good after %d attempt(s)%s: %s; subscription %r, event %s %s",
                attempt - uncounted,
                f" in {attempt} runs" if uncounted else "",
                error,
                subscription.name,
                event.name,
                event.id,
            )
            if recorded == RECORDED:
                _announce_failure(event, row, exc)
            return Outcome("failed", error=exc)
        return Outcome(
            "retry",
            retry_in=retry_in,
            error=exc,
            retry_of=(alias, event.id, subscription.name),
            uncounted=skips_count,
            waits_for=(
                f"its handler failed ({error}) and the failure could not be recorded"
                if final
                else ""
            ),
        )
    took = (time.perf_counter() - started) * 1000
    # A rerun (attempt > 1) updates the failure recorded before, whatever RECORD says.
    # An ordered delivery's success hands its key on: always recorded, at once.
    if (records_all or attempt > 1 or ordered) and not subscription.declaration.idempotent:
        response = webhooks.last_response() if subscription.mode == "webhook" else None
        # A first attempt has no row to overwrite, so it may wait for a batch; not while its
        # database cannot be written: then it is saved here, waiting for the database,
        # rather than piling up in memory where a kill would lose it.
        batch = recorder() if batch_success and attempt == 1 and not ordered else None
        if batch is not None and batch.takes(alias):
            batch.add(alias, event.id, subscription.name, _answer(response), took)
        else:
            # The handler ran: failing to record that must not run it again.
            # A broadcast copy's success never hides another worker's failure of that event.
            row = _row(
                event,
                subscription,
                Delivery.Status.SUCCEEDED,
                attempt,
                duration_ms=took,
                response=response,
                uncounted=uncounted,
            )
            _record_success(
                alias,
                event,
                row,
                overwrite=not broadcast,
                ordered=ordered,
                key=key,
                run=run,
                finish_pending=broadcast and rerun,
            )
    elif rerun and not subscription.declaration.idempotent:
        # A first run sent again (a resumed held delivery) of an event recorded only on
        # failure: its row exists, pending, and must not stay so; none is created.
        _finish_existing(alias, event, subscription, attempt, took)
    return Outcome("succeeded")


def _answer(response: webhooks.Response | None) -> Answer | None:
    """A webhook's answer as its batched success row keeps it (the body made storable)."""
    if response is None:
        return None
    return response.status, response.milliseconds, storable(response.body)


def _write_success_over(rows: QuerySet[Delivery], attempts: int, took: float | None) -> None:
    """Turn the existing delivery rows ``rows`` into a success (no longer due either)."""
    rows.update(
        status=Delivery.Status.SUCCEEDED,
        attempts=attempts,
        last_error="",
        traceback="",
        duration_ms=took,
        retry_at=None,
        updated_at=timezone.now(),
    )


def _finish_existing(
    alias: str, event: Event, subscription: Subscription, attempt: int, took: float
) -> None:
    rows = Delivery.objects.using(alias).filter(event_id=event.id, subscription=subscription.name)
    try:
        _write_success_over(rows, attempt, took)
    except DatabaseError:
        logger.exception("Could not record the delivery outcome", extra=log_extra(event))


def _hold(
    message: DeliveryMessage, subscription: Subscription, event: Event, attempt: int
) -> Outcome | None:
    """Record the delivery held (its subscription is paused); None: resumed meanwhile, run it.

    The message is acknowledged: the ``held`` row is what resuming sends again, in order.
    """
    row = _row(event, subscription, Delivery.Status.HELD, attempt - 1, uncounted=message.uncounted)
    keep = _finished_wins(message.rerun, subscription)
    recorded = _record_quietly(message.alias, event, [row], always=True, keep_finished=keep)
    if recorded == DUPLICATE:
        return _duplicate(event, subscription.name)
    if recorded != RECORDED:
        return Outcome(
            "retry",
            retry_in=subscription.retry.delay(1),
            same_attempt=True,
            waits_for="its subscription is paused, and the held delivery could not be recorded",
        )
    # A resume between the cached read and the row's write would not see this row: it is
    # taken back and run here, unless that resume took it first (and sends it again).
    if subscription.name not in paused_names(message.alias, fresh=True):
        try:
            if _unhold(message.alias, event, subscription):
                return None
        except DatabaseError as exc:
            return _take_back_failed(message.alias, event, subscription, exc)
        logger.info(
            "Subscription resumed meanwhile: the resume sends this delivery again",
            extra=log_extra(event, subscription),
        )
        return Outcome("held")
    logger.info("Subscription paused: delivery held", extra=log_extra(event, subscription))
    return Outcome("held")


def _unhold(alias: str, event: Event, subscription: Subscription) -> bool:
    """Take back the row just recorded held for this delivery: pending, as a resume leaves
    it (False: a resume took it from held meanwhile).

    Due for events_relay's retries one threshold for lost messages on (`resend_after`), as a
    retry's row is: should the update commit and its answer not come back (the connection
    lost after the commit), the worker reads a failure and acknowledges the message, leaving
    the row pending with no message. This run's outcome clears the due time. Not a
    broadcast's: a copy reaches every worker, and none is sent again.
    """
    now = timezone.now()
    broadcast = subscription.declaration.broadcast
    due = None if broadcast else now + timedelta(seconds=resend_after())
    rows = Delivery.objects.using(alias).filter(
        event_id=event.id, subscription=subscription.name, status=Delivery.Status.HELD
    )
    return bool(rows.update(status=Delivery.Status.PENDING, updated_at=now, retry_at=due))


def _take_back_failed(
    alias: str, event: Event, subscription: Subscription, exc: DatabaseError
) -> Outcome:
    """The row of a subscription resumed meanwhile could not be taken back (held -> pending).

    The row stays held and the message is acknowledged: `events_relay`
    (`deliver_orphaned_held`) claims the row from held and sends it once (an ordered key's
    row is handed on by the gate in its turn, or by the relay as the key's first). Retrying
    the message instead would run the handler without claiming the row, and the relay would
    send it again. A take-back that committed all the same (its answer lost with the
    connection) left the row pending and due for the relay's retries (`_unhold`).
    """
    if isinstance(exc, _OUTAGES):
        _close_broken(alias)
    logger.warning(
        "Subscription resumed meanwhile, but its held delivery could not be taken back (%s): "
        "events_relay sends it in %g s",
        exc,
        ORPHAN_AFTER,
        extra=log_extra(event, subscription),
    )
    return Outcome("held")


def _claim_turn(
    subscription: Subscription, event: Event, alias: str, retries: int
) -> Outcome | ordering.Claim:
    """An ordered delivery: its claim if it is its turn, else what became of the message."""
    extra = log_extra(event, subscription)
    try:
        claimed = ordering.claim(alias, event.id, subscription.name)
    except DatabaseError as exc:
        # Nothing ran: try again later, the gate decides then.
        logger.warning("Cannot reach the ordering gate: %s", exc, extra=extra)
        if isinstance(exc, _OUTAGES):
            _close_broken(alias)
        delay = subscription.retry.delay(retries + 1)
        return Outcome(
            "retry",
            retry_in=delay,
            error=exc,
            same_attempt=True,
            waits_for=f"the ordering gate could not be reached: {exc}",
        )
    if claimed.turn is ordering.Turn.HELD:
        logger.info("Held: an earlier delivery of its key is not finished", extra=extra)
        return Outcome("held")
    if claimed.turn is ordering.Turn.DONE:
        logger.info("Already succeeded or resolved; skipped", extra=extra)
        return Outcome("skipped")
    if claimed.turn is ordering.Turn.RUNNING:
        # A copy of the message (a broker's redelivery, the relay's resend) runs nothing now
        # and comes back, counting no attempt: by then the run has finished (the copy is a
        # duplicate) or its worker died (the copy runs). Not acknowledged for good: the broker
        # may have handed the original on already (a visibility timeout), and a lock left
        # behind on a pooled connection would otherwise skip the delivery's retries.
        delay = max(RAN_NOTHING_MIN_WAIT, subscription.retry.delay(retries + 1))
        logger.info(
            "Running on another worker right now: this copy of its message runs nothing and "
            "comes back in %.3g s (subscription %r, event %s %s)",
            delay,
            subscription.name,
            event.name,
            event.id,
            extra=extra,
        )
        return Outcome(
            "retry",
            retry_in=delay,
            same_attempt=True,
            waits_for="its delivery is running on another worker",
        )
    return claimed


def _record_success(
    alias: str,
    event: Event,
    row: Delivery,
    *,
    overwrite: bool,
    ordered: bool = False,
    key: str | None = None,
    run: ordering.RunLock | None = None,
    finish_pending: bool = False,
) -> None:
    """Save a success row; while the database cannot be reached, wait for it and try again.

    Without ``overwrite`` (a broadcast copy) an existing row is kept; with
    ``finish_pending`` (a copy sent again: a resumed hold) a `pending` one is finished.
    ``ordered``: `ordering.finish` records it, with ``key`` and ``run`` as claimed (a run's
    lock goes with a connection the outage closed).

    The handler ran, so its outcome must not be lost, and running it again for a bookkeeping
    error would be worse than holding this worker process: the message stays unacknowledged
    until the row is saved (a worker killed meanwhile has it redelivered, at least once).
    An event record deleted meanwhile is written back, as a failure's is; other database
    errors are logged, not retried.
    """
    extra = log_extra(event, row.subscription)
    delay, waited, restored = RECORD_RETRY_FIRST, False, False
    while True:
        try:
            if ordered:  # the success and the hand-on to the key's next, together
                ordering.finish(alias, event.id, row.subscription, row, key, run)
            elif overwrite:
                save_deliveries(alias, [row])
            else:
                Delivery.objects.using(alias).bulk_create([row], ignore_conflicts=True)
                if finish_pending:
                    pending = Delivery.objects.using(alias).filter(
                        event_id=event.id,
                        subscription=row.subscription,
                        status=Delivery.Status.PENDING,
                    )
                    _write_success_over(pending, row.attempts, row.duration_ms)
        except DatabaseError as exc:
            if not _is_outage(exc, alias):
                if not restored and isinstance(exc, IntegrityError):
                    restored = _restore_record(alias, event)
                    if restored:
                        continue
                logger.exception("Could not record the delivery outcome", extra=extra)
                return
            if not waited:
                logger.error(
                    "Database unreachable (or not migrated yet); the delivery's success is "
                    "saved once it is back: %s",
                    exc,
                    extra=extra,
                )
                waited = True
            _close_broken(alias)
            time.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX)
            continue
        if waited:
            logger.warning("Saved the delivery's success: the database is back", extra=extra)
        return


def _restore_record(alias: str, event: Event) -> bool:
    """Write back the record of ``event`` if it is gone: `events_prune` deleted it while the
    delivery's message waited or its handler ran. Whether it was written."""
    extra = log_extra(event)
    try:
        if EventRecord.objects.using(alias).filter(pk=event.id).exists():
            return False
        ensure_records(alias, [event], EventRecord.Status.DISPATCHED)
    except DatabaseError:
        logger.exception("Could not write back the event's deleted record", extra=extra)
        return False
    logger.warning(
        "The event's record was deleted (events_prune) while its delivery was under way: "
        "written back with the delivery's outcome",
        extra=extra,
    )
    return True


def _close_broken(alias: str) -> None:
    """Close a connection that failed, so that the next query opens a new one."""
    try:
        connections[alias].close()
    except DatabaseError:
        logger.debug(
            "Closing a broken database connection failed", exc_info=True, extra=log_extra()
        )


def defer_retry(outcome: Outcome) -> bool:
    """Leave ``outcome``'s retry, which the broker did not take, to ``events_relay``.

    Marks the pending `Delivery` row with the retry's due time; the relay sends rows whose
    time has come. Returns False if no row could be marked (the caller keeps the message).
    """
    if outcome.retry_of is None or outcome.retry_in is None:
        return False
    extra = _retry_extra(outcome.retry_of)
    try:
        marked, due = _make_retry_due(outcome.retry_of, outcome.retry_in)
    except DatabaseError:
        logger.exception("Could not leave the retry to events_relay", extra=extra)
        return False
    if marked:
        logger.warning(
            "The broker did not take the retry; events_relay sends it from %s",
            due.isoformat(),
            extra=extra,
        )
    return bool(marked)


def keep_retry_due(outcome: Outcome) -> None:
    """Make the `pending` row of ``outcome``'s retry due for events_relay one threshold for
    lost messages (`resend_after`) past the retry's own time, in case its message never runs:
    what a retry's row is written with, but an ordered key's, whose own message comes back if
    its worker dies first (`continuing` runs deliveries that have none). Logged if the
    database cannot take it."""
    if outcome.retry_of is None or outcome.retry_in is None:
        return  # nothing was written: the row keeps the due time it had
    try:
        _make_retry_due(outcome.retry_of, outcome.retry_in + resend_after())
    except DatabaseError:
        logger.warning(
            "Could not make a retry's delivery due for events_relay",
            exc_info=True,
            extra=_retry_extra(outcome.retry_of),
        )


def _make_retry_due(retry_of: tuple[str, UUID, str], seconds: float) -> tuple[int, datetime]:
    """Set the relay due time of the `pending` row ``retry_of`` names ``seconds`` from now:
    how many rows it changed (0 or 1), and that time."""
    alias, event_id, subscription = retry_of
    due = timezone.now() + timedelta(seconds=seconds)
    marked = (
        Delivery.objects.using(alias)
        .filter(event_id=event_id, subscription=subscription, status=Delivery.Status.PENDING)
        .update(retry_at=due)
    )
    return marked, due


def _retry_extra(retry_of: tuple[str, UUID, str]) -> dict[str, Any]:
    _alias, event_id, subscription = retry_of
    return {**log_extra(None, subscription), "event_id": str(event_id)}


class _NothingRan(Exception):
    """The database could not be reached before an idempotent handler ran."""

    def __init__(self, outage: Exception) -> None:
        super().__init__(str(outage))
        self.outage = outage


def _run_idempotent(
    registry: Registry,
    subscription: Subscription,
    event: Event,
    alias: str,
    attempt: int,
    uncounted: int,
    records_all: bool,
    key: str | None = None,
    run: ordering.RunLock | None = None,
) -> None:
    """Run at most once successfully: the handler's writes and the success commit together.

    ``key``, ``run``: an ordered delivery's, as its claim read them. Raises `_NothingRan` if
    the database could not be reached before the handler ran.
    """
    with ExitStack() as transaction_of_run:
        try:
            # The event's record, which the rows below need. Where RECORD keeps failures only
            # it is new: committed before the transaction begins, or every other delivery of
            # the event would wait for this handler to write it.
            if not records_all:
                ensure_records(alias, [event], EventRecord.Status.DISPATCHED)
            # Begun inside the try: a connection refused as the transaction begins (the
            # outage a closed connection meets first) ran nothing either.
            transaction_of_run.enter_context(transaction.atomic(using=alias))
            _keep_record(alias, event, written=not records_all)
            # Insert-or-keep, then lock: a concurrent redelivery waits here for this one.
            running = _row(
                event, subscription, Delivery.Status.RUNNING, attempt - 1, uncounted=uncounted
            )
            Delivery.objects.using(alias).bulk_create([running], ignore_conflicts=True)
            status = (
                Delivery.objects.using(alias)
                .select_for_update()
                .filter(event_id=event.id, subscription=subscription.name)
                .values_list("status", flat=True)
                .get()
            )
        except _OUTAGES as exc:  # a refused statement fails as the handler's failure would
            raise _NothingRan(exc) from exc
        if status == Delivery.Status.SUCCEEDED:
            logger.info(
                "Idempotent delivery already succeeded; skipped",
                extra=log_extra(event, subscription),
            )
            return
        started = time.perf_counter()
        run_handler(subscription, event, registry.interceptors, attempt)
        took = (time.perf_counter() - started) * 1000
        response = webhooks.last_response() if subscription.mode == "webhook" else None
        row = _row(
            event,
            subscription,
            Delivery.Status.SUCCEEDED,
            attempt,
            duration_ms=took,
            response=response,
            uncounted=uncounted,
        )
        save_deliveries(alias, [row])
        if subscription.declaration.ordering_key is not None:
            ordering.finish(alias, event.id, subscription.name, key=key, run=run)


def _keep_record(alias: str, event: Event, *, written: bool) -> None:
    """Make sure the record of ``event`` is there, and stays till this transaction ends.

    `events_prune` deletes it under a message that waited past its in-flight threshold, and,
    on PostgreSQL, whose foreign keys are checked only at commit, under a handler that runs:
    the commit would then fail, after the handler ran. There the record is locked as that
    check locks it, so a prune waits for this run. ``written``: this delivery has just
    committed it (no prune waits that long elsewhere: SQLite has one write lock).
    """
    connection = connections[alias]
    if connection.vendor == "postgresql":
        if not postgresql.share_record(connection, event.id):
            ensure_records(alias, [event], EventRecord.Status.DISPATCHED)
            postgresql.share_record(connection, event.id)
    elif not written:
        ensure_records(alias, [event], EventRecord.Status.DISPATCHED)


def _handler_unavailable(
    subscription: Subscription,
    event: Event,
    alias: str,
    attempt: int,
    uncounted: int,
    retries: int,
    exc: HandlerImportError | webhooks.WebhookFailed,
    rerun: bool,
) -> Outcome:
    """The handler does not import on this worker (or the webhook endpoint is disabled): fail
    the delivery at once, no retry.

    It did not run: the row keeps the runs before this message (``attempt - 1``).
    """
    error = f"{type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(exc))
    runs = attempt - 1
    row = _row(event, subscription, Delivery.Status.FAILED, runs, error, tb, uncounted=uncounted)
    keep = _finished_wins(rerun, subscription)
    recorded = _record_quietly(alias, event, [row], always=True, keep_finished=keep)
    if recorded == DUPLICATE:
        return _duplicate(event, subscription.name)
    logger.error(
        "Delivery failed without retry: subscription %r: %s",
        subscription.name,
        exc,
        extra=log_extra(event, subscription),
    )
    if recorded == RECORDED:
        _announce_failure(event, row, exc)
    if recorded != OUTAGE:
        return Outcome("failed", error=exc)
    # Retry until the outcome can be recorded (the handler did not run: no attempt used).
    delay = subscription.retry.delay(retries + 1)
    return Outcome(
        "retry",
        retry_in=delay,
        error=exc,
        same_attempt=True,
        waits_for=f"its handler does not import ({error}), and the failure could not be recorded",
    )


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
    return found


def queues_left_waiting(consumed: Collection[str], default_queue: str) -> list[str]:
    """The queues of this process's Celery subscriptions, when a worker consumes only
    Celery's default queue (started without ``-Q``) and none of them: no message of theirs
    reaches that worker. Empty otherwise (a worker may well serve other queues only)."""
    ours = {
        s.queue for s in get_registry().subscriptions.values() if s.is_queued and s.via != "tasks"
    }
    if set(consumed) != {default_queue} or default_queue in ours:
        return []
    return sorted(ours)


def _give_up(message: DeliveryMessage, runs: int, error: str) -> Outcome:
    """A poison message: record it as a failed delivery (no retry, nothing imported).

    ``runs``: the handler's runs to record (`Delivery.attempts`), this one included if the
    handler ran. A copy of a subscription this worker declares broadcast is recorded with
    this worker's name, over another worker's success (whatever made it fail here: its
    format, payload, upcasting, version).
    """
    broadcast = _is_broadcast(message.subscription)
    if broadcast:  # one row for every worker's copy: say whose copy failed
        error = f"on {_this_worker()}: {error}"
    extra = _message_log_extra(message)
    logger.error("%s (event %s)", error, message.event.get("id"), extra=extra)
    try:
        event = event_from_body(message.event)
    except (KeyError, TypeError, ValueError):
        logger.error("Cannot record the failure: the message's event is malformed", extra=extra)
        return Outcome("rejected")
    row = delivery(
        event.id,
        message.subscription,
        _mode_of(message.subscription),
        Delivery.Status.FAILED,
        runs,
        error,
        uncounted=message.uncounted,
    )
    # Any other message is treated as one its worker does not declare (nothing of it ran
    # here): an idempotent or ordered subscription's rerun overwrites a finished row as before.
    keep = not broadcast and _finished_wins(message.rerun, None)
    recorded = _record_quietly(message.alias, event, [row], always=True, keep_finished=keep)
    if recorded == DUPLICATE:
        return _duplicate(event, message.subscription)
    if recorded == RECORDED:
        _announce_failure(event, row)
    return Outcome("failed")


def _mode_of(name: str) -> str:
    """The `Delivery.mode` of the subscription ``name``: ``async`` if this worker does not
    declare it (a webhook endpoint's is ``webhook``, whether or not it is still there)."""
    subscription = get_registry().subscriptions.get(name)
    if subscription is not None:
        return subscription.queued_mode
    return "webhook" if endpoints.is_endpoint_name(name) else "async"


def record_stopped_run(raw: Any, retries: int, stop: BaseException) -> None:
    """Record as failed (to retry) the delivery of message ``raw`` whose run ``stop``
    (``SystemExit``, ``KeyboardInterrupt``) ended: its worker is being stopped, and a task
    backend that marks the task failed then never runs it again. Recorded as `_give_up`
    records a message it does not run; one that does not parse is left alone."""
    try:
        message = parse_message(raw)
        attempt = message.attempt(retries)
    except MalformedMessage:
        return
    if not message.database_known:  # its handler never runs here (`_wait_for_database`)
        return
    error = (
        f"Interrupted: the worker was stopped ({type(stop).__name__}) while the handler ran. "
        "Retry it."
    )
    try:
        _give_up(message, attempt, error)
    except Exception:  # the stop is re-raised by the caller whatever happens here
        logger.exception("Could not record the stopped delivery", extra=log_extra())


def _finished_wins(rerun: bool, subscription: Subscription | None) -> bool:
    """Whether a delivery already succeeded or resolved makes this message a duplicate, so that
    a worker that does not run it (paused, unknown here, newer, its handler missing) writes
    nothing over that row (``subscription`` None: not declared here).

    A first send's message is one, but a broadcast copy's: one row stands for every worker's
    copy, and another worker's success never hides this one's failure. A retry's or replay's
    may arrive before the transaction that made its row pending commits (they send inside
    it; the worker's statement, reading the row as finished, does not wait for that one), so
    a finished row is written over; not for ordered subscriptions, whose reruns are sent
    after that commit, nor idempotent ones, which must never run twice: a replay skips their
    successes, and one of a resolved delivery that meets its row still resolved is left
    pending, for the relay to send again (`operations.unfinished`).
    """
    if subscription is not None and subscription.declaration.broadcast:
        return False
    if not rerun:
        return True
    if subscription is None:
        return False
    declared = subscription.declaration
    return declared.idempotent or declared.ordering_key is not None


def _duplicate(event: Event, subscription: str) -> Outcome:
    logger.info(
        "Already succeeded or resolved; the message was a duplicate: skipped (subscription "
        "%r, event %s %s)",
        subscription,
        event.name,
        event.id,
        extra=log_extra(event, subscription),
    )
    return Outcome("skipped")


def _announce_failure(event: Event, row: Delivery, exc: BaseException | None = None) -> None:
    """Send `delivery_failed` for the failed delivery ``row``, once it is saved: its mode,
    attempts and error as recorded."""
    send_delivery_failed(
        event=event,
        event_id=event.id,
        subscription=row.subscription,
        mode=row.mode,
        attempts=row.attempts,
        error=row.last_error,
        exception=exc,
    )


def _message_log_extra(message: DeliveryMessage) -> dict[str, Any]:
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
    alias: str,
    event: Event,
    rows: list[Delivery],
    *,
    always: bool,
    overwrite: bool = True,
    keep_finished: bool = False,
) -> str:
    """Save delivery rows; log (not raise) a database error.

    Return `RECORDED`, `OUTAGE` (the database could not be reached: worth a retry) or
    `REFUSED` (it refused the statement, and would again); with ``keep_finished`` (one row),
    `DUPLICATE` if its delivery had succeeded or was resolved (nothing is written then).
    """
    try:
        if always:
            ensure_records(alias, [event], EventRecord.Status.DISPATCHED)
        if keep_finished:
            (row,) = rows
            if not save_unless_finished(alias, row):
                return DUPLICATE
        elif overwrite:
            save_deliveries(alias, rows)
        else:
            Delivery.objects.using(alias).bulk_create(rows, ignore_conflicts=True)
    except DatabaseError as exc:
        if _is_outage(exc, alias):
            logger.exception("Could not record the delivery outcome", extra=log_extra(event))
            return OUTAGE
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
    duration_ms: float | None = None,
    response: webhooks.Response | None = None,
    *,
    uncounted: int = 0,
) -> Delivery:
    return delivery(
        event.id,
        subscription.name,
        subscription.queued_mode,
        status,
        attempt,
        error,
        tb,
        duration_ms,
        response,
        uncounted,
    )
