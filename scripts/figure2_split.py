"""Figure 2 taken apart, interleaved in one process (docs/performance-log.md, "Figure 2 taken
apart").

    .venv/bin/python scripts/figure2_split.py [--rounds 20] [--per-round 100]

Each side is a loop of transactions, an order row in each (``atomic()``, PostgreSQL +
RabbitMQ), timed per transaction:

- ``bare``: figure 2's baseline, the row and ``on_commit(apply_async)``;
- ``ours``: figure 2's line, the row and ``publish()``, until the background marker wrote its
  last mark (``marking.flush()``, as the benchmark does);
- ``ours, marks not written``: the same with the marker's ``UPDATE ... dispatched`` left out;
- ``order row``: the row alone;
- ``order row + record``: the row and the event's record (`insert_records`), nothing sent;
- ``order row + our send``: the row and, after the commit, the package's send of the event
  (`send_deliveries` through the kept confirming connection, the marker taking its confirms),
  no record.

Who goes first rotates from one round to the next. Prints the median microseconds of each and
its ratio to ``bare``. Needs PostgreSQL and RabbitMQ on loopback (the benchmarks' settings);
creates and drops its own database.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=100, help="transactions a side a round")
    args = parser.parse_args()

    from benchmarks import harness

    with harness.scratch_database("figure2_split"):
        _compare(args.rounds, args.per_round)


def _compare(rounds: int, per_round: int) -> None:
    from django.db import transaction
    from django.utils import timezone

    from benchmarks import celery_app
    from benchmarks.models import Order
    from django_events import publish
    from django_events.delivery import broker, marking, postgresql
    from django_events.delivery.recording import insert_records
    from django_events.publishing import _prepare
    from django_events.wiring.registry import get_registry

    registry = get_registry()
    payload = {"order_id": 1, "total": 12.5, "email": "a@example.com", "note": "split"}
    sink = f"figure2-split-{uuid.uuid4().hex[:8]}"
    raw_task = celery_app.amqp.tasks[celery_app.RAW_TASK]

    def order_row() -> None:
        Order.objects.create(total=12.5, created_at=timezone.now())

    def bare(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                order_row()
                transaction.on_commit(lambda: raw_task.apply_async((payload,), queue=sink))

    def ours(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                order_row()
                publish("bench.async", payload)
        marking.flush()

    def ours_marks_not_written(count: int) -> None:
        written = postgresql.mark_dispatched
        postgresql.mark_dispatched = lambda connection, ids, at: None
        try:
            ours(count)
        finally:
            postgresql.mark_dispatched = written

    def order_only(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                order_row()

    def order_and_record(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                order_row()
                outgoing = _prepare(registry, "bench.async", payload, None)
                insert_records("default", [(outgoing.event, "pending")])

    def order_and_our_send(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                order_row()
                outgoing = _prepare(registry, "bench.async", payload, None)
                items = [(outgoing.event, True, outgoing.async_)]
                transaction.on_commit(
                    lambda items=items: broker.send_deliveries(
                        items, "default", marker=marking.marker()
                    )
                )
        marking.flush()

    sides: dict[str, Callable[[int], None]] = {
        "bare": bare,
        "ours": ours,
        "ours, marks not written": ours_marks_not_written,
        "order row": order_only,
        "order row + record": order_and_record,
        "order row + our send": order_and_our_send,
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for side in sides.values():  # warm-up: imports, connections, the statements' text
        side(50)
    names = list(sides)
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            sides[name](per_round)
            times[name].append((time.perf_counter() - start) / per_round * 1e6)
    medians: dict[str, Any] = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:26s} {median:7,.0f} us a transaction, {median / medians['bare']:.2f} of bare")


if __name__ == "__main__":
    main()
