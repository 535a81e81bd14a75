"""A message lost before any worker recorded it, on a real broker with a real worker: the
relay sends it again and the worker completes it, once (docs/reliability.md)."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from django_events import publish
from django_events.delivery import marking
from django_events.delivery.broker import waiting_messages
from django_events.models import Delivery, EventRecord, RelayCheckpoint
from django_events.operations.unfinished import drain_settle, resend_after
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import fresh_queue, wait_for, wait_idle, worker_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

MANIFESTS = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "faults.yaml")]
# Redis: a visibility timeout of 2 s (Celery's default is an hour), for the worker and for the
# relay, whose wait after the queue drained follows it; in a Redis database of its own, since
# kombu keeps the unacknowledged messages per database and a worker hands back every one it
# finds there older than its timeout (on the shared one, the messages other tests' workers
# held for longer ran twice).
REDIS_URL = os.environ.get("DJANGO_EVENTS_UNFINISHED_REDIS_URL", "redis://127.0.0.1:6379/12")
VISIBILITY_TIMEOUT = "2"
publishers = {"amqp": brokers.make_app("amqp"), "redis": brokers.make_app("redis", REDIS_URL)}
publishers["redis"].conf.broker_transport_options["visibility_timeout"] = float(VISIBILITY_TIMEOUT)


def relay() -> str:
    out = StringIO()
    call_command("events_relay", "--min-age", "0", stdout=out, stderr=StringIO())
    return out.getvalue()


def lose_every_message(kind: str, queue: str) -> int:
    """Take the queue's messages away as a consumer killed at once would: on Redis, kombu's
    ``BRPOP`` takes a message off the list before it is noted as unacknowledged."""
    with publishers[kind].connection_for_write() as connection:
        channel = connection.default_channel
        if kind == "redis":
            taken = 0
            while channel.client.rpop(queue) is not None:
                taken += 1
            return taken
        return int(channel.queue_purge(queue))


@pytest.mark.long
@pytest.mark.parametrize("kind", brokers.worker_kinds("redis", "amqp"))
def test_a_lost_message_is_resent_by_the_relay_and_runs_once(kind: str, tmp_path: Path) -> None:
    with fresh_queue(kind, "unfinished", publishers[kind]) as queue:
        wiring = {
            **settings.DJANGO_EVENTS,
            "MANIFESTS": MANIFESTS,
            "CELERY_APP": f"tests.test_unfinished_delivery.{kind}_publisher",
            "DEFAULT_QUEUE": queue,
        }
        with override_settings(DJANGO_EVENTS=wiring):
            once = publish("fault.placed", {"order_id": 1})
            plain = publish("fault.placed", {"order_id": 2, "plain": True})
            marking.flush()
            ids = [once.id, plain.id]
            assert set(EventRecord.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
                "dispatched"
            }
            assert lose_every_message(kind, queue) == 2
            # Long ago: older than the default threshold (on Redis, with its visibility timeout).
            long_ago = timezone.now() - timedelta(seconds=resend_after() + 600)
            EventRecord.objects.filter(pk__in=ids).update(dispatched_at=long_ago)

            env = {
                "DJANGO_EVENTS_FAULT_DIR": str(tmp_path),
                "DJANGO_EVENTS_REDIS_URL": REDIS_URL,
                "DJANGO_EVENTS_REDIS_VISIBILITY_TIMEOUT": VISIBILITY_TIMEOUT,
            }
            with worker_for(kind, queue, tmp_path, manifest="faults.yaml", env=env) as worker:
                out = relay()
                settle = drain_settle()
                if settle:
                    # Redis: a dead worker's messages come back after the visibility timeout;
                    # until the queue has been seen empty for that long, nothing is resent.
                    assert "resent" not in out, out
                    time.sleep(settle + 1)
                    out = relay()
                assert "resent 2 delivery(ies) with no outcome" in out, out
                wait_for(
                    lambda: (
                        Delivery.objects.filter(event_id__in=ids, status="succeeded").count() == 2
                    ),
                    timeout=60,
                    what="the resent deliveries",
                )
                wait_idle(worker)
                assert "resent" not in relay()  # they have their outcome now
                wait_idle(worker)

    runs = Counter(HandlerRun.objects.filter(event_id__in=ids).values_list("handler", "event_id"))
    assert runs == {("hang_once", once.id): 1, ("hang_plain", plain.id): 1}
    rows = Delivery.objects.filter(event_id__in=ids)
    assert sorted(rows.values_list("subscription", "status", "attempts")) == [
        ("fault-once", "succeeded", 1),
        ("fault-plain", "succeeded", 1),
    ]


def test_a_worker_sigkilled_on_the_filesystem_transport_loses_what_it_took_to_the_relay(
    tmp_path: Path,
) -> None:
    # kombu's filesystem transport deletes a message's file when a worker takes it: the
    # messages a worker runs or holds in advance (prefetch) die with it.
    with fresh_queue("filesystem", "unfinished") as queue:
        wiring = {
            **settings.DJANGO_EVENTS,
            "MANIFESTS": MANIFESTS,
            "CELERY_APP": "tests.brokers.filesystem",
            "DEFAULT_QUEUE": queue,
        }
        env = {"DJANGO_EVENTS_FAULT_DIR": str(tmp_path)}
        with override_settings(DJANGO_EVENTS=wiring):
            worker = worker_for("filesystem", queue, tmp_path, manifest="faults.yaml", env=env)
            worker.start()
            try:
                # Four deliveries hang on their first run: the worker's two pool processes run
                # two of them, its main process holds the other two. (Plain ones: on SQLite an
                # idempotent one holds the write lock while it runs.)
                ids = [
                    publish("fault.placed", {"order_id": n, "hang": 60, "plain": True}).id
                    for n in range(4)
                ]
                wait_for(
                    lambda: (
                        len(list(tmp_path.glob("*-hang_plain"))) == 2
                        and not _ready_files(queue)
                        and worker.log().count(" received") == 4
                    ),
                    what="two runs under way and the other two messages taken",
                )
            finally:
                worker.kill()
            assert not _ready_files(queue)  # nothing came back
            assert not Delivery.objects.filter(event_id__in=ids).exists()
            started = {uuid.UUID(p.name[:36]) for p in tmp_path.glob("*-hang_plain")}
            for event_id in ids:  # no more hanging
                (tmp_path / f"{event_id}-hang_plain").touch(exist_ok=True)
            # Marked dispatched now (on PostgreSQL the background marker does it, in its own
            # time: a mark written after the update below would date the dispatch now again).
            marking.flush()
            assert set(EventRecord.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
                "dispatched"
            }
            long_ago = timezone.now() - timedelta(seconds=resend_after() + 600)
            EventRecord.objects.filter(pk__in=ids).update(dispatched_at=long_ago)

            with worker_for(
                "filesystem", queue, tmp_path, manifest="faults.yaml", env=env
            ) as again:
                relayed = relay()
                # Should the relay resend less, what it saw.
                assert "resent 4 delivery(ies) with no outcome" in relayed, (
                    relayed,
                    list(RelayCheckpoint.objects.values()),
                    list(Delivery.objects.filter(event_id__in=ids).values()),
                    list(EventRecord.objects.filter(pk__in=ids).values("status", "dispatched_at")),
                    waiting_messages(queue),
                )
                wait_for(
                    lambda: (
                        Delivery.objects.filter(event_id__in=ids, status="succeeded").count() == 4
                    ),
                    timeout=60,
                    what="the resent deliveries",
                )
                wait_idle(again)

    runs = Counter(HandlerRun.objects.filter(event_id__in=ids).values_list("event_id", flat=True))
    # Each ran again, once; the two killed while running had recorded their start before.
    assert runs == {i: 2 if i in started else 1 for i in ids}


def _ready_files(queue: str) -> list[Path]:
    """The message files waiting on ``queue`` (kombu's name: the queue after the first dot)."""
    return [p for p in brokers.FS_FOLDER.iterdir() if p.name.partition(".")[2] == f"{queue}.msg"]


amqp_publisher = publishers["amqp"]
redis_publisher = publishers["redis"]
