"""Figure 16's lines for other numbers of keys: by default its one-key lines only ("the serial
floor"), 500 events of one ordering key through a real worker (prefork -c 2), as
``python -m benchmarks --only 16`` runs them, without the judged 50-key lines; ``--keys 2,5``
runs figure 16's line (3,000 events, 100 a transaction) over that many keys.

    .venv/bin/python scripts/serial_key_bench.py [--repeat N] [--brokers amqp,redis] [--keys 1,2]

Each line also says how many times the ordered deliveries' rows were updated, per delivery
(PostgreSQL's ``pg_stat_user_tables``, read once the worker's backends have reported): 1 is
the finish alone; a delivery held and handed on adds two or three (the hold, the hand-on, the
due time cleared).

Needs what the benchmarks need (docs/performance.md, "Running them"); creates and drops its
own database, queues and Redis keys. To profile the worker, attach py-spy to the `celery
worker` process it starts (``py-spy record --subprocesses --pid PID``).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--brokers", default="amqp,redis", help="amqp and/or redis")
    parser.add_argument(
        "--ordered-only",
        action="store_true",
        help="only the ordered side, no baseline (to attach a profiler to the worker)",
    )
    parser.add_argument("--keys", default="1", help="numbers of keys, comma-separated")
    args = parser.parse_args(argv)

    from benchmarks import harness

    run_id = uuid.uuid4().hex[:10]
    harness.use_benchmark_settings(run_id)
    import logging

    import django
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    django.setup()
    from django.db import connection

    from benchmarks import bench_delivery, bench_ordering
    from benchmarks.bench_publish import Context

    ctx = Context(smoke=False, repeat=args.repeat, run_id=run_id)
    server_db = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    cpu: dict[str, dict[str, list[bench_delivery.CpuSample]]] = {}
    try:
        for kind in args.brokers.split(","):
            if args.ordered_only:
                _ordered_only(ctx, kind.strip(), cpu)
            else:
                for keys in map(int, args.keys.split(",")):
                    updated = _delivery_updates()
                    bench_ordering._over_keys(ctx, kind.strip(), keys, cpu)
                    ordered = _ordered_deliveries()
                    print(
                        f"{kind} {keys} key(s): {(_delivery_updates() - updated) / ordered:.2f} "
                        "row updates an ordered delivery",
                        flush=True,
                    )
        print(bench_ordering.cpu_line(cpu), flush=True)
    finally:
        bench_delivery.cleanup(ctx)
        connection.creation.destroy_test_db(server_db, verbosity=0)
    return 0


def _ordered_deliveries() -> int:
    """The ordered deliveries of the `bench_ordering._over_keys` line just run (it starts from
    empty tables): its warm-up's and its repetitions'."""
    from django_events.models import Delivery

    return Delivery.objects.filter(sequence__isnull=False).count()


def _delivery_updates() -> int:
    """Rows of `Delivery` updated so far, once every backend has reported (a backend that
    went idle reports within PostgreSQL's 10 s idle interval)."""
    from django.db import connection

    time.sleep(11)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'django_events_delivery'"
        )
        return int(cursor.fetchone()[0])


def _ordered_only(ctx: Any, kind: str, cpu: dict[str, dict[str, list[Any]]]) -> None:
    """500 events of one key, ``ctx.repeat`` times, without the unordered baseline."""
    from django.db import transaction

    from benchmarks import bench_delivery as bd
    from django_events import publish_many

    queue = f"bench-ordering-{ctx.run_id}-{kind}-1-only"
    samples: list[Any] = []
    cpu[f"1 key {kind} ordered only"] = {"ordered": samples, "unordered": samples}
    with bd._wiring(ctx, kind, queue), bd._worker(ctx, kind, [queue]) as worker:
        assert worker.process is not None
        print(f"worker pid {worker.process.pid}", flush=True)
        for run in range(ctx.repeat + 1):  # the first: warm-up
            count = 500 if run else 100
            note = f"{ctx.counter}:ordering:{queue}:{run}"
            with bd._cpu_per_event(worker, count, samples if run else []):
                start = time.perf_counter()
                for first in range(0, count, 100):
                    with transaction.atomic():
                        publish_many(
                            ("bench.ordered", ctx.payload(0, note))
                            for _ in range(first, first + 100)
                        )
                bd._until_counted(bd._redis(), note, count, timeout=60 + count / 5)
                elapsed = time.perf_counter() - start
            if run:
                print(f"{kind}: {count / elapsed:.0f} events/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
