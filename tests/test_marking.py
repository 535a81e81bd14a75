"""Marking records dispatched in the background (delivery/marking.py): the commit path neither
waits for publisher confirms nor writes the UPDATE, and nothing committed is lost by it."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.db import OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from kombu import Queue

from django_events import publish, publish_many
from django_events.delivery import broker, marking
from django_events.delivery.confirms import PublisherConfirms
from django_events.delivery.recording import record_for
from django_events.delivery.worker import process_message
from django_events.events import Event
from django_events.models import Delivery, EventRecord
from django_events.operations.relay import relay_pending
from tests import brokers
from tests.conftest import wiring
from tests.faultproxy import FaultProxy
from tests.test_confirms import ScriptedChannel, publish_tags
from tests.worker import wait_for, wake_ups

ROOT = Path(__file__).resolve().parent.parent
ORDER = {"order_id": 1, "total": 10.0}
ASYNC = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "async"}

# Celery apps whose queue refuses every message: RabbitMQ nacks each publish. One a test (an
# app declares its queues once).
refusing = brokers.make_app("amqp")
refusing_hand_ons = brokers.make_app("amqp")
# One publishing through a FaultProxy, set by the test that cuts it.
proxied: Celery | None = None


def _pending_records(count: int) -> list[uuid.UUID]:
    """Ids of ``count`` committed records left pending: what a marker marks dispatched."""
    now = timezone.now()
    events = [Event(uuid.uuid4(), "orders.placed", {}, {}, now, 1, None, {}) for _ in range(count)]
    EventRecord.objects.bulk_create([record_for(e, EventRecord.Status.PENDING) for e in events])
    return [e.id for e in events]


@pytest.fixture
def quick() -> Iterator[marking.Marker]:
    """A marker of the test's own, a round every 0.02 s; stopped after the test."""
    marker = marking.Marker(interval=0.02)
    yield marker
    marker.stop()


@pytest.mark.django_db(transaction=True)
def test_an_idle_marker_sleeps_until_something_is_taken(quick: marking.Marker) -> None:
    ids = _pending_records(2)
    quick.taken("default", ids[:1])
    wait_for(lambda: _statuses(ids) == ["dispatched", "pending"], 10, "the first marked")
    thread = quick._thread
    assert thread is not None
    wait_for(lambda: quick._idle, 10, "the thread asleep")

    # Nothing to mark or collect: 25 intervals go by without the thread waking once.
    assert wake_ups(thread, 0.5) <= 1

    quick.taken("default", ids[1:])
    wait_for(lambda: _statuses(ids) == ["dispatched"] * 2, 10, "the second marked")


@pytest.mark.django_db(transaction=True)
def test_marks_a_failed_flush_puts_back_wake_an_idle_marker(quick: marking.Marker) -> None:
    ids = _pending_records(2)

    def refused(alias: str, values: Any) -> None:
        raise OperationalError("the database cannot be written")

    quick.taken("default", ids[:1])
    wait_for(lambda: quick._idle, 10, "the thread asleep")
    # What a flush from another thread does when its write fails while the thread sleeps:
    # the marks go back, and the thread must write them without another taken().
    quick._write_one("default", refused, ids[1:], quick._taken, "mark %d event(s)")
    wait_for(lambda: _statuses(ids) == ["dispatched"] * 2, 10, "the mark put back written")


@pytest.mark.django_db(transaction=True)
def test_marks_a_failed_flush_puts_back_after_stop_start_a_thread(quick: marking.Marker) -> None:
    ids = _pending_records(1)

    def refused(alias: str, values: Any) -> None:
        raise OperationalError("the database cannot be written")

    quick.stop()  # no thread now, as after a stop that a round outlived
    quick._write_one("default", refused, ids, quick._taken, "mark %d event(s)")
    wait_for(lambda: _statuses(ids) == ["dispatched"], 10, "the mark put back written")


