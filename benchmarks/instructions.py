"""``python -m benchmarks.instructions [--count N] [--only 1,8]``: the in-process figures
counted in instructions.

Figure 1's two loops (``publish()`` with one sync subscription; ``Signal.send`` +
``on_commit``) and figure 8's (the worker's path for a v1 message upcast to v3; for a v3
one), each run in its own process under valgrind's callgrind, which counts the user-space
instructions between two markers around the loop: it dumps its counters when
``os.getppid()`` returns and again when ``os.getpgrp()`` is called. Most counts repeat to
within a few tenths of a percent (the loops' periodic reads of the database held,
`_reads_held`); now and then one reads a percent or two higher. The time ratios move by a
tenth between runs. They leave the kernel out (``publish()`` makes one
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import harness

_MARKERS = ("--dump-after=os_getppid", "--dump-before=os_getpgrp")
_PAYLOAD = {"order_id": 1, "total": 12.5, "email": "a@example.com", "note": "bench-counter"}
Loop = Callable[[int], None]
_LOOPS = ("ours", "baseline")
#: Each figure counted: what its two loops run (ours, the baseline) and its target (in time).
_FIGURES = {
    "1": ("publish(), 1 sync subscription, no record", "Signal.send + on_commit", "<= 3"),
    "8": ("worker delivery of a v1 event upcast to v3", "a current v3 event", "<= 1.1"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("--count", type=int, default=4000, help="calls counted per loop")
    parser.add_argument("--only", default=",".join(_FIGURES), help="figures, comma-separated")
    parser.add_argument("--loop", choices=_LOOPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    figures = args.only.split(",")
    unknown = set(figures) - set(_FIGURES)
    if unknown:
        counted = ", ".join(_FIGURES)
        parser.error(f"figure {', '.join(sorted(unknown))} is not counted (only {counted})")
    if args.loop:  # the child, under callgrind, in the environment its parent set
        _run_loop(figures[0], args.loop, args.count)
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
        for figure in figures:
            ours, baseline = (_count(figure, loop, args.count) / args.count for loop in _LOOPS)
            what, against, target = _FIGURES[figure]
            print(
                f"{figure:>2}. {what}: ours {ours:,.0f} instructions | {against} "
                f"{baseline:,.0f} | ratio {ours / baseline:.2f} (target {target}, in time)"
                f"  [callgrind, {args.count:,} calls a loop]",
                flush=True,
            )
    finally:
        connection.creation.destroy_test_db(server_db, verbosity=0)
    return 0


def _count(figure: str, loop: str, count: int) -> int:
    """The instructions of ``count`` runs of one loop of ``figure``, in a child under callgrind."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            *("valgrind", "--tool=callgrind", *_MARKERS, f"--callgrind-out-file={out}"),
            *(sys.executable, "-m", "benchmarks.instructions", "--loop", loop),
            *("--only", figure, "--count", str(count)),
        ]
        env = {**os.environ, "BENCH_WORKER": "1"}  # the child opens the database made here
        child = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if child.returncode:
            raise RuntimeError(
                f"figure {figure}'s {loop!r} loop under callgrind failed:\n{child.stderr[-3000:]}"
            )
        # Dump 2 holds what ran between the markers: the loop.
        for line in Path(f"{out}.2").read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no summary for figure {figure}'s loop {loop!r}")


@contextmanager
def _reads_held() -> Iterator[None]:
    """Keep the paused subscriptions and the webhook endpoints read once, for the loop.

    A process reads each again once its cache is a few seconds old (`pausing.CACHE_SECONDS`,
    ``WEBHOOK_ENDPOINTS["refresh"]``, 1 and 5 s): every 90,000 or so publishes at full speed,
    but every few hundred under callgrind, which runs them hundreds of times slower. Counted,
    those reads put the host's speed and load into the figure (1.5-3% of figure 1's count).
    """
    from unittest import mock

    from django.conf import settings
    from django.test import override_settings

    from django_events.delivery import pausing

    events: dict[str, Any] = settings.DJANGO_EVENTS
    endpoints = {**events.get("WEBHOOK_ENDPOINTS", {}), "refresh": 86_400}
    with (
        mock.patch.object(pausing, "CACHE_SECONDS", 86_400.0),
        override_settings(DJANGO_EVENTS={**events, "WEBHOOK_ENDPOINTS": endpoints}),
    ):
        yield


@contextmanager
def _loops(figure: str) -> Iterator[tuple[Loop, Loop]]:
    """Figure ``figure``'s two loops, ours first (the benchmarks' own)."""
    if figure == "1":
        from .bench_publish import figure_1_loops

        yield figure_1_loops(_PAYLOAD)
    else:
        from .bench_versions import figure_8_loops

        with figure_8_loops() as loops:
            yield loops


def _run_loop(figure: str, loop: str, count: int) -> None:
    import django

    django.setup()
    with _reads_held(), _loops(figure) as (ours, baseline):
        ours(200)  # first calls: the registry, the endpoint and pause reads
        baseline(200)
        run = ours if loop == "ours" else baseline
        os.getppid()
        run(count)
        os.getpgrp()


if __name__ == "__main__":
    sys.exit(main())
