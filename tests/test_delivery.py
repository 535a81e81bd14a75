"""End to end: publish() -> a real broker -> a real `celery worker` process -> handlers.

Runs on the filesystem transport, RabbitMQ and Redis; the database is SQLite or PostgreSQL
depending on DATABASE_URL (the test command runs the suite on both).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from django.db import connection, transaction

from django_events import publish
from django_events.delivery.messages import TASK_NAME, build_message, event_body
from django_events.models import Delivery, EventRecord
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import WorkerProcess, start_worker, wait_for, wait_idle

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


@dataclass
class Broker:
    kind: str
    queue: str
    worker: WorkerProcess
    marker: Path

    @property
    def app(self):  # the Celery app the test process sends with
        return getattr(brokers, self.kind)


@pytest.fixture(scope="module", params=brokers.worker_kinds("filesystem", "amqp", "redis"))
def broker(request, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Broker]:
    kind = request.param
    folder = tmp_path_factory.mktemp(f"worker-{kind}")
    marker = folder / "imported"
    env = {"DJANGO_EVENTS_IMPORT_MARKER": str(marker)}
    with start_worker(kind, folder, prefix=f"it-{kind}", env=env) as worker:
        yield Broker(kind, worker.queue, worker, marker)


@pytest.fixture
def wired(broker: Broker) -> Iterator[Broker]:
    with brokers.delivery_wiring(broker.kind, broker.queue, "delivery.yaml"):
        yield broker


def runs(handler: str, event_ids) -> list[HandlerRun]:
    return list(
        HandlerRun.objects.filter(handler=handler, event_id__in=list(event_ids)).order_by(
            "created_at"
        )
    )


def test_committed_events_reach_async_handlers_exactly_once(wired: Broker) -> None:
    ids = []
    for order_id in range(10):
        with transaction.atomic():
            ids.append(publish("it.placed", {"order_id": order_id, "total": 10.0 * order_id}).id)
    with transaction.atomic():
        big = publish("it.placed", {"order_id": 99, "total": 1500}).id
    ids.append(big)

    wait_for(lambda: len(runs("record", ids)) >= 11, what="11 async deliveries")
    wait_for(lambda: len(runs("record_other", [big])) >= 1, what="the big-order subscription")
    wait_idle(wired.worker)  # a duplicate would have run by now

    assert sorted(str(r.event_id) for r in runs("record", ids)) == sorted(map(str, ids))
    assert [r.event_id for r in runs("record_other", ids)] == [big]  # the `when` filter held
    assert set(EventRecord.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        "dispatched"
    }
    deliveries = Delivery.objects.filter(event_id__in=ids, subscription="it-record")
    assert set(deliveries.values_list("status", "attempts")) == {("succeeded", 1)}
    assert deliveries.count() == 11
    assert runs("record", ids)[0].pid != os.getpid()  # the worker ran it, not this process


def test_rolled_back_transaction_sends_and_records_nothing(wired: Broker) -> None:
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        lost = publish("it.placed", {"order_id": 1}).id
        raise Rollback
    with transaction.atomic():
        marker = publish("it.placed", {"order_id": 2}).id

    wait_for(lambda: runs("record", [marker]), what="the committed marker event")
    wait_idle(wired.worker)
    assert not EventRecord.objects.filter(pk=lost).exists()
    assert runs("record", [lost]) == []
    assert not Delivery.objects.filter(event_id=lost).exists()


def test_failing_handler_is_retried_with_growing_delays_then_fails(wired: Broker) -> None:
    event_id = publish("it.placed", {"order_id": 7, "fail": True}).id

    delivery = wait_for(
        lambda: Delivery.objects.filter(
            event_id=event_id, subscription="it-fails", status="failed"
        ).first(),
        timeout=40,
        what="the failed delivery",
    )
    attempts = runs("always_fails", [event_id])
    assert len(attempts) == 3 == delivery.attempts
    gaps = [(b.created_at - a.created_at).total_seconds() for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.3  # backoff 0.4 s, no jitter
    assert gaps[1] >= 0.7  # then 0.8 s
    assert gaps[1] > gaps[0]
    assert delivery.last_error == "RuntimeError: boom for 7"
    assert "Traceback" in delivery.traceback and "always_fails" in delivery.traceback
    wait_idle(wired.worker)
    assert len(runs("always_fails", [event_id])) == 3  # no fourth attempt


def test_unknown_subscription_is_a_recorded_failure_and_imports_nothing(wired: Broker) -> None:
    event = publish("it.strict", {"order_id": 5})
    wait_for(lambda: runs("record", [event.id]), what="the normal delivery")
    message = build_message(event_body(event), "no-such-subscription", "default")
    message["handler"] = "tests.app.import_marker.handle"  # must be ignored
    wired.app.send_task(TASK_NAME, args=(message,), queue=wired.queue, serializer="json")

    failure = wait_for(
        lambda: Delivery.objects.filter(
            event_id=event.id, subscription="no-such-subscription"
        ).first(),
        what="the unknown-subscription failure",
    )
    assert failure.status == "failed"
    assert "Unknown subscription 'no-such-subscription'" in failure.last_error
    assert not wired.marker.exists()


def test_a_message_of_an_unknown_format_version_is_a_recorded_failure(wired: Broker) -> None:
    stored = publish("it.strict", {"order_id": 6})
    event_id = str(uuid.uuid4())  # an event only this message carries
    message = build_message({**event_body(stored), "id": event_id}, "it-strict", "default")
    message["v"] = 2  # a newer release's format
    wired.app.send_task(TASK_NAME, args=(message,), queue=wired.queue, serializer="json")

    failure = wait_for(
        lambda: Delivery.objects.filter(event_id=event_id).first(),
        what="the unknown-version failure",
    )
    # Not run: `Delivery.attempts` counts handler runs (DESIGN 3.7), so 0, not 1.
    assert (failure.subscription, failure.status, failure.attempts) == ("it-strict", "failed", 0)
    assert failure.last_error.startswith(
        "Message format v2 is unknown to this worker (it reads v1)"
    )
    wait_for(lambda: runs("record", [stored.id]), what="the stored event's own delivery")
    wait_idle(wired.worker)
    assert runs("record", [event_id]) == []  # the handler never ran for it


def test_idempotent_subscription_ignores_a_redelivered_message(wired: Broker) -> None:
    event = publish("it.strict", {"order_id": 6})
    wait_for(
        lambda: Delivery.objects.filter(event_id=event.id, status="succeeded").exists(),
        what="the first delivery",
    )
    # The same message again, as a broker would redeliver it.
    message = build_message(event_body(event), "it-strict", "default")
    wired.app.send_task(TASK_NAME, args=(message,), queue=wired.queue, serializer="json")
    follow_up = publish("it.strict", {"order_id": 7})
    wait_for(lambda: runs("record", [follow_up.id]), what="a later event")
    wait_idle(wired.worker)
    assert len(runs("record", [event.id])) == 1
    assert Delivery.objects.get(event_id=event.id).attempts == 1


def test_poison_messages_are_recorded_and_the_worker_keeps_serving(wired: Broker) -> None:
    stored = publish("it.strict", {"order_id": 8})
    wait_for(lambda: runs("record", [stored.id]), what="the stored event")
    bad_payload = {**event_body(stored), "id": str(uuid.uuid4()), "payload": {"order_id": "x"}}
    EventRecord.objects.create(
        id=bad_payload["id"],
        name="it.strict",
        payload=bad_payload["payload"],
        correlation_id=stored.correlation_id,
    )
    unknown = build_message(event_body(stored), "no-such-subscription", "default")
    for args in [
        (build_message(bad_payload, "it-strict", "default"),),  # payload fails the schema
        ("not a message",),  # not a django_events message
        (unknown,),  # unknown subscription
        (),  # not even the task's signature
    ]:
        wired.app.send_task(TASK_NAME, args=args, queue=wired.queue, serializer="json")
    _send_raw(wired, b'{"truncated json')  # a body no serializer can read
    after = [publish("it.strict", {"order_id": 9 + i}) for i in range(3)]

    wait_for(lambda: len(runs("record", [a.id for a in after])) == 3, what="events after them")
    failure = wait_for(
        lambda: Delivery.objects.filter(event_id=bad_payload["id"]).first(),
        what="the invalid-payload failure",
    )
    wait_for(lambda: "decode message body" in wired.worker.log(), what="the undecodable body")
    wait_idle(wired.worker)  # a poison message going round again would show up by now
    assert (failure.status, failure.attempts) == ("failed", 0)  # the handler never ran
    assert "Payload no longer valid for 'it.strict'" in failure.last_error
    assert "$.order_id" in failure.last_error
    assert runs("record", [bad_payload["id"]]) == []
    unknown_failure = Delivery.objects.get(event_id=stored.id, subscription="no-such-subscription")
    # Never ran either: 0 (it recorded 1 while DESIGN 3.7's attempts count handler runs).
    assert (unknown_failure.status, unknown_failure.attempts) == ("failed", 0)
    log = wired.worker.log()
    assert log.count("Payload no longer valid for 'it.strict'") == 1  # not redelivered
    assert log.count("Rejected a malformed django_events message") == 1
    assert log.count("Can't decode message body") == 1
    assert log.count('raised unexpected: TypeError("deliver() missing 1 required') == 1


def test_sigkilled_pool_processes_lose_no_delivery(wired: Broker) -> None:
    # Every pool process SIGKILLed while idle: on the filesystem transport, kombu's own made
    # Celery run billiard's classic pool, whose idle processes wait for a job holding one
    # shared lock; the one killed holding it left the pool wedged, the worker's messages
    # neither run nor given back (django_events.contrib.filesystem_transport).
    wait_idle(wired.worker)
    before = wired.worker.pool_children()
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: len(set(wired.worker.pool_children()) - set(before)) == 2,
        what="two new pool processes",
    )
    done = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        # Then one pool process every 0.3 s while deliveries run: a message a killed process
        # was running goes back to the queue (acks_late + reject_on_worker_lost).
        while not done.wait(0.3) and len(killed) < 4:
            if children := wired.worker.pool_children():
                pid = random.choice(children)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        ids = [publish("it.placed", {"order_id": n}).id for n in range(100)]
        wait_for(
            lambda: len({r.event_id for r in runs("record", ids)}) == len(ids),
            timeout=60,
            what="every delivery to run",
        )
    finally:
        done.set()
        thread.join()
    wait_for(
        lambda: Delivery.objects.filter(event_id__in=ids, status="succeeded").count() == len(ids),
        what="every delivery's success row",
    )
    assert killed


def _send_raw(broker: Broker, body: bytes) -> None:
    """Publish a task message whose body is not valid JSON (a corrupt or foreign message)."""
    headers = {"task": TASK_NAME, "id": str(uuid.uuid4()), "lang": "py", "retries": 0}
    with broker.app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=broker.queue,
            routing_key=broker.queue,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
        )


def test_events_committed_while_the_broker_is_down_are_relayed(wired: Broker) -> None:
    from django.core.management import call_command

    with brokers.delivery_wiring("unreachable", wired.queue, "delivery.yaml"):
        ids = []
        for order_id in range(5):
            with transaction.atomic():
                ids.append(publish("it.placed", {"order_id": order_id}).id)
    assert set(EventRecord.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        "pending"
    }
    wait_idle(wired.worker)
    assert runs("record", ids) == []

    call_command("events_relay", "--min-age", "0", "--batch-size", "2")

    wait_for(lambda: len(runs("record", ids)) == 5, what="the relayed events")
    assert set(EventRecord.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        "dispatched"
    }
    wait_idle(wired.worker)
    assert len(runs("record", ids)) == 5  # each once


def test_a_one_shot_relay_right_after_an_outage_sends_the_recent_records(wired: Broker) -> None:
    from io import StringIO

    from django.core.management import call_command

    with brokers.delivery_wiring("unreachable", wired.queue, "delivery.yaml"):
        ids = []
        for order_id in range(3):
            with transaction.atomic():
                ids.append(publish("it.placed", {"order_id": order_id}).id)
    out = StringIO()

    # All younger than --min-age: the relay used to leave them and report "0 still pending".
    call_command("events_relay", "--min-age", "4", stdout=out)

    assert "Waiting" in out.getvalue() and "3 pending record(s) are younger" in out.getvalue()
    assert "Relayed 3 event(s); 0 still pending." in out.getvalue()
    assert set(EventRecord.objects.filter(pk__in=ids).values_list("status", flat=True)) == {
        "dispatched"
    }
    wait_for(lambda: len(runs("record", ids)) == 3, what="the relayed events")


@pytest.mark.postgresql
def test_worker_survives_its_database_connections_being_killed(wired: Broker) -> None:
    first = publish("it.strict", {"order_id": 1})
    wait_for(lambda: runs("record", [first.id]), what="a first delivery")
    with connection.cursor() as cursor:  # what a database restart does to the worker
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    second = publish("it.strict", {"order_id": 2})
    wait_for(lambda: runs("record", [second.id]), what="a delivery after the restart")
    # The handler's row commits before the worker writes the delivery's outcome.
    wait_for(
        lambda: Delivery.objects.filter(event_id=second.id, status="succeeded").exists(),
        what="its outcome",
    )