class _RoundHeldAfterFlush:
    """A kept connection whose confirms the marker's thread cannot read until released, from
    its first round after a flush began: a round that outlasts `Marker.stop`'s patience."""

    def __init__(self) -> None:
        self.armed = False
        self.released = threading.Event()

    def collect(self, timeout: float) -> list[tuple[marking.Marks, set[uuid.UUID]]]:
        if threading.current_thread().name != "django_events-dispatched":
            self.armed = True  # a flush holds the rounds back: the next one is after it
        elif self.armed:
            self.released.wait(30)
        return []

    def outstanding(self) -> bool:
        return not self.released.is_set()


@pytest.mark.django_db(transaction=True)
def test_a_thread_stop_gave_up_waiting_for_ends_after_its_round(quick: marking.Marker) -> None:
    held = _RoundHeldAfterFlush()
    quick.watch(held)
    old = quick._thread
    assert old is not None
    try:
        quick.stop(timeout=1)  # its flush waits 1 s for confirms, then the round holds the thread
        assert old.is_alive()
        first, second = _pending_records(2)
        quick.taken("default", [first])  # a new thread, while the old one is in its round
        new = quick._thread
        assert new is not None and new is not old
    finally:
        held.released.set()  # the old round ends (and the new thread's wait for it)
    wait_for(lambda: not old.is_alive(), 10, "the old thread's end after its round")
    wait_for(lambda: _statuses([first]) == ["dispatched"], 10, "the first mark")
    assert new.is_alive()  # the stop was the old thread's only
    quick.taken("default", [second])  # the old thread gone: only the new one can mark it
    wait_for(lambda: _statuses([second]) == ["dispatched"], 10, "the new thread's mark")
    quick.stop()
    assert not new.is_alive()


def test_batches_sharing_a_channel_settle_apart() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    channel = ScriptedChannel([("basic_nack", 1, False)])
    confirms = PublisherConfirms.start(channel)
    assert confirms is not None
    publish_tags(confirms, a)  # batch 1: tag 1
    publish_tags(confirms, b)  # batch 2: tag 2
    assert confirms.settle({a}) is None  # nothing read yet
    confirms.wait(timeout=0.01)  # the nack of tag 1; tag 2 still waits
    assert confirms.settle({a}) == (set(), {a})
    assert confirms.settle({b}) is None
    confirms._on_ack(2, False)
    assert confirms.settle({b}) == ({b}, set())  # batch 1's refusal is not batch 2's


@pytest.fixture
def queue() -> Iterator[str]:
    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    name = f"marking-{uuid.uuid4().hex[:8]}"
    yield name
    with brokers.amqp.connection_for_write() as conn:
        conn.default_channel.queue_delete(name)


def _task_messages(queue: str) -> list[dict[str, Any]]:
    """Take the messages waiting on ``queue`` (RabbitMQ): each one's argument."""
    bodies = []
    with brokers.amqp.connection_for_write() as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            bodies.append(json.loads(message.body)[0][0])
    return bodies


def _messages(queue: str) -> list[dict[str, Any]]:
    return [message["event"] for message in _task_messages(queue)]


