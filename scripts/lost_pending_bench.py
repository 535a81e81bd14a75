"""Time the relay's pass over lost messages (`resend_unfinished`) on a backlog of pending
deliveries, and show the plan of each of its queries (docs/performance-log.md, "The relay's
lost-message pass on a large backlog").

    createdb -h 127.0.0.1 -U postgres lost_pending_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/lost_pending_bench \\
        .venv/bin/python scripts/lost_pending_bench.py 2000 20000
    dropdb -h 127.0.0.1 -U postgres lost_pending_bench

(``DATABASE_URL=sqlite:///var/lost_pending_bench.sqlite3`` for SQLite.) For each count N:
N pending ordered deliveries over 5 keys (none run: the backlog an outage leaves) and N
unordered ones, every event dispatched 90 minutes ago and its row untouched since, their
events interleaved. ``--history H`` adds H succeeded deliveries before each key's backlog.
Each pass runs in a transaction rolled back: nothing is sent, and every pass sees the same
rows. Uses the test suite's settings (tests/settings.py, the in-memory broker) on the
database DATABASE_URL names, which it migrates and empties of events.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.utils import timezone  # noqa: E402

from django_events.models import Delivery, EventRecord, OrderingGate, RelayCheckpoint  # noqa: E402
from django_events.operations import unfinished  # noqa: E402
from django_events.operations.unfinished import resend_unfinished  # noqa: E402
from django_events.wiring.registry import get_registry  # noqa: E402
from tests.ops import shop_wiring  # noqa: E402

RECORD = "tests.app.handlers.record"
PLAIN = {"event": "shop.paid", "handler": RECORD, "mode": "async", "name": "shop-plain"}
ORDERED = {**PLAIN, "name": "shop-ordered", "ordering_key": "order_id"}
HOUR = 3600.0


class Rollback(Exception):
    pass


def fill(count: int, keys: int, unordered: bool, history: int) -> None:
    """``count`` pending ordered deliveries over ``keys`` keys (and as many unordered ones)."""
    Delivery.objects.all().delete()
    EventRecord.objects.all().delete()
    OrderingGate.objects.all().delete()
    RelayCheckpoint.objects.all().delete()
    long_ago = timezone.now() - timedelta(seconds=1.5 * HOUR)
    records, rows = [], []
    for key in range(keys):  # the history: succeeded deliveries of each key
        for number in range(1, history + 1):
            records.append(record(long_ago - timedelta(seconds=1), key))
            rows.append(ordered(records[-1], key, number, "succeeded"))
    numbers = dict.fromkeys(range(keys), history)
    for i in range(count):
        key = i % keys
        numbers[key] += 1
        records.append(record(long_ago, key))
        rows.append(ordered(records[-1], key, numbers[key], "pending"))
        if unordered:
            records.append(record(long_ago, key))
            rows.append(Delivery(event_id=records[-1].pk, subscription="shop-plain", mode="async"))
    EventRecord.objects.bulk_create(records, batch_size=5000)
    Delivery.objects.bulk_create(rows, batch_size=5000)
    Delivery.objects.update(updated_at=long_ago)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE django_events_delivery")
            cursor.execute("VACUUM ANALYZE django_events_eventrecord")
    else:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")


def record(at: object, key: int) -> EventRecord:
    return EventRecord(
        id=uuid.uuid4(),
        name="shop.paid",
        payload={"order_id": key, "total": 1},
        occurred_at=at,
        correlation_id=uuid.uuid4(),
        status="dispatched",
        dispatched_at=at,
    )


def ordered(event: EventRecord, key: int, number: int, status: str) -> Delivery:
    return Delivery(
        event_id=event.pk,
        subscription="shop-ordered",
        mode="async",
        status=status,
        ordering_key=str(key),
        sequence=number,
    )


def one_pass() -> tuple[float, list[dict[str, str]], int]:
    """Seconds of one pass, its queries, and how many deliveries it would send."""
    with CaptureQueriesContext(connection) as queries:
        try:
            with transaction.atomic():
                started = time.perf_counter()
                result = resend_unfinished(older_than=HOUR)
                took = time.perf_counter() - started
                raise Rollback
        except Rollback:
            pass
    return took, queries.captured_queries, result.total


def check_alone() -> float:
    """Seconds of the pass's check of pending rows alone (`_lost_pending`), for the queue."""
    registry = get_registry()
    queue = registry.subscriptions["shop-ordered"].queue
    now = timezone.now()
    horizon = now - timedelta(seconds=HOUR)
    started = time.perf_counter()
    unfinished._lost_pending(queue, registry, [], horizon, 500, "default", lambda: now)
    return time.perf_counter() - started


def explain(sql: str) -> str:
    """The plan of ``sql`` as run (in a transaction rolled back)."""
    prefix = "EXPLAIN (ANALYZE, COSTS OFF) " if connection.vendor == "postgresql" else ""
    if not prefix:
        prefix = "EXPLAIN QUERY PLAN "
    with connection.cursor() as cursor:
        try:
            with transaction.atomic():
                cursor.execute(prefix + sql)
                lines = [
                    str(row[-1] if prefix.startswith("EXPLAIN Q") else row[0])
                    for row in cursor.fetchall()
                ]
                raise Rollback
        except Rollback:
            pass
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("counts", nargs="+", type=int, help="ordered (and unordered) rows")
    parser.add_argument("--history", type=int, default=0, help="succeeded rows before each key")
    parser.add_argument("--ordered-only", action="store_true", help="no unordered rows")
    parser.add_argument("--keys", type=int, default=5, help="ordered keys (default 5)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plans", action="store_true", help="print each SELECT's plan")
    options = parser.parse_args()
    call_command("migrate", verbosity=0)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    with shop_wiring(queue, SUBSCRIPTIONS=[PLAIN, ORDERED]):
        for count in options.counts:
            fill(count, options.keys, not options.ordered_only, options.history)
            timings, sent = [], 0
            for _ in range(options.repeat):
                took, queries, sent = one_pass()
                timings.append(took)
            check = min(check_alone() for _ in range(options.repeat))
            print(
                f"{connection.vendor} {count} ordered + {0 if options.ordered_only else count} "
                f"unordered pending, {options.keys} keys, history {options.history}: "
                f"pass {min(timings):.3f} s, its check of pending rows "
                f"{check * 1000:.1f} ms (best of {options.repeat}; "
                f"{len(queries)} queries, {sent} to send)"
            )
            for query in queries:
                sql = query["sql"]
                if not sql.startswith("SELECT") or "FOR UPDATE" in sql:
                    continue
                plan = explain(sql)
                total = re.search(r"Execution Time: ([\d.]+) ms", plan)
                print(f"  {float(query['time']) * 1000:9.1f} ms  {sql[:110]}")
                if options.plans or (total and float(total.group(1)) > 50):
                    print("    " + plan.replace("\n", "\n    "))


if __name__ == "__main__":
    main()
