"""``python -m benchmarks.instructions [--count N]``: figure 1 counted in instructions.

Figure 1's two loops (``publish()`` with one sync subscription; ``Signal.send`` +
``on_commit``), each run in its own process under valgrind's callgrind, which counts the
user-space instructions between two markers around the loop: it dumps its counters when
``os.getppid()`` returns and again when ``os.getpgrp()`` is called. The counts repeat to
within a few tenths of a percent whatever else the machine runs, where figure 1's time ratio
moves by a tenth between runs; they leave the kernel out (``publish()`` makes one
``getrandom`` call an event, for its id). Needs valgrind and PostgreSQL on loopback; not run
by the smoke run (about a minute of callgrind a loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from . import harness

_MARKERS = ("--dump-after=os_getppid", "--dump-before=os_getpgrp")
_PAYLOAD = {"order_id": 1, "total": 12.5, "email": "a@example.com", "note": "bench-counter"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("--count", type=int, default=4000, help="calls counted per loop")
    parser.add_argument("--loop", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop:  # the child, under callgrind, in the environment its parent set
        _run_loop(args.loop, args.count)
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not on PATH (Debian: apt-get install valgrind)")
    harness.use_benchmark_settings(f"instructions_{uuid.uuid4().hex[:10]}")
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dict layouts in both children
    import django

    django.setup()
    from django.db import connection

    server_db = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        counts = {loop: _count(loop, args.count) / args.count for loop in ("ours", "baseline")}
    finally:
        connection.creation.destroy_test_db(server_db, verbosity=0)
    print(
        f" 1. publish(), 1 sync subscription, no record: ours {counts['ours']:,.0f} "
        f"instructions | Signal.send + on_commit {counts['baseline']:,.0f} | "
        f"ratio {counts['ours'] / counts['baseline']:.2f} (figure 1's target: <= 3, in time)"
        f"  [callgrind, {args.count:,} calls a loop]",
        flush=True,
    )
    return 0


def _count(loop: str, count: int) -> int:
    """The instructions of ``count`` calls of ``loop``, counted in a child under callgrind."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            *("valgrind", "--tool=callgrind", *_MARKERS, f"--callgrind-out-file={out}"),
            *(sys.executable, "-m", "benchmarks.instructions", "--loop", loop),
            *("--count", str(count)),
        ]
        env = {**os.environ, "BENCH_WORKER": "1"}  # the child opens the database made here
        child = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if child.returncode:
            raise RuntimeError(f"the {loop!r} loop under callgrind failed:\n{child.stderr[-3000:]}")
        # Dump 2 holds what ran between the markers: the loop.
        for line in Path(f"{out}.2").read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no summary for the loop {loop!r}")


def _run_loop(loop: str, count: int) -> None:
    import django

    django.setup()
    from .bench_publish import figure_1_loops

    ours, baseline = figure_1_loops(_PAYLOAD)
    ours(200)  # first calls: the registry, the endpoint and pause reads
    baseline(200)
    run = ours if loop == "ours" else baseline
    os.getppid()
    run(count)
    os.getpgrp()


if __name__ == "__main__":
    sys.exit(main())
