"""Side-by-side measurement: ours and a baseline interleaved, medians with min and max."""

from __future__ import annotations

import gc
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    """``ratio <= limit`` (``higher=False``) or ``ratio >= limit`` (``higher=True``)."""

    limit: float
    higher: bool = False

    def met(self, ratio: float) -> bool:
        return ratio >= self.limit if self.higher else ratio <= self.limit

    def __str__(self) -> str:
        return f"{'>=' if self.higher else '<='} {self.limit:g}"


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        return f"{_num(self.median)} [{_num(min(self.values))}-{_num(max(self.values))}]"


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def use_benchmark_settings(run_id: str) -> None:
    """Point ``benchmarks.settings`` at this run's queue and database (its processes, workers
    and children included, inherit them); the webhook values let the wiring's checks pass
    until figure 13 points them at its receiver."""
    os.environ["BENCH_QUEUE"] = f"bench-events-{run_id}"
    os.environ["BENCH_DB_NAME"] = f"django_events_bench_{run_id}"
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    os.environ.setdefault("BENCH_HOOK_URL", "http://127.0.0.1:9/unused")
    os.environ.setdefault("BENCH_HOOK_SECRET", "whsec_" + "A" * 43 + "=")


@contextmanager
def scratch_database(name: str) -> Iterator[None]:
    """Django set up on ``benchmarks.settings`` with a database of its own, created on entry
    and dropped on exit (the scripts that time one thing in one process)."""
    use_benchmark_settings(f"{name}_{uuid.uuid4().hex[:8]}")
    import django

    django.setup()
    from django.db import connection, connections

    from django_events.delivery import batching, marking

    server_db = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        yield
    finally:
        # Their threads' database connections, before the database is dropped.
        marking.stop()
        batching.reset_recorder()  # a script that delivered with success rows batched
        connections.close_all()
        connection.creation.destroy_test_db(server_db, verbosity=0)


# A smoke run (tiny counts) proves the benchmarks run; its figures judge nothing.
judging = True


def _verdict(met: bool) -> str:
    if not judging:
        return "(smoke: not judged)"
    return "met" if met else "MISSED"


def per_op(fn: Callable[[int], object], count: int, scale: float = 1e6) -> float:
    """Time ``fn(count)`` and return the cost of one operation (microseconds by default)."""
    gc.collect()
    start = time.perf_counter()
    fn(count)
    return (time.perf_counter() - start) / count * scale


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` measured: true when every target was met."""

    met: bool
    ours: float
    baselines: list[float]

    def __bool__(self) -> bool:
        return self.met


@dataclass(frozen=True)
class Baseline:
    name: str
    run: Callable[[], float]
    target: Target


def compare(
    number: str,
    title: str,
    unit: str,
    ours: Callable[[], float],
    baselines: list[Baseline],
    repeat: int,
) -> Comparison:
    """Run ours and each baseline ``repeat`` times, rotating who goes first; print a line each."""
    runs: list[tuple[Callable[[], float], Series]] = [(ours, Series())]
    runs += [(b.run, Series()) for b in baselines]
    for rep in range(repeat):
        shift = rep % len(runs)
        for fn, series in runs[shift:] + runs[:shift]:
            series.values.append(fn())
    mine = runs[0][1]
    met = True
    for baseline, (_, theirs) in zip(baselines, runs[1:], strict=True):
        ratio = mine.median / theirs.median
        ok = baseline.target.met(ratio)
        met = met and ok
        print(
            f"{number:>2}. {title}: ours {mine} {unit} | {baseline.name} {theirs} {unit} | "
            f"ratio {ratio:.2f} (target {baseline.target}) {_verdict(ok)}"
            f"  [n={repeat}]",
            flush=True,
        )
    return Comparison(met, mine.median, [series.median for _, series in runs[1:]])


def single(number: str, title: str, text: str, met: bool) -> bool:
    """Print a figure that is not a ratio (validation time, memory growth)."""
    print(f"{number:>2}. {title}: {text} {_verdict(met)}", flush=True)
    return met
