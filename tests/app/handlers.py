"""Handlers the tests subscribe; each leaves a HandlerRun row so tests can see it ran."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from io import StringIO
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.db import connection, transaction

from django_events import Event, PermanentFailure, RetryLater, current_event, publish
from django_events.interceptors import context

from .models import HandlerRun


def _run(name: str, event: Event, payload: dict[str, object] | None = None) -> HandlerRun:
    return HandlerRun.objects.create(
        handler=name,
        event_id=event.id,
        event_name=event.name,
        payload=event.data if payload is None else payload,
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        pid=os.getpid(),
    )


def record(event: Event) -> None:
    _run("record", event)


def record_other(event: Event) -> None:
    _run("record_other", event)


def record_connection(event: Event) -> None:
    """Record which PostgreSQL connection ran the handler: its server process and its start."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        pid, started = cursor.fetchone()
    _run("record_connection", event, {"backend_pid": pid, "backend_start": started})


def hang_once(event: Event) -> None:
    """Record a run; on the first run for this event, announce it and hang (``hang`` s)."""
    _run("hang_once", event)
    _hang_first_time("hang_once", event)


def hang_plain(event: Event) -> None:
    _run("hang_plain", event, {**event.data, **_how_delivered()})
    _hang_first_time("hang_plain", event)


def _how_delivered() -> dict[str, object]:
    """How this run's message came (the soak attributes duplicate runs with it)."""
    from celery import current_task

    request = getattr(current_task, "request", None)
    if request is None or not request.args:
        return {}
    message = request.args[0] if isinstance(request.args[0], dict) else {}
    info = request.delivery_info or {}
    return {
        "redelivered": bool(info.get("redelivered")),
        "retries": request.retries or 0,
        "rerun": bool(message.get("rerun")),
        "prior": message.get("prior_attempts", 0),
        "task_id": request.id,
    }


def _hang_first_time(name: str, event: Event) -> None:
    """Leave ``<DJANGO_EVENTS_FAULT_DIR>/<event id>-<name>`` holding our pid, then sleep.

    The file is created exclusively, so a redelivered message runs straight through.
    """
    seconds = event.data.get("hang")
    if not seconds:
        return
    marker = Path(os.environ["DJANGO_EVENTS_FAULT_DIR"]) / f"{event.id}-{name}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(seconds)


def note_run(event: Event) -> None:
    """Leave a file per run in ``<DJANGO_EVENTS_FAULT_DIR>/runs`` (the database untouched)."""
    folder = Path(os.environ["DJANGO_EVENTS_FAULT_DIR"]) / "runs"
    folder.mkdir(exist_ok=True)
    (folder / f"{event.id}.{os.getpid()}.{time.monotonic_ns()}").touch()


def stops_on_note(event: Event) -> None:
    """Record the run; a payload with ``note: stop`` then ends the process (SystemExit)."""
    _run("stops_on_note", event)
    if event.payload.get("note") == "stop":
        raise SystemExit("stopped by the test handler")


def retries_the_rest(event: Event) -> None:
    """Note ``retry``: run a second ``events_retry`` of this subscription from inside this
    handler, as a second operator at the same moment would, then succeed. Otherwise fail."""
    _run("retries_the_rest", event)
    if event.payload.get("note") != "retry":
        raise RuntimeError(f"fails for {event.payload.get('order_id')}")
    call_command("events_retry", "--subscription", "shop-racer", stdout=StringIO())


def relays_meanwhile(event: Event) -> None:
    """Run a pass of the relay while this delivery runs, as events_relay on a schedule may;
    note how many due deliveries it sent (``retried``)."""
    from django_events.operations.relay import relay_pending

    retried = relay_pending(min_age=10).retried  # not the records whose send is under way
    _run("relays_meanwhile", event, {**event.data, "retried": retried})


def always_fails(event: Event) -> None:
    _run("always_fails", event)
    raise RuntimeError(f"boom for {event.payload.get('order_id')}")


def fails_quoting_payload(event: Event) -> None:
    """Fail with an error that quotes the whole payload, as JSON (redacted fields included)."""
    _run("fails_quoting_payload", event)
    raise RuntimeError(f"boom {json.dumps(event.data)}")


def fails_with_unstorable_text(event: Event) -> None:
    """Fail with an error text PostgreSQL cannot store as is (NUL, a lone surrogate)."""
    _run("fails_with_unstorable_text", event)
    raise RuntimeError(f"bad\x00byte \udc80 in {event.payload.get('file')}")


def retry_later(event: Event) -> None:
    """Ask for a retry (``seconds``, ``counts``) on the first ``times`` runs, then succeed
    (or raise, with ``then_fail``)."""
    _run("retry_later", event)
    done = HandlerRun.objects.filter(handler="retry_later", event_id=event.id).count()
    if done <= event.data["times"]:
        raise RetryLater(event.data.get("seconds", 0.2), counts=event.data.get("counts", True))
    if event.data.get("then_fail"):
        raise RuntimeError(f"failed after {done - 1} retries asked for")


def permanent_failure(event: Event) -> None:
    _run("permanent_failure", event)
    raise PermanentFailure(f"customer {event.data['n']} does not exist")


def fails_quoting_email(event: Event) -> None:
    """Fails with an error that quotes the payload's email (a field orders.placed redacts)."""
    raise ValueError(f"cannot mail {event.data['email']}")


