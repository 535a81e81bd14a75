"""Through real brokers and real `celery worker` processes: figures 4, 6 and 7."""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone
from django_celery_outbox.models import CeleryOutbox
from kombu import Connection, Producer, Queue

from django_events import publish, publish_many
from django_events.delivery import marking
from django_events.delivery.messages import build_message, event_body
from django_events.delivery.recording import delivery, record_for, save_deliveries
from django_events.events import Event
from django_events.models import Delivery, EventRecord, OrderingGate
from django_events.operations.relay import relay_pending
from tests.worker import WorkerProcess

from . import celery_app
from .bench_publish import Context
from .harness import Baseline, Comparison, Target, compare, single
from .models import HandOutbox, Order

_queues: dict[str, set[str]] = {"amqp": set(), "redis": set()}
# Tasks a worker process runs on one database connection (Celery's CELERY_DB_REUSE_MAX):
# without it Celery's Django fixup closes the connection before and after every task.
REUSE = 1000


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


@contextmanager
def _wiring(ctx: Context, kind: str, queue: str, app: str = "") -> Iterator[None]:
    """Our async subscription on ``queue`` of broker ``kind`` (through Celery app ``app`` of
    benchmarks/celery_app.py, by default the one named ``kind``)."""
    _queues[kind].add(queue)
    value = {
        **settings.DJANGO_EVENTS,
        "CELERY_APP": f"benchmarks.celery_app.{app or kind}",
        "DEFAULT_QUEUE": queue,
    }
    with override_settings(DJANGO_EVENTS=value):
        yield


@contextmanager
def _worker(
    ctx: Context,
    kind: str,
    queues: list[str],
    reuse: int = REUSE,
    flush: bool = True,
    success: str = "",
) -> Iterator[WorkerProcess]:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-worker-{kind}-"))
    worker = WorkerProcess(
        kind,
        ",".join(queues),
        connection.settings_dict["NAME"],
        folder / "worker.log",
        extra_env={
            "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
            "BENCH_WORKER": "1",
            "BENCH_DB_REUSE_MAX": str(reuse),
            "BENCH_WORKER_SYNCHRONOUS_COMMIT": "on" if flush else "off",
            "BENCH_SUCCESS_RECORDS": success,
            # What the worker sends itself (an ordered delivery's hand-on to the next one of
            # its key) goes to its broker and its first queue, as the publisher's would.
            "BENCH_CELERY_APP": f"benchmarks.celery_app.{kind}",
            "BENCH_QUEUE": queues[0],
        },
        app=f"benchmarks.celery_app:{kind}",
    )
    with worker:
        yield worker


def _publish_events(
    ctx: Context, count: int, note: str, chunk: int = 100, event: str = "bench.async"
) -> None:
    for start in range(0, count, chunk):
        items = [(event, ctx.payload(i, note)) for i in range(start, start + chunk)]
        with transaction.atomic():
            publish_many(items[: count - start])


def _until_counted(client: redis.Redis, key: str, count: int, timeout: float) -> None:
    def done() -> bool:
        return int(client.get(key) or 0) >= count

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {int(client.get(key) or 0)} of {count} handled in time")
        time.sleep(0.005)


