"""Ordered delivery per key (``ordering_key``) through a real worker: figure 16."""

from __future__ import annotations

import time

from django.db import transaction

from django_events import publish_many
from django_events.models import Delivery

from .bench_delivery import (
    _CPU_PARTS,
    CpuSample,
    _cpu_per_event,
    _cpu_text,
    _redis,
    _until_counted,
    _until_recorded,
    _wiring,
    _worker,
    analyze_tables,
    fresh_tables,
)
from .bench_publish import Context
from .harness import Baseline, Comparison, Target, compare

KEYS = 50


def figure_16(ctx: Context) -> bool:
    """Events/s of a subscription with ``ordering_key`` over 50 keys against the same
    subscription without it, on the same worker (prefork -c 2); then one key, the serial floor.

    The handler is figure 4's (a Redis ``INCR``). Judged with the default settings, where the
    unordered subscription's success rows are batched and an ordered delivery's never are (its
    row is its key's state); then, for context, both writing each row before the ack
    (``SUCCESS_RECORDS = "immediate"``): the gate's own cost.
    """
    cpu: dict[str, dict[str, list[CpuSample]]] = {}
    judged = {kind: _over_keys(ctx, kind, KEYS, cpu) for kind in ("amqp", "redis")}
    immediate = {kind: _over_keys(ctx, kind, KEYS, cpu, success="immediate") for kind in judged}
    # An ordered delivery writes its row before the ack, as "immediate" does for all: the
    # unordered subscription with "immediate" rows is as fast as any gate could make it.
    print(
        "16. the most a gate that cost nothing could reach against the default: unordered "
        '"immediate" / unordered default (medians of the lines above, not interleaved): '
        + ", ".join(
            f"{kind} {immediate[kind].baselines[0] / judged[kind].baselines[0]:.2f}"
            for kind in judged
        ),
        flush=True,
    )
    for kind in ("amqp", "redis"):
        _over_keys(ctx, kind, 1, cpu)
    # Where the CPU goes: the publisher, the worker and PostgreSQL share 2 cores.
    print(cpu_line(cpu), flush=True)
    return all(judged.values())


def cpu_line(cpu: dict[str, dict[str, list[CpuSample]]]) -> str:
    """Figure 16's line of CPU per event: each line's ordered and unordered sides."""
    return f"16. CPU per event, {_CPU_PARTS}: " + "; ".join(
        f"{line} ordered {_cpu_text(samples['ordered'])}, "
        f"unordered {_cpu_text(samples['unordered'])}"
        for line, samples in cpu.items()
    )


def _over_keys(
    ctx: Context,
    kind: str,
    keys: int,
    cpu: dict[str, dict[str, list[CpuSample]]],
    success: str = "",
) -> Comparison:
    n = ctx.count(3000 if keys > 1 else 500)
    fresh_tables()
    client = _redis()
    queue = f"bench-ordering-{ctx.run_id}-{kind}-{keys}-{success or 'default'}"
    runs = iter(range(1_000_000))
    samples: dict[str, list[CpuSample]] = {"ordered": [], "unordered": []}
    cpu[f"{keys} key{'s' if keys > 1 else ''} {kind} {success or 'default'}"] = samples

    def side(event: str, count: int = n, measured: bool = True) -> float:
        note = f"{ctx.counter}:ordering:{queue}:{next(runs)}"
        into = samples[event.removeprefix("bench.")] if measured else []
        recorded = Delivery.objects.count() + count
        with _cpu_per_event(worker, count, into):
            start = time.perf_counter()
            for first in range(0, count, 100):
                with transaction.atomic():
                    publish_many(
                        (event, ctx.payload(i % keys, note))
                        for i in range(first, min(first + 100, count))
                    )
            _until_counted(client, note, count, timeout=60 + count / 5)
            elapsed = time.perf_counter() - start
        # Untimed: batched rows still on their way must not land in the next run's figures.
        _until_recorded(recorded, timeout=30)
        return count / elapsed

    with _wiring(ctx, kind, queue), _worker(ctx, kind, [queue], success=success) as worker:
        # warm-up: imports, connections, the gates
        side("bench.ordered", min(n, 100), measured=False)
        side("bench.unordered", min(n, 100), measured=False)
        analyze_tables()
        title = f"ordering_key over {keys} key{'s' if keys > 1 else ''}, prefork -c 2, {kind}"
        if keys == 1:
            title += " (the serial floor, reported)"
        settings = f"SUCCESS_RECORDS {success} (context)" if success else "default settings"
        return compare(
            "16",
            f"{title}, records on, {settings}",
            "events/s",
            lambda: side("bench.ordered"),
            [
                Baseline(
                    "the same subscription unordered",
                    lambda: side("bench.unordered"),
                    Target(0.7 if keys > 1 and not success else 0.0, higher=True),
                )
            ],
            ctx.repeat,
        )