def _statuses(ids: list[uuid.UUID]) -> list[str]:
    records = EventRecord.objects.in_bulk(ids)
    return [records[i].status for i in ids]


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_the_commit_path_leaves_the_update_to_the_marker(queue: str) -> None:
    with wiring(ASYNC, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"):
        with CaptureQueriesContext(connection) as queries, transaction.atomic():
            events = [publish("orders.placed", ORDER) for _ in range(3)]
        assert not [q for q in queries if q["sql"].startswith("UPDATE")]
        marking.flush()
    ids = [e.id for e in events]
    assert _statuses(ids) == ["dispatched"] * 3
    assert sorted(m["id"] for m in _messages(queue)) == sorted(map(str, ids))


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db
def test_callbacks_run_inside_an_open_transaction_mark_at_once(
    queue: str, django_capture_on_commit_callbacks: Any
) -> None:
    # As TestCase.captureOnCommitCallbacks(execute=True) runs them: the rows are not committed,
    # so the marker's own connection could not see them; the publisher's connection marks.
    with (
        wiring(ASYNC, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        event = publish("orders.placed", ORDER)
    assert _statuses([event.id]) == ["dispatched"]
    assert [m["id"] for m in _messages(queue)] == [str(event.id)]


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_an_event_the_broker_refuses_stays_pending_and_the_relay_sends_it(queue: str) -> None:
    refusing.conf.task_queues = [
        Queue(queue, queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    ]
    with wiring(ASYNC, DEFAULT_QUEUE=queue, CELERY_APP="tests.test_marking.refusing"):
        with transaction.atomic():
            event = publish("orders.placed", ORDER)
        marking.flush()
    assert _statuses([event.id]) == ["pending"]
    assert _messages(queue) == []

    other = f"{queue}-relayed"
    try:
        with wiring(ASYNC, DEFAULT_QUEUE=other, CELERY_APP="tests.brokers.amqp"):
            assert relay_pending(min_age=0).sent == 1
        assert _statuses([event.id]) == ["dispatched"]
        assert [m["id"] for m in _messages(other)] == [str(event.id)]
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(other)


_PUBLISHER = """
import os, sys, django
django.setup()
from django.db import transaction
from django.test import override_settings
from django.conf import settings
from django_events import publish
from django_events.delivery import marking
# A marker whose rounds never come before the kill (on a busy machine a round could mark
# all five first, and the test would see nothing to relay).
marking._marker, marking._marker_pid = marking.Marker(interval=600), os.getpid()
value = {**settings.DJANGO_EVENTS, "SUBSCRIPTIONS": [%(subscription)r],
         "DEFAULT_QUEUE": %(queue)r, "CELERY_APP": "tests.brokers.amqp"}
with override_settings(DJANGO_EVENTS=value):
    for _ in range(5):
        with transaction.atomic():
            print(publish("orders.placed", {"order_id": 1, "total": 1.0}).id, flush=True)
os._exit(0)  # killed, as it were: no exit hooks, the marker's thread gone with the process
"""


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_publisher_that_dies_before_marking_loses_nothing(queue: str) -> None:
    script = _PUBLISHER % {"subscription": ASYNC, "queue": queue}
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_WORKER_DB_NAME": connection.settings_dict["NAME"],
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    ids = [uuid.UUID(line) for line in done.stdout.split()]
    assert len(ids) == 5
    # Committed and sent, but not marked: the relay has what the process did not mark.
    assert _statuses(ids) == ["pending"] * 5

    with wiring(ASYNC, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"):
        relay_pending(min_age=0)
    assert _statuses(ids) == ["dispatched"] * 5
    # At least once: every event reached the queue, those sent twice too.
    assert {m["id"] for m in _messages(queue)} == set(map(str, ids))


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_busy_publisher_settles_the_confirms_that_arrived(queue: str) -> None:
    """The marker's rounds skip a connection whose thread is publishing: the publishing thread
    itself takes the confirms that arrived, after each batch. Otherwise a publisher that keeps
    publishing leaves every batch unconfirmed on its connection, and a connection lost then
    makes the relay send all of them again (issue 22's soak: 2 to 10 batches at a broker cut)."""
    # A marker whose rounds do not come during the test: only the publisher settles.
    slow = marking.Marker(interval=600)
    with _marker(slow), wiring(ASYNC, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"):
        with transaction.atomic():
            first = {e.id for e in publish_many(("orders.placed", ORDER) for _ in range(20))}
        deadline = time.monotonic() + 10
        while first & _unconfirmed() and time.monotonic() < deadline:
            with transaction.atomic():  # the next batch, as a busy publisher sends it
                publish("orders.placed", ORDER)
        assert not first & _unconfirmed()
        assert set(slow._taken.get("default", [])) >= first  # marked in the next round
        slow.stop()
    assert set(_statuses(list(first))) == {"dispatched"}


def _unconfirmed() -> set[uuid.UUID]:
    """Events of this thread's kept publisher connections whose batch waits for its confirms."""
    kept = getattr(broker._kept, "by_app", {}).values()
    return {event for k in kept for _, ids, _ in k.batches for event in ids}


@contextmanager
def _marker(replacement: marking.Marker) -> Iterator[None]:
    with marking._marker_lock:
        saved = marking._marker, marking._marker_pid
        marking._marker, marking._marker_pid = replacement, os.getpid()
    try:
        yield
    finally:
        replacement.stop()
        with marking._marker_lock:
            marking._marker, marking._marker_pid = saved


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_connection_lost_right_after_a_send_is_given_up_and_its_events_relayed(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The publishing thread's read of the confirms that arrived fails: its connection is given
    up at once (logged), not kept for more publishes whose confirms can never be read; the
    events it sent stay pending and the relay sends them."""
    slow = marking.Marker(interval=600)  # only the publishing thread reads confirms
    with FaultProxy.for_url(brokers.AMQP_URL) as proxy:
        global proxied
        proxied = brokers.make_app("amqp", proxy.url(brokers.AMQP_URL))
        wired = wiring(ASYNC, DEFAULT_QUEUE=queue, CELERY_APP="tests.test_marking.proxied")
        with _marker(slow), wired:
            kept, sent = None, []
            while kept is None or not kept.batches:  # a batch whose confirm is not read yet
                with transaction.atomic():
                    sent.append(publish("orders.placed", ORDER).id)
                kept = broker._kept.by_app[id(proxied)]
            assert select.select([kept.connection.connection.sock], [], [], 5)[0]
            # That confirm has arrived; then the connection ends. py-amqp reads one frame (the
            # confirm) before a publish, the message goes out, reading its confirm fails.
            proxy.cut("deaf")
            with transaction.atomic(), caplog.at_level(logging.WARNING, "django_events"):
                second = publish("orders.placed", ORDER)
            assert "Lost the publisher connection with 1 batch(es)" in caplog.text
            # Said once, by that warning: not also an ERROR about "0 event(s)".
            assert "Broker unreachable; 0 " not in caplog.text
            assert kept.broken and not _unconfirmed()
            slow.stop()
            assert _statuses([*sent, second.id]) == [*(["dispatched"] * len(sent)), "pending"]
            proxy.restore()
            broker.health.reset()
            relay_pending(min_age=0)
    ids = [*sent, second.id]
    assert _statuses(ids) == ["dispatched"] * len(ids)
    # At least once: the second event's message reached the queue before the relay's.
    assert {m["id"] for m in _messages(queue)} == set(map(str, ids))


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_broker_cut_with_confirms_outstanding_is_one_warning_and_loses_nothing(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A publish that fails on a kept connection drops it; the marker then leaves the batches
    still unconfirmed on it to the relay, instead of reading the closed connection (which
    logged a traceback: 'NoneType' object has no attribute 'drain_events')."""
    slow = marking.Marker(interval=600)
    with FaultProxy.for_url(brokers.AMQP_URL) as proxy:
        global proxied
        proxied = brokers.make_app("amqp", proxy.url(brokers.AMQP_URL))
        proxied.conf.broker_connection_timeout = 1
        wired = wiring(ASYNC, DEFAULT_QUEUE=queue, CELERY_APP="tests.test_marking.proxied")
        with _marker(slow), wired, caplog.at_level(logging.DEBUG, "django_events"):
            with transaction.atomic():
                warm = publish("orders.placed", ORDER)  # opens the kept connection
            proxy.cut("stall")  # sent, never confirmed
            with transaction.atomic():
                first = publish("orders.placed", ORDER)
            proxy.cut("refuse")  # the stalled connection reset: the next publish fails
            with transaction.atomic():
                second = publish("orders.placed", ORDER)
            slow.flush(timeout=1)
            assert "object has no attribute" not in caplog.text
            assert _statuses([first.id, second.id]) == ["pending"] * 2
            proxy.restore()
            broker.health.reset()
            relay_pending(min_age=0)
    ids = [warm.id, first.id, second.id]
    assert _statuses(ids) == ["dispatched"] * 3
    assert {m["id"] for m in _messages(queue)} == set(map(str, ids))


ORDERED = {**ASYNC, "name": "placed-in-order", "ordering_key": "order_id"}


def _held_behind_first(queue: str) -> tuple[dict[str, Any], Delivery]:
    """Two events of one key: the second's message held. The first's message, and the row of
    the second."""
    first = publish("orders.placed", ORDER)
    second = publish("orders.placed", ORDER)
    marking.flush()  # their confirms: the messages are in the queue
    messages = {m["event"]["id"]: m for m in _task_messages(queue)}
    assert process_message(messages[str(second.id)], 0).status == "held"
    return messages[str(first.id)], Delivery.objects.get(event_id=second.id)


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_hand_on_leaves_its_confirm_and_its_relay_due_time_to_the_marker(queue: str) -> None:
    """The worker that finishes a delivery sends the key's next one without waiting for the
    broker's confirm or writing its ``UPDATE``: the next delivery can start meanwhile (figure
    16's one key). Until the marker's round the row stays due for the relay."""
    slow = marking.Marker(interval=600)  # its rounds do not come during the test
    wired = wiring(ORDERED, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp")
    with _marker(slow), wired:
        first, handed = _held_behind_first(queue)
        assert process_message(first, 0).status == "succeeded"
        handed.refresh_from_db()
        assert (handed.status, handed.retry_at is not None) == ("pending", True)
        slow.flush()  # the confirm
        handed.refresh_from_db()
        assert (handed.status, handed.retry_at) == ("pending", None)
        assert [m["id"] for m in _messages(queue)] == [str(handed.event_id)]


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_hand_on_the_broker_refuses_stays_due_and_the_relay_sends_it(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    with wiring(ORDERED, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"):
        first, handed = _held_behind_first(queue)
    with brokers.amqp.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)  # declared again, refusing every message
    refusing_hand_ons.conf.task_queues = [
        Queue(queue, queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    ]
    app = "tests.test_marking.refusing_hand_ons"
    wired = wiring(ORDERED, DEFAULT_QUEUE=queue, CELERY_APP=app)
    with wired, caplog.at_level(logging.WARNING, "django_events"):
        assert process_message(first, 0).status == "succeeded"
        marking.flush()
    assert "did not confirm 1 event(s)" in caplog.text
    handed.refresh_from_db()
    assert handed.status == "pending" and handed.retry_at is not None  # due for the relay

    other = f"{queue}-relayed"
    try:
        Delivery.objects.filter(pk=handed.pk).update(retry_at=timezone.now())  # 30 s later
        with wiring(ORDERED, DEFAULT_QUEUE=other, CELERY_APP="tests.brokers.amqp"):
            relay_pending(min_age=0)
        assert [m["id"] for m in _messages(other)] == [str(handed.event_id)]
        handed.refresh_from_db()
        assert (handed.status, handed.retry_at) == ("pending", None)
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(other)


@pytest.mark.servers
@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_relay_due_time_the_database_cannot_clear_waits_for_the_next_round(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = Delivery._meta.db_table

    def refuse(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("UPDATE") and table in sql.split("SET")[0]:
            raise OperationalError(f"{table}: the rows cannot be written")
        return execute(sql, params, many, context)

    slow = marking.Marker(interval=600)  # its rounds are this thread's flushes
    wired = wiring(ORDERED, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp")
    with _marker(slow), wired:
        first, handed = _held_behind_first(queue)
        assert process_message(first, 0).status == "succeeded"
        with connection.execute_wrapper(refuse), caplog.at_level(logging.ERROR, "django_events"):
            slow.flush()
        assert "Could not clear the relay due time of 1 handed-on delivery(ies)" in caplog.text
        handed.refresh_from_db()
        assert handed.retry_at is not None
        slow.flush()
        handed.refresh_from_db()
        assert handed.retry_at is None