def inline_fails(event: Event) -> None:
    raise ValueError("inline handler refused the order")


def inline_hook_fails(event: Event) -> None:
    """An inline handler whose own on_commit hook raises (not robust: Django's default)."""

    def fail() -> None:
        raise RuntimeError("the inline handler's hook failed")

    transaction.on_commit(fail)


def chain_next(event: Event) -> None:
    """Publishes a follow-up event from inside a handler (a handler chain)."""
    _run("chain_next", event)
    publish("orders.shipped", {"order_id": event.data["order_id"]})


def chain_next_atomically(event: Event) -> None:
    """Publishes a follow-up event inside its own transaction (sent when that commits)."""
    _run("chain_next", event)
    with transaction.atomic():
        publish("orders.shipped", {"order_id": event.data["order_id"]})


class ClassHandler:
    instances = 0

    def __init__(self) -> None:
        type(self).instances += 1

    def handle(self, event: Event) -> None:
        _run("class_handler", event)


not_callable = 42


def takes_no_event() -> None:
    """Takes no argument: it cannot be called with the event (django_events.E207)."""


def forward(event: Event) -> None:
    """A handler chain: note the context values, publish the next of ``payload["steps"]``."""
    steps = event.data.get("steps", [])
    _run("forward", event, {**event.data, "context": context.values()})
    if steps:
        publish(steps[0], {"steps": steps[1:]})


def record_worker(event: Event) -> None:
    """Note which worker (``DJANGO_EVENTS_TEST_WORKER``) ran the handler."""
    _run("record_worker", event, {"worker": os.environ.get("DJANGO_EVENTS_TEST_WORKER", "")})


def record_worker_retrying(event: Event) -> None:
    """`record_worker`, then ask for a retry on the worker the payload names (``retry_on``)."""
    record_worker(event)
    if os.environ.get("DJANGO_EVENTS_TEST_WORKER") == event.data["retry_on"]:
        raise RetryLater(0.2)


def _fails_first_time(name: str, event: Event) -> None:
    """Fails on its first run for an event, succeeds on later ones (state in the database)."""
    first = not HandlerRun.objects.filter(handler=name, event_id=event.id).exists()
    _run(name, event)
    if first:
        raise RuntimeError(f"{name}: first run for order {event.data.get('order_id')} fails")


def fails_first_time(event: Event) -> None:
    _fails_first_time("fails_first_time", event)


def fails_first_time_sync(event: Event) -> None:
    _fails_first_time("fails_first_time_sync", event)


async def _arun(name: str, event: Event) -> None:
    """Record a run from async code, after really suspending (the body must have run)."""
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    current = current_event()
    await HandlerRun.objects.acreate(
        handler=name,
        event_id=event.id,
        event_name=event.name,
        payload={
            **event.data,
            "loop": id(loop),
            "current": str(current.id) if current else None,
        },
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        pid=os.getpid(),
    )


async def record_async(event: Event) -> None:
    await _arun("record_async", event)


async def fails_async(event: Event) -> None:
    await _arun("fails_async", event)
    raise RuntimeError(f"async boom for {event.data.get('order_id')}")


class AsyncClassHandler:
    async def handle(self, event: Event) -> None:
        await _arun("async_class", event)


def returns_coroutine(event: Event) -> Any:
    """A plain callable around an async function: its coroutine must still run."""
    return _arun("returns_coroutine", event)


def record_failed_signal(sender: str, **kwargs: object) -> None:
    """A ``delivery_failed`` receiver: one HandlerRun row per signal."""
    event = kwargs["event"]
    assert isinstance(event, Event)
    exception = kwargs["exception"]
    _run(
        "delivery_failed",
        event,
        {
            "subscription": sender,
            "attempts": kwargs["attempts"],
            "mode": kwargs["mode"],
            "error": kwargs["error"],
            "exception": type(exception).__name__ if exception is not None else None,
        },
    )


def ordered_step(event: Event) -> None:
    """Sleep 0-20 ms and record the run with its start and end (monotonic across processes:
    time.time); a payload with ``fail: true`` raises instead, until a file named after its
    ``account`` appears in the folder DJANGO_EVENTS_ORDERING_FIXED names (the fix deployed)."""
    fixed = os.environ.get("DJANGO_EVENTS_ORDERING_FIXED")
    if event.data.get("fail") and not (fixed and Path(fixed, event.data["account"]).exists()):
        raise RuntimeError(f"failing on purpose: {event.data['account']} #{event.data['n']}")
    start = time.time()
    time.sleep(random.uniform(0, 0.02))
    _run("ordered_step", event, {**event.data, "start": start, "end": time.time()})


# Concurrent runs in one test process (threads, each with its own database connection): each
# run of `gated` is noted in GATED (its event, its connection's backend pid on PostgreSQL,
# whether it ended), and the n-th run (from 0) waits until GATES[n] is set, if there is one.
GATED: list[dict[str, Any]] = []
GATES: list[threading.Event] = []
_gated_lock = threading.Lock()


def gated(event: Event) -> None:
    pid = None
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
    run: dict[str, Any] = {"event": str(event.id), "pid": pid, "ended": False}
    with _gated_lock:
        n = len(GATED)
        GATED.append(run)
    if n < len(GATES) and not GATES[n].wait(30):
        raise RuntimeError(f"gated run {n} was never let through")
    run["ended"] = True
