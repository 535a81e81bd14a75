"""Async Django and Django's Tasks: figures 10, 11 and 12."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, connections, transaction
from django.utils import timezone

from django_events import apublish, publish, publish_many
from django_events.delivery.broker import build_message
from django_events.delivery.execution import run_coroutine_function
from django_events.delivery.messages import event_body
from django_events.delivery.recording import record_for
from django_events.delivery.worker import process_message
from django_events.events import Event
from django_events.models import EventRecord

from . import handlers
from .bench_delivery import (
    _redis,
    _until_counted,
    _until_recorded,
    analyze_tables,
    fresh_tables,
)
from .bench_publish import Context
from .harness import Baseline, Comparison, Target, compare, per_op

ROOT = Path(__file__).resolve().parent.parent


def figure_10(ctx: Context) -> Comparison:
    """apublish() in an event loop against the obvious hand-written sync_to_async(publish)."""
    n = ctx.count(2000)
    payload = ctx.payload()
    wrapped = sync_to_async(publish)

    # Both run publish() in asgiref's thread for sync code: its connection is closed after
    # each run, or the runner could not drop the database at the end.
    close = sync_to_async(connections.close_all)

    async def ours_loop(count: int) -> None:
        for _ in range(count):
            await apublish("bench.sync", payload)
        await close()

    async def baseline_loop(count: int) -> None:
        for _ in range(count):
            await wrapped("bench.sync", payload)
        await close()

    return compare(
        "10",
        "apublish() in an event loop, one sync subscription, outside a transaction",
        "us",
        lambda: per_op(lambda c: asyncio.run(ours_loop(c)), n),
        [
            Baseline(
                "sync_to_async(publish)",
                lambda: per_op(lambda c: asyncio.run(baseline_loop(c)), n),
                Target(1.1),
            )
        ],
        ctx.repeat,
    )


@contextmanager
def _db_worker(
    queues: list[str], extra_env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        **(extra_env or {}),
        "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
        "BENCH_WORKER": "1",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "django", "db_worker", "--queue-name", ",".join(queues)]
    command += ["--interval", "0.01", "--no-reload", "--no-startup-delay", "--verbosity", "0"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _truncate_tasks() -> None:
    from django_tasks_db.models import DBTaskResult

    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {connection.ops.quote_name(DBTaskResult._meta.db_table)}")


def figure_11(ctx: Context) -> Comparison:
    """Publish to handler done through django-tasks-db and one db_worker, against a raw
    django.tasks task doing the same work, enqueued the same way on the same worker."""
    from .tasks import raw_count

    n = ctx.count(1000)
    client = _redis()
    runs = iter(range(1_000_000))
    raw_task = raw_count.using(queue_name=settings.RAW_TASKS_QUEUE)

    def key() -> str:
        return f"{ctx.counter}:tasks:{next(runs)}"

    published = 0

    def ours(count: int = n) -> float:
        nonlocal published
        note = key()
        start = time.perf_counter()
        for first in range(0, count, 100):
            with transaction.atomic():
                publish_many(
                    ("bench.tasks", ctx.payload(i, note))
                    for i in range(first, min(first + 100, count))
                )
        _until_counted(client, note, count, timeout=60 + count / 10)
        rate = count / (time.perf_counter() - start)
        published += count
        # Untimed: batched success rows are all written before the next run starts.
        _until_recorded(published, timeout=60)
        return rate

    def raw(count: int = n) -> float:
        note = key()
        start = time.perf_counter()
        for first in range(0, count, 100):
            with transaction.atomic():
                for i in range(first, min(first + 100, count)):
                    raw_task.enqueue(ctx.payload(i, note))
        _until_counted(client, note, count, timeout=60 + count / 10)
        return count / (time.perf_counter() - start)

    def line(title: str, env: dict[str, str]) -> Comparison:
        nonlocal published
        _truncate_tasks()
        fresh_tables()
        published = 0
        try:
            with _db_worker([settings.TASKS_QUEUE, settings.RAW_TASKS_QUEUE], env):
                ours(min(n, 50))  # warm-up: the worker's start, imports, connections
                raw(min(n, 50))
                analyze_tables()
                return compare(
                    "11",
                    f"end to end via tasks, django-tasks-db + one db_worker, records on, {title}",
                    "events/s",
                    ours,
                    [Baseline("raw django.tasks task", raw, Target(0.8, higher=True))],
                    ctx.repeat,
                )
        finally:
            _truncate_tasks()

    # The default (success rows batched), then each success row written as its task ends.
    judged = line("default settings (success rows batched)", {})
    immediate = line("SUCCESS_RECORDS immediate", {"BENCH_SUCCESS_RECORDS": "immediate"})
    return Comparison(judged.met, judged.ours, judged.baselines + immediate.baselines)


def figure_12(ctx: Context) -> bool:
    """An async def handler's delivery on a worker against a sync handler doing the same work;
    then the process's one event loop against asyncio.run() per delivery."""
    n = ctx.count(1000)
    runs = iter(range(1_000_000))

    def messages(subscription: str, count: int) -> list[dict[str, Any]]:
        note, now = f"{ctx.counter}:handler:{next(runs)}", timezone.now()
        events = []
        for i in range(count):
            event_id = uuid.uuid4()
            events.append(
                Event(event_id, "bench.handler", {}, {}, now, event_id, None, ctx.payload(i, note))
            )
        EventRecord.objects.bulk_create(
            [record_for(e, EventRecord.Status.DISPATCHED) for e in events]
        )
        return [build_message(event_body(e), subscription, "default") for e in events]

    def deliveries(subscription: str) -> Any:
        def measure() -> float:
            batch = messages(subscription, n)  # untimed: the records a publisher wrote
            gc.collect()
            start = time.perf_counter()
            for message in batch:
                outcome = process_message(message, 0)
                if outcome.status != "succeeded":
                    raise RuntimeError(f"{subscription}: {outcome}")
            return (time.perf_counter() - start) / n * 1e6

        return measure

    handlers_met = compare(
        "12",
        "one delivery on a worker (process_message, records on): async def handler",
        "us",
        deliveries("bench.handler-async"),
        [Baseline("the same work, sync handler", deliveries("bench.handler-sync"), Target(1.2))],
        ctx.repeat,
    )

    event = Event(uuid.uuid4(), "bench.handler", {}, {}, timezone.now(), uuid.uuid4(), None, {})
    event_note = ctx.payload(0, f"{ctx.counter}:loop")
    event = Event(event.id, event.name, {}, {}, event.occurred_at, event.id, None, event_note)

    def one_loop(count: int) -> None:
        for _ in range(count):
            run_coroutine_function(handlers.acount, event)

    def new_loops(count: int) -> None:
        for _ in range(count):
            asyncio.run(handlers.acount(event))

    loop_met = compare(
        "12",
        "running an async def handler from a worker: one event loop per process",
        "us",
        lambda: per_op(one_loop, n),
        [Baseline("asyncio.run() per delivery", lambda: per_op(new_loops, n), Target(1.0))],
        ctx.repeat,
    )
    return bool(handlers_met) and bool(loop_met)