def _until_recorded(count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while Delivery.objects.count() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{Delivery.objects.count()} of {count} deliveries recorded")
        time.sleep(0.01)


def figure_4(ctx: Context) -> bool:
    """Publish to handler done, prefork -c 2, against raw Celery on the same worker.

    Judged with the default settings (success rows batched); ``SUCCESS_RECORDS =
    "immediate"`` (each success row written before the message is acknowledged) is printed for
    context, with the floor that holds it back.
    """
    # The judged lines run 3,000 events a repetition: at 1,000 (a second or so) one stall of
    # the shared host swung a median by a tenth; the context lines keep 1,000.
    results = [
        _end_to_end(ctx, "amqp", events=3000),
        _end_to_end(ctx, "redis", events=3000),
    ]
    _end_to_end(ctx, "amqp", success="immediate")
    _end_to_end(ctx, "redis", success="immediate")
    if not ctx.smoke:  # context, not the target:
        # Celery's default: a new connection per task
        _end_to_end(ctx, "amqp", reuse=0)
        # the worker's commits not waiting for the disk
        _end_to_end(ctx, "amqp", flush=False, success="immediate")
    _orm_handler(ctx)  # a handler that writes a row: Celery's connection per task (W215)
    # The floor: the database write each delivery record needs, and where the CPU goes
    # (the publisher, the worker and the PostgreSQL server share 2 cores).
    write_ms = _record_write_ms(ctx)
    print(
        f" 4. floor: one delivery record (INSERT ... ON CONFLICT + commit) on this PostgreSQL "
        f"{write_ms:.2f} ms; CPU per event, {_CPU_PARTS}: "
        + "; ".join(
            f"{kind} ours {_cpu_text(cpu['ours'])}, raw {_cpu_text(cpu['raw'])}"
            for kind, cpu in _cpu.items()
        ),
        flush=True,
    )
    return all(results)


_CPU_PARTS = (
    "publisher / worker (all processes) / PostgreSQL server / RabbitMQ and Redis servers, ms"
)
# Milliseconds of CPU per event of each part of _CPU_PARTS, in that order.
CpuSample = tuple[float, ...]
_cpu: dict[str, dict[str, list[CpuSample]]] = {}
# The servers both sides use: RabbitMQ's Erlang VM and Redis (a broker, and the handlers'
# counter). Read whole: another run's use of them in the meantime counts too.
_SERVERS = ("beam.smp", "redis-server")


def _cpu_text(samples: list[CpuSample]) -> str:
    parts = [statistics.median(s[i] for s in samples) for i in range(len(samples[0]))]
    return f"{sum(parts):.2f} ({' / '.join(f'{p:.2f}' for p in parts)})"


def _server_pids() -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in _SERVERS:
                pids.append(int(comm.parent.name))
        except OSError:
            continue  # a process that ended meanwhile
    return pids


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a process that ended meanwhile
        seconds[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def _cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent in between by the processes alive at both ends."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def _postmaster() -> int:
    """The PostgreSQL server's first process: the parent of this connection's backend."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])


PgCpu = tuple[dict[int, float], float]


def _pg_cpu(postmaster: int) -> PgCpu:
    """CPU seconds of each PostgreSQL server process now (the postmaster, its backends and
    background workers), and what its children that ended took (their whole lives: Linux
    adds a child's CPU to its parent's when the parent reaps it)."""
    pids = [postmaster, *_children(postmaster)]
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    return _cpu_seconds(pids), (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _pg_cpu_delta(before: PgCpu, after: PgCpu) -> float:
    """CPU seconds the PostgreSQL server spent in between, read whole, as RabbitMQ and Redis
    are: backends that a worker opened or closed meanwhile (Celery reconnects every
    `REUSE` tasks) count too."""
    (then, reaped_then), (now, reaped_now) = before, after
    alive = sum(seconds - then.get(pid, 0.0) for pid, seconds in now.items())
    before_they_ended = sum(seconds for pid, seconds in then.items() if pid not in now)
    return alive + (reaped_now - reaped_then) - before_they_ended


@contextmanager
def _cpu_per_event(worker: WorkerProcess, count: int, into: list[CpuSample]) -> Iterator[None]:
    """CPU time per event of the publisher, the worker's processes, the PostgreSQL server
    and the RabbitMQ and Redis servers."""
    assert worker.process is not None
    groups = [[worker.process.pid, *_children(worker.process.pid)], _server_pids()]
    postmaster = _postmaster()
    start, before = time.process_time(), [_cpu_seconds(pids) for pids in groups]
    pg_before = _pg_cpu(postmaster)
    yield
    publisher = time.process_time() - start
    pg_seconds = _pg_cpu_delta(pg_before, _pg_cpu(postmaster))
    worker_seconds, servers = (
        _cpu_delta(then, _cpu_seconds(pids)) for then, pids in zip(before, groups, strict=True)
    )
    seconds = (publisher, worker_seconds, pg_seconds, servers)
    into.append(tuple(s / count * 1000 for s in seconds))


def _record_write_ms(ctx: Context) -> float:
    """Median time of the write that records one successful delivery (autocommit)."""
    count = ctx.count(300)
    now = timezone.now()
    events = [
        Event(i, "bench.async", {}, {}, now, i, None, {})
        for i in (uuid.uuid4() for _ in range(count))
    ]
    EventRecord.objects.bulk_create([record_for(e, EventRecord.Status.DISPATCHED) for e in events])
    times = []
    for event in events:
        start = time.perf_counter()
        save_deliveries("default", [delivery(event.id, "bench", "async", "succeeded", 1)])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _end_to_end(
    ctx: Context,
    kind: str,
    reuse: int = REUSE,
    flush: bool = True,
    success: str = "",
    events: int = 1000,
) -> Comparison:
    n = ctx.count(events)
    fresh_tables()
    client = _redis()
    variant = f"{kind}-{reuse}-{int(flush)}-{success or 'default'}"
    ours_queue = f"bench-e2e-{ctx.run_id}-{variant}"
    raw_queue = f"bench-raw-{ctx.run_id}-{variant}"
    _queues[kind].add(raw_queue)
    app = celery_app.APPS[kind]
    runs = iter(range(1_000_000))

    cpu: dict[str, list[CpuSample]] = {"ours": [], "raw": []}
    if reuse and flush:  # one CPU line per broker and setting: not the other context lines
        _cpu[f"{kind} {success or 'default'}"] = cpu

    def ours(count: int = n, measured: bool = True) -> float:
        key = f"{ctx.counter}:e2e:{ours_queue}:{next(runs)}"
        recorded = Delivery.objects.count() + count
        with _cpu_per_event(worker, count, cpu["ours"] if measured else []):
            start = time.perf_counter()
            _publish_events(ctx, count, key)
            _until_counted(client, key, count, timeout=60 + count / 20)
            elapsed = time.perf_counter() - start
        # Untimed: batched rows still on their way must not land in the next run's figures.
        _until_recorded(recorded, timeout=30)
        return count / elapsed

    def raw(count: int = n, measured: bool = True) -> float:
        key = f"{ctx.counter}:e2e:{ours_queue}:{next(runs)}"
        with _cpu_per_event(worker, count, cpu["raw"] if measured else []):
            start = time.perf_counter()
            with app.producer_or_acquire() as producer:
                for i in range(count):
                    app.send_task(
                        celery_app.RAW_TASK,
                        args=(ctx.payload(i, key),),
                        queue=raw_queue,
                        producer=producer,
                    )
            _until_counted(client, key, count, timeout=60 + count / 20)
            elapsed = time.perf_counter() - start
        return count / elapsed

    records = "records on, " + (
        f"SUCCESS_RECORDS {success}" if success else "default settings (success rows batched)"
    )
    connections = "connections reused" if reuse else "Celery default: connect per task"
    if not flush:
        connections += ", worker synchronous_commit=off"
    with (
        _wiring(ctx, kind, ours_queue),
        _worker(ctx, kind, [ours_queue, raw_queue], reuse, flush, success) as worker,
    ):
        ours(min(n, 50), measured=False)  # warm-up: imports, connections, the registry
        raw(min(n, 50), measured=False)
        analyze_tables()
        return compare(
            "4",
            f"end to end, prefork -c 2, {kind}, {records}, {connections}",
            "events/s",
            ours,
            [Baseline("raw Celery task", raw, Target(0.85, higher=True))],
            ctx.repeat,
        )


def _orm_handler(ctx: Context) -> None:
    """Figure 4's context for check W215: a handler that writes a row (as most handlers use
    the ORM), on a worker with Celery's default, a database connection a task, against one
    that keeps its connections (``CELERY_DB_REUSE_MAX``). Both workers run throughout, each
    on its own queue; the sides alternate."""
    n = ctx.count(600)
    fresh_tables()
    client = _redis()
    runs = iter(range(1_000_000))
    queues = {reuse: f"bench-orm-{ctx.run_id}-{reuse}" for reuse in (0, REUSE)}

    def side(reuse: int) -> Callable[..., float]:
        def run(count: int = n) -> float:
            key = f"{ctx.counter}:orm:{reuse}:{next(runs)}"
            recorded = Delivery.objects.count() + count
            with _wiring(ctx, "amqp", queues[reuse]):
                start = time.perf_counter()
                _publish_events(ctx, count, key, event="bench.orm")
                _until_counted(client, key, count, timeout=60 + count / 10)
                elapsed = time.perf_counter() - start
            _until_recorded(recorded, timeout=30)  # untimed, as figure 4's other lines
            return count / elapsed

        return run

    with (
        _worker(ctx, "amqp", [queues[0]], reuse=0),
        _worker(ctx, "amqp", [queues[REUSE]], reuse=REUSE),
    ):
        for reuse in queues:
            side(reuse)(min(n, 20))  # warm-up: imports, connections, the registry
        compare(
            "4",
            "end to end, prefork -c 2, amqp, default settings, a handler that writes a row "
            "(context, check W215): Celery default: connect per task",
            "events/s",
            side(0),
            [
                Baseline(
                    "connections kept (CELERY_DB_REUSE_MAX)", side(REUSE), Target(0, higher=True)
                )
            ],
            ctx.repeat,
        )


def figure_6(ctx: Context) -> Comparison:
    """Relay draining pending records with publisher confirms, against raw kombu confirms."""
    n = 20 if ctx.smoke else ctx.relay_records
    queue = f"bench-relay-{ctx.run_id}"
    raw_queue = f"bench-kombu-{ctx.run_id}"
    _queues["amqp"].update([queue, raw_queue])
    sample: dict[str, Any] = {}

    def ours() -> float:
        now = timezone.now()
        records = []
        for i in range(n):
            event_id = uuid.uuid4()
            records.append(
                record_for(
                    Event(event_id, "bench.async", {}, {}, now, event_id, None, ctx.payload(i)),
                    EventRecord.Status.PENDING,
                )
            )
        EventRecord.objects.bulk_create(records, batch_size=5000)
        sample["message"] = build_message(
            event_body(
                Event(uuid.uuid4(), "bench.async", {}, {}, now, uuid.uuid4(), None, ctx.payload(1))
            ),
            "bench.async:benchmarks.handlers.count",
            "default",
        )
        start = time.perf_counter()
        sent = 0
        while True:
            result = relay_pending(batch_size=500)
            sent += result.sent
            if result.sent == 0:
                break
        elapsed = time.perf_counter() - start
        if sent != n:
            raise RuntimeError(f"the relay sent {sent} of {n}")
        return n / elapsed

    def kombu_confirms() -> float:
        body = sample.get("message") or {"payload": ctx.payload(1)}
        with Connection(settings.AMQP_URL, transport_options={"confirm_publish": True}) as conn:
            channel = conn.default_channel
            Queue(raw_queue, durable=True)(channel).declare()
            producer = Producer(channel)
            start = time.perf_counter()
            for _ in range(n):
                producer.publish(body, routing_key=raw_queue, serializer="json", delivery_mode=2)
            return n / (time.perf_counter() - start)

    with _wiring(ctx, "amqp", queue):
        return compare(
            "6",
            f"relay draining {n:,} pending records, RabbitMQ publisher confirms",
            "msg/s",
            ours,
            [Baseline("raw kombu publish, confirms", kombu_confirms, Target(0.7, higher=True))],
            1,
        )


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _sizes(worker: WorkerProcess) -> dict[str, float]:
    assert worker.process is not None
    parent = worker.process.pid
    sizes = {"main": _rss_kb(parent) / 1024}
    for index, child in enumerate(sorted(_children(parent))):
        sizes[f"child{index + 1}"] = _rss_kb(child) / 1024
    return sizes


def figure_7(ctx: Context) -> bool:
    """Worker resident size after 100,000 deliveries against after 1,000 (RabbitMQ)."""
    first, total = (5, 20) if ctx.smoke else (1_000, ctx.deliveries)
    queue = f"bench-mem-{ctx.run_id}"
    client = _redis()
    key = f"{ctx.counter}:mem"
    with _wiring(ctx, "amqp", queue), _worker(ctx, "amqp", [queue]) as worker:
        _publish_events(ctx, first, key)
        _until_counted(client, key, first, timeout=120)
        time.sleep(1)
        before = _sizes(worker)
        start = time.perf_counter()
        _publish_events(ctx, total - first, key, chunk=500)
        _until_counted(client, key, total, timeout=1800)
        elapsed = time.perf_counter() - start
        time.sleep(1)
        after = _sizes(worker)
    growth = {name: after[name] - before.get(name, 0.0) for name in after}
    worst = max(growth.values())
    parts = ", ".join(f"{name} {before.get(name, 0):.1f} -> {after[name]:.1f} MB" for name in after)
    return single(
        "7",
        f"worker RSS after {total:,} deliveries vs after {first:,} (prefork -c 2, RabbitMQ)",
        f"{parts}; largest growth {worst:+.1f} MB ({(total - first) / elapsed:.0f} events/s) "
        f"| target <= +10 MB",
        worst <= 10,
    )


def figure_14(ctx: Context) -> bool:
    """Latency from commit to handler start through a real worker (prefork -c 2, RabbitMQ,
    default settings), one event at a time, against raw Celery's on_commit(apply_async).

    Judged with an order row written in the transaction on both sides, as figure 2 is: a
    transaction that writes nothing commits without reaching the disk, while the event's
    record makes ours wait for the write-ahead log. The line without it follows, for context.
    """
    n = ctx.count(300)
    queue = f"bench-latency-{ctx.run_id}"
    raw_queue = f"bench-latency-raw-{ctx.run_id}"
    _queues["amqp"].update([queue, raw_queue])
    client = _redis()
    raw_task = celery_app.amqp.tasks[celery_app.RAW_STAMP]
    sides = [("ours", True), ("raw", True), ("ours", False), ("raw", False)]
    latencies: dict[tuple[str, bool], list[float]] = {side: [] for side in sides}

    def one(side: str, with_order: bool, i: int, key: str) -> float:
        payload = ctx.payload(i, key)
        with transaction.atomic():
            if with_order:
                Order.objects.create(total=12.5, created_at=timezone.now())
            if side == "ours":
                publish("bench.latency", payload)
            else:
                transaction.on_commit(lambda: raw_task.apply_async((payload,), queue=raw_queue))
            committing = time.time()  # the block's exit commits, then sends
        return committing

    with _wiring(ctx, "amqp", queue), _worker(ctx, "amqp", [queue, raw_queue]):
        for rep in range(-1, ctx.repeat):  # -1: warm-up, not kept
            for side, with_order in sides if rep % 2 else sides[::-1]:
                key = f"{ctx.counter}:latency:{side}:{with_order}:{rep}"
                committed = {}
                for i in range(n):
                    committed[i] = one(side, with_order, i, key)
                    time.sleep(0.01)  # one at a time: latency, not throughput
                deadline = time.monotonic() + 60
                while client.llen(key) < n and time.monotonic() < deadline:
                    time.sleep(0.01)
                if rep >= 0:
                    for item in client.lrange(key, 0, -1):
                        index, started = item.decode().split()
                        latencies[side, with_order].append(float(started) - committed[int(index)])
            if rep < 0:
                analyze_tables()
    marking.flush()

    def quantiles(values: list[float]) -> tuple[float, float]:
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        return cuts[49] * 1000, cuts[98] * 1000

    def line(with_order: bool) -> tuple[str, str, float]:
        (ours50, ours99) = quantiles(latencies["ours", with_order])
        (raw50, raw99) = quantiles(latencies["raw", with_order])
        count = len(latencies["ours", with_order])
        what = "an order row in each transaction" if with_order else "nothing else written"
        return (
            f"commit to handler start, prefork -c 2, RabbitMQ, {what}, {count} events a side "
            "one at a time",
            f"ours p50 {ours50:.1f} ms, p99 {ours99:.1f} ms | raw Celery on_commit(apply_async) "
            f"p50 {raw50:.1f} ms, p99 {raw99:.1f} ms | p50 ratio {ours50 / raw50:.2f}",
            ours50 / raw50,
        )

    title, text, ratio = line(with_order=True)
    met = single("14", title, f"{text} (target <= 1.5)", ratio <= 1.5)
    title, text, ratio = line(with_order=False)
    print(
        f"14. {title}: {text} (context: the record's commit reaches the disk, raw's does not)",
        flush=True,
    )
    return met


def figure_15(ctx: Context) -> bool:
    """Publisher memory: this process's resident size after 100,000 events published (one
    async subscription, records on, 10 events per transaction) against after the first 5,000;
    then the same through a Celery app that keeps task results in Redis (``result_backend``)."""
    lines = [("", "RabbitMQ"), ("amqp_with_results", "RabbitMQ, Celery results in Redis")]
    met = [_publisher_memory(ctx, app, title) for app, title in lines]  # both lines run
    return all(met)


def _publisher_memory(ctx: Context, app: str, title: str) -> bool:
    first, total = (20, 100) if ctx.smoke else (5_000, ctx.deliveries)
    queue = f"bench-pubmem-{ctx.run_id}-{app or 'amqp'}"
    items = [("bench.async", ctx.payload(i)) for i in range(10)]

    def publish_until(count: int) -> None:
        for _ in range(count // len(items)):
            with transaction.atomic():
                publish_many(items)

    with _wiring(ctx, "amqp", queue, app):
        publish_until(first)
        marking.flush()
        gc.collect()
        before = _rss_kb(os.getpid()) / 1024
        start = time.perf_counter()
        publish_until(total - first)
        elapsed = time.perf_counter() - start
        marking.flush()
        gc.collect()
        after = _rss_kb(os.getpid()) / 1024
    per_100k = (after - before) * 100_000 / (total - first)
    return single(
        "15",
        f"publisher RSS after {total:,} events vs after {first:,} (publish_many of 10, {title})",
        f"{before:.1f} -> {after:.1f} MB, {per_100k:+.1f} MB per 100,000 events "
        f"({(total - first) / elapsed:.0f} events/s) | target <= +10 MB",
        per_100k <= 10,
    )


_FILLED = (EventRecord, Delivery, OrderingGate, HandOutbox, Order, CeleryOutbox)


def fresh_tables() -> None:
    """Empty the tables earlier figures filled: each figure, and each line of figure 4, starts
    from an empty event log, so PostgreSQL's upkeep of an earlier one's rows (autovacuum of
    tens of thousands of updated records) does not land in its timings."""
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(quote(m._meta.db_table) for m in _FILLED)}")


def analyze_tables() -> None:
    """Give the planner the statistics of the tables `fresh_tables` empties, once a warm-up
    has filled them, as autovacuum would have on a server that took that many writes.

    This machine's PostgreSQL runs with autovacuum off (its CI configuration), so an emptied
    table has none, and a plan a worker's connection keeps (migration 0013's turn function)
    may be one chosen for an empty table, which reads every delivery of the subscription on
    each claim (docs/performance-log.md, 2026-12-06). django-tasks-db's table, which figure 11's
    two sides share, is left as it is.
    """
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {', '.join(quote(m._meta.db_table) for m in _FILLED)}")


def purge_publish_queues(ctx: Context) -> None:
    """Empty the queues figures 1-3 publish to and nobody consumes, between figures: the tens
    of thousands of persistent messages they leave are RabbitMQ's to keep until the run ends,
    while later figures measure it."""
    with celery_app.amqp.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in (settings.QUEUE, ctx.sink):
            try:
                channel.queue_purge(queue)
            except conn.channel_errors:  # not declared: nothing was published to it
                channel = conn.channel()


def cleanup(ctx: Context) -> None:
    """Delete the run's queues and Redis keys; end the background marker (its connection)."""
    marking.stop()
    # Figures 1-3 and 5 publish to the run's default queue and the baselines' sink, which no
    # worker consumes: left behind, their messages pile up in RabbitMQ from run to run.
    _queues["amqp"].update([settings.QUEUE, ctx.sink])
    for kind, queues in _queues.items():
        if not queues:
            continue
        with celery_app.APPS[kind].connection_for_write() as conn:
            channel = conn.default_channel
            for queue in queues:
                channel.queue_delete(queue)
    client = _redis()
    keys = list(client.scan_iter(f"{ctx.counter}*"))
    if keys:
        client.delete(*keys)
