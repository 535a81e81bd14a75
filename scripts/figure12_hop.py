"""Figure 12's deliveries under conditions switched block by block in one process
(docs/performance-log.md, "Figure 12 in a full run (2026-12-05)").

    BENCH_REDIS_URL=redis://127.0.0.1:6379/6 .venv/bin/python scripts/figure12_hop.py

Figure 12's first line: ``process_message`` (records on) of its ``async def`` handler against
its sync handler, the same subscriptions and settings as ``python -m benchmarks --only 12``.
Each block runs ``--n`` deliveries of each, under each condition in turn, so that the load of
a shared host drifts alike over all of them:

- ``spread``: the threads where the kernel puts them (figure 12 as it runs);
- ``threads``: the same, with the threads the figures before figure 12 leave in the process
  (the background marker's, after a ``publish()``; an idle ``ThreadPoolExecutor`` worker, as
  ``sync_to_async`` leaves one);
- ``same``: the worker thread and the loop thread both on CPU 0 (the hop is a switch on one CPU);
- ``split``: the worker thread on CPU 0, the loop thread on CPU 1 (every hop crosses CPUs).

Prints, per block and as medians: wall time and CPU time (``/proc/self/task/*/schedstat``, every
thread of the process) a delivery. Needs PostgreSQL, RabbitMQ and Redis on loopback, as the
benchmarks do; creates and drops its own database.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.bench_publish import Context

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness

Sample = tuple[float, float]  # wall, CPU: microseconds a delivery
CONDITIONS = ("spread", "threads", "same", "split")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--n", type=int, default=300, help="deliveries a side in a block")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    args = parser.parse_args()
    conditions = [c for c in args.conditions.split(",") if c]
    if unknown := set(conditions) - set(CONDITIONS):
        parser.error(f"unknown conditions: {', '.join(sorted(unknown))}")

    run_id = uuid.uuid4().hex[:10]
    harness.use_benchmark_settings(run_id)
    import django
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    django.setup()
    from django.db import connection, connections

    from benchmarks.bench_delivery import cleanup
    from benchmarks.bench_publish import Context

    ctx = Context(smoke=False, repeat=1, run_id=run_id)
    server_db = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        _measure(ctx, conditions, args.blocks, args.n)
    finally:
        cleanup(ctx)  # the marker, the run's queue (``threads`` publishes), its Redis keys
        connections.close_all()
        connection.creation.destroy_test_db(server_db, verbosity=0)


def _measure(ctx: Context, conditions: list[str], blocks: int, n: int) -> None:
    from django.db import transaction
    from django.utils import timezone

    from django_events import publish
    from django_events.delivery import marking
    from django_events.delivery.execution import run_coroutine_function
    from django_events.delivery.messages import build_message, event_body
    from django_events.delivery.recording import record_for
    from django_events.delivery.worker import process_message
    from django_events.events import Event
    from django_events.models import EventRecord

    note = f"{ctx.counter}:figure12-hop"

    def messages(kind: str, count: int) -> list[dict[str, Any]]:
        now, events = timezone.now(), list[Event]()
        for i in range(count):
            event_id = uuid.uuid4()
            payload = ctx.payload(i, note)
            events.append(Event(event_id, "bench.handler", {}, {}, now, event_id, None, payload))
        EventRecord.objects.bulk_create(
            [record_for(e, EventRecord.Status.DISPATCHED) for e in events]
        )
        return [build_message(event_body(e), f"bench.handler-{kind}", "default") for e in events]

    def run(batch: list[dict[str, Any]]) -> Sample:
        gc.collect()
        cpu, start = _on_cpu_ns(), time.perf_counter()
        for message in batch:
            outcome = process_message(message, 0)
            if outcome.status != "succeeded":
                raise RuntimeError(f"{message['subscription']}: {outcome}")
        wall = time.perf_counter() - start
        return wall / len(batch) * 1e6, (_on_cpu_ns() - cpu) / len(batch) / 1e3

    run(messages("async", 100))  # warm-up; starts the process's loop thread
    run(messages("sync", 100))
    main_tid = threading.get_native_id()
    loop_tid: int = run_coroutine_function(_thread_id)
    every_cpu = os.sched_getaffinity(0)
    placement = {"same": ({0}, {0}), "split": ({0}, {1})}
    results: dict[str, list[tuple[Sample, Sample]]] = {c: [] for c in conditions}
    for block in range(blocks):
        shift = block % len(conditions)
        for condition in conditions[shift:] + conditions[:shift]:
            batches = {kind: messages(kind, n) for kind in ("async", "sync")}
            executor = None
            if condition == "threads":
                with transaction.atomic():
                    publish("bench.async", ctx.payload())  # starts the marker thread
                marking.flush()
                executor = ThreadPoolExecutor(max_workers=1)
                executor.submit(int).result()
            if condition in placement:
                os.sched_setaffinity(main_tid, placement[condition][0])
                os.sched_setaffinity(loop_tid, placement[condition][1])
            try:
                order = ["async", "sync"] if block % 2 == 0 else ["sync", "async"]
                got = {kind: run(batches[kind]) for kind in order}
            finally:
                os.sched_setaffinity(main_tid, every_cpu)
                os.sched_setaffinity(loop_tid, every_cpu)
                if executor is not None:
                    executor.shutdown()
                    marking.stop()
            results[condition].append((got["async"], got["sync"]))
            (a_wall, a_cpu), (s_wall, s_cpu) = got["async"], got["sync"]
            print(
                f"block {block} {condition:7} async {a_wall:5.0f} us (CPU {a_cpu:4.0f}) | "
                f"sync {s_wall:5.0f} us (CPU {s_cpu:4.0f}) | ratio {a_wall / s_wall:.2f}",
                flush=True,
            )
    print("medians over the blocks:")
    for condition, rows in results.items():
        a_wall, a_cpu = (statistics.median(r[0][i] for r in rows) for i in (0, 1))
        s_wall, s_cpu = (statistics.median(r[1][i] for r in rows) for i in (0, 1))
        print(
            f"  {condition:7} async {a_wall:.0f} / sync {s_wall:.0f} us, ratio "
            f"{a_wall / s_wall:.2f}; CPU {a_cpu:.0f} / {s_cpu:.0f} us, the async handler adds "
            f"{a_cpu - s_cpu:.0f} us  [{len(rows)} blocks of {n}]"
        )
    # Paired within each block (the same minute of the host): each condition against the first.
    first = conditions[0]
    for condition in conditions[1:]:
        pairs = list(zip(results[condition], results[first], strict=True))
        ratio = [_ratio(mine) - _ratio(theirs) for mine, theirs in pairs]
        added = [_added_cpu(mine) - _added_cpu(theirs) for mine, theirs in pairs]
        print(
            f"  {condition} against {first}, block by block: ratio "
            f"{statistics.median(ratio):+.2f} (higher in {sum(r > 0 for r in ratio)} of "
            f"{len(ratio)} blocks), CPU the async handler adds {statistics.median(added):+.0f} us "
            f"(more in {sum(a > 0 for a in added)} of {len(added)})"
        )


def _ratio(block: tuple[Sample, Sample]) -> float:
    return block[0][0] / block[1][0]


def _added_cpu(block: tuple[Sample, Sample]) -> float:
    return block[0][1] - block[1][1]


async def _thread_id() -> int:
    return threading.get_native_id()


def _on_cpu_ns() -> int:
    """Nanoseconds every thread of this process alive now has run (the kernel's schedstat)."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total


if __name__ == "__main__":
    main()
