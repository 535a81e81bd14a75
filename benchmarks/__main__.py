"""``python -m benchmarks [--smoke] [--repeat N] [--only 1,2,...]``: every figure, one line each.

Needs PostgreSQL, RabbitMQ and Redis on loopback (docs/contributing.md). Creates and drops its
own database, queues and Redis keys.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="each benchmark once, tiny counts")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per figure")
    parser.add_argument("--only", default="", help="comma-separated figure numbers, and/or 'admin'")
    parser.add_argument(
        "--relay-records", type=int, default=100_000, help="pending records for figure 6"
    )
    parser.add_argument(
        "--deliveries", type=int, default=100_000, help="deliveries before the RSS of figure 7"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a pyinstrument profile of each figure to DIR/figure-N.txt",
    )
    args = parser.parse_args(argv)
    only = {f.strip() for f in args.only.split(",") if f.strip()}

    run_id = uuid.uuid4().hex[:10]
    harness.use_benchmark_settings(run_id)
    import logging

    import django
    import structlog

    # The peer logs every relay pass through structlog at INFO: keep the output to figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    django.setup()
    from django.db import connection

    from . import (
        bench_async,
        bench_delivery,
        bench_ordering,
        bench_publish,
        bench_versions,
        bench_webhooks,
    )

    harness.judging = not args.smoke

    ctx = bench_publish.Context(
        smoke=args.smoke,
        repeat=1 if args.smoke else args.repeat,
        run_id=run_id,
        relay_records=args.relay_records,
        deliveries=args.deliveries,
    )
    print(
        f"django_events benchmarks{' (smoke)' if args.smoke else ''}: "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {platform.node()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, Django {django.get_version()}",
        flush=True,
    )
    print(
        "ours and baseline interleaved; medians [min-max] over the repetitions; "
        "ratio = ours / baseline",
        flush=True,
    )
    server_db = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    results: list[bool] = []
    try:
        figures = [
            ("1", bench_publish.figure_1),
            ("2", bench_publish.figure_2),
            ("3", bench_publish.figure_3),
            ("4", bench_delivery.figure_4),
            ("5", bench_publish.figure_5),
            ("6", bench_delivery.figure_6),
            ("7", bench_delivery.figure_7),
            ("8", bench_versions.figure_8),
            ("9", bench_publish.figure_9),
            ("10", bench_async.figure_10),
            ("11", bench_async.figure_11),
            ("12", bench_async.figure_12),
            ("13", bench_webhooks.figure_13),
            ("14", bench_delivery.figure_14),
            ("15", bench_delivery.figure_15),
            ("16", bench_ordering.figure_16),
        ]
        for number, figure in figures:
            if only and number not in only:
                continue
            started = time.monotonic()
            results.append(_profiled(figure, ctx, number, args.profile))
            bench_delivery.purge_publish_queues(ctx)
            bench_delivery.fresh_tables()
            if not args.smoke:
                print(f"    ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        bench_delivery.cleanup(ctx)
        connection.creation.destroy_test_db(server_db, verbosity=0)
    admin_ok = _admin(args.smoke) if not only or "admin" in only else True
    if not args.smoke:
        print(f"{sum(results)} of {len(results)} figures met their target", flush=True)
    else:
        print(f"smoke run: {len(results)} figures ran", flush=True)
    return 0 if admin_ok else 1


def _admin(smoke: bool) -> bool:
    """The admin changelists on a million events: benchmarks/bench_admin.py, its own process
    (it sets Django up with the test settings and a database of its own)."""
    script = Path(__file__).with_name("bench_admin.py")
    print(f"admin. changelists: {script.name}{' --smoke' if smoke else ''}", flush=True)
    command = [sys.executable, str(script), *(["--smoke"] if smoke else [])]
    return subprocess.run(command, check=False).returncode == 0


def _profiled(figure: Any, ctx: Any, number: str, folder: str | None) -> bool:
    if not folder:
        return bool(figure(ctx))
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    with profiler:
        met = bool(figure(ctx))
    path = Path(folder) / f"figure-{number}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.output_text(unicode=False, color=False, show_all=True))
    print(f"    profile: {path}", flush=True)
    return met


if __name__ == "__main__":
    sys.exit(main())
