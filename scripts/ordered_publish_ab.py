"""One ordered event's gate and row as one-row statements against the batch's JSON documents,
interleaved in one process (docs/performance-log.md, "One ordered event's gate and row as plain
`VALUES`").

    .venv/bin/python scripts/ordered_publish_ab.py [--rounds 40] [--per-round 100]

Each transaction is what a view publishing one ordered event does: ``atomic()``, an order row,
``publish()`` of an event with one ``ordering_key`` subscription (the benchmarks'
``bench.ordered``), on PostgreSQL; nothing is sent (the outlet's sender takes the messages), so
the database is what is compared. ``one-row`` is the package as it is; ``batch`` sends the same
gate and row through the statements ``publish_many()`` uses for several. Prints the median
microseconds a transaction of each and in how many rounds the one-row statements were faster.
Needs PostgreSQL on loopback (``DATABASE_URL``); creates and drops its own database.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=100, help="transactions a side a round")
    args = parser.parse_args()

    from benchmarks import harness

    with harness.scratch_database("ordered_ab"):
        _compare(args.rounds, args.per_round)


def _compare(rounds: int, per_round: int) -> None:
    from django.db import transaction
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.utils import timezone

    from benchmarks.models import Order
    from django_events import publish
    from django_events.delivery import postgresql
    from django_events.publishing import use_outlet

    one_row = postgresql.take_numbers, postgresql.insert_numbered

    def take_as_batch(
        connection: BaseDatabaseWrapper, counts: Sequence[tuple[str, str, int]]
    ) -> dict[tuple[str, str], int]:
        document = json.dumps([{"s": s, "k": k, "n": n} for s, k, n in counts])
        with connection.cursor() as cursor:
            cursor.execute(postgresql._numbers_sql(connection), [document])
            return {(s, k): int(last) for s, k, last in cursor.fetchall()}

    def insert_as_batch(
        connection: BaseDatabaseWrapper,
        rows: Sequence[tuple[uuid.UUID, str, str, str, int]],
        created_at: datetime,
    ) -> None:
        document = json.dumps(
            [{"e": str(e), "s": s, "m": m, "k": k, "n": n} for e, s, m, k, n in rows]
        )
        with connection.cursor() as cursor:
            cursor.execute(postgresql._numbered_sql(connection), [created_at, created_at, document])

    sides: dict[str, Any] = {"one-row": one_row, "batch": (take_as_batch, insert_as_batch)}

    def run(side: str, count: int) -> float:
        postgresql.take_numbers, postgresql.insert_numbered = sides[side]
        start = time.perf_counter()
        for i in range(count):
            payload = {"order_id": i % 50, "total": 1.0, "email": "a@example.com", "note": "ab"}
            with transaction.atomic():
                Order.objects.create(total=12.5, created_at=timezone.now())
                publish("bench.ordered", payload)
        return (time.perf_counter() - start) / count * 1e6

    times: dict[str, list[float]] = {side: [] for side in sides}
    try:
        with use_outlet(send=lambda items, alias: set()):
            for side in sides:  # warm-up: imports, connections, the statements' text
                run(side, 50)
            for number in range(rounds):
                for side in sorted(sides, reverse=number % 2 == 1):
                    times[side].append(run(side, per_round))
    finally:
        postgresql.take_numbers, postgresql.insert_numbered = one_row
    ours, batch = (statistics.median(times[side]) for side in ("one-row", "batch"))
    faster = sum(a < b for a, b in zip(times["one-row"], times["batch"], strict=True))
    print(
        f"an order row + publish() of one ordered event in atomic(): one-row {ours:,.0f} us, "
        f"batch statements {batch:,.0f} us, ratio {ours / batch:.3f}; one-row faster in "
        f"{faster} of {rounds} rounds"
    )


if __name__ == "__main__":
    main()
