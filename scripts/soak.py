#!/usr/bin/env python
"""Soak run: N events through RabbitMQ, two workers, one SIGKILLed and restarted in a loop.

Not part of the test suite (it runs for minutes). Needs PostgreSQL and RabbitMQ on
loopback; it creates and drops its own database and queue. See docs/reliability.md.

    .venv/bin/python scripts/soak.py --events 20000 --kill-every 5

Every event goes to one idempotent and one plain async subscription (tests/manifests/
soak.yaml). Prints events published, deliveries completed, duplicate runs of each kind, and
events lost; exits 1 if an idempotent handler ran twice or an event was lost.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.worker import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("DJANGO_EVENTS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events to publish")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--batch", type=int, default=500, help="events per transaction")
    parser.add_argument(
        "--settle", type=float, default=180.0, help="give up after this long without progress"
    )
    args = parser.parse_args()

    queue = f"soak-{uuid.uuid4().hex[:8]}"
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DJANGO_EVENTS_TEST_MANIFEST="soak.yaml",
        DJANGO_EVENTS_TEST_QUEUE=queue,
        CELERY_BROKER_URL=AMQP_URL,
    )
    os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    from tests.worker import WorkerProcess

    databases = setup_databases(verbosity=0, interactive=False)
    logs = Path(tempfile.mkdtemp(prefix="soak-"))
    steady, victim = (
        WorkerProcess(
            "amqp",
            queue,
            connection.settings_dict["NAME"],
            logs / f"worker-{role}.log",
            extra_env={"DJANGO_EVENTS_TEST_MANIFEST": "soak.yaml"},
            node=f"{queue}-{role}",
        )
        for role in ("steady", "victim")
    )
    print(f"queue {queue}, database {connection.settings_dict['NAME']}, logs in {logs}")
    try:
        with steady, victim:
            return _soak(args, victim)
    finally:
        _drop_queue(queue)
        teardown_databases(databases, verbosity=0)


def _soak(args: argparse.Namespace, victim: WorkerProcess) -> int:
    from django.core.management import call_command
    from django.db import transaction

    from django_events import publish_many
    from django_events.models import Delivery, EventRecord
    from tests.app.models import HandlerRun

    stop = threading.Event()
    kills = [0]

    def killer() -> None:
        while not stop.wait(args.kill_every):
            victim.kill()
            kills[0] += 1
            if not stop.is_set():
                victim.start()

    started = time.monotonic()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    published = 0
    while published < args.events:
        count = min(args.batch, args.events - published)
        with transaction.atomic():
            publish_many(("soak.tick", {"n": published + i}) for i in range(count))
        published += count
    print(f"published {published} events in {time.monotonic() - started:.1f}s")
    call_command("events_relay", "--min-age", "0")  # anything the broker did not take

    expected = 2 * published
    done, last_change, last_done = 0, time.monotonic(), -1
    while done < expected and time.monotonic() - last_change < args.settle:
        time.sleep(2)
        done = Delivery.objects.filter(status="succeeded").count()
        if done != last_done:
            last_change, last_done = time.monotonic(), done
    stop.set()
    thread.join()
    if victim.process is None or victim.process.poll() is not None:
        victim.start()
    time.sleep(5)  # redelivered duplicates still in flight show up now
    elapsed = time.monotonic() - started

    ids = set(EventRecord.objects.values_list("id", flat=True))
    once = Counter(
        HandlerRun.objects.filter(handler="hang_once").values_list("event_id", flat=True)
    )
    plain = Counter(
        HandlerRun.objects.filter(handler="hang_plain").values_list("event_id", flat=True)
    )
    figures = [
        ("events published", len(ids)),
        ("deliveries expected", expected),
        ("deliveries completed", Delivery.objects.filter(status="succeeded").count()),
        ("worker kills (SIGKILL, whole worker)", kills[0]),
        ("duplicate runs, non-idempotent handler", sum(plain.values()) - len(plain)),
        ("duplicate runs, idempotent handler", sum(once.values()) - len(once)),
        ("events lost", len(ids - set(once)) + len(ids - set(plain))),
        ("failed deliveries", Delivery.objects.filter(status="failed").count()),
        ("events still pending", EventRecord.objects.filter(status="pending").count()),
        ("wall time (s)", round(elapsed)),
    ]
    for label, value in figures:
        print(f"{label + ':':<42}{value}")
    dup_once, lost = figures[5][1], figures[6][1]
    return 1 if dup_once or lost else 0


def _drop_queue(queue: str) -> None:
    from tests.brokers import amqp

    with amqp.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)


if __name__ == "__main__":
    sys.exit(main())
