"""The recorder behind SUCCESS_RECORDS = "batched": rows written later, in batches, never twice.

Its writer is a thread with database connections of its own, so these tests commit for real
(``transaction=True``) on SQLite or PostgreSQL, whichever the run uses.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from django_events.delivery import batching
from django_events.delivery.batching import BatchedRecorder
from django_events.delivery.recording import record_for
from django_events.events import Event
from django_events.models import Delivery, EventRecord
from tests.worker import wait_for, wake_ups

pytestmark = pytest.mark.django_db(transaction=True)
RECORD = "tests.app.handlers.record"


def recorded_events(count: int) -> list[uuid.UUID]:
    now = timezone.now()
    events = [Event(i, "orders.placed", {}, {}, now, i, None, {}) for i in _ids(count)]
    EventRecord.objects.bulk_create([record_for(e, EventRecord.Status.DISPATCHED) for e in events])
    return [e.id for e in events]


def _ids(count: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(count)]


def stored(ids: list[uuid.UUID]) -> list[tuple[str, str, int]]:
    rows = Delivery.objects.filter(event_id__in=ids).order_by("event_id")
    return [(str(r.event_id), r.status, r.attempts) for r in rows]


@pytest.fixture
def recorders() -> Iterator[list[BatchedRecorder]]:
    made: list[BatchedRecorder] = []
    yield made
    for recorder in made:
        recorder.stop()


def make(recorders: list[BatchedRecorder], **kwargs: float) -> BatchedRecorder:
    recorder = BatchedRecorder(**kwargs)  # type: ignore[arg-type]
    recorders.append(recorder)
    return recorder


@contextmanager
def deliveries_table_gone() -> Iterator[None]:
    """The deliveries table renamed away: every write to it fails as with a database down."""
    table = Delivery._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_away RENAME TO {table}")


def test_rows_are_written_by_the_background_thread_within_the_interval(recorders) -> None:
    ids = recorded_events(5)
    recorder = make(recorders, interval=0.05)
    before = timezone.now()
    for event_id in ids:
        recorder.add("default", event_id, "billing")
    added = timezone.now()

    wait_for(lambda: len(stored(ids)) == 5, timeout=10, what="5 rows written")
    assert stored(ids) == sorted((str(i), "succeeded", 1) for i in ids)
    assert recorder.waiting() == 0
    rows = Delivery.objects.filter(event_id__in=ids)
    assert {(r.mode, r.last_error, r.traceback) for r in rows} == {("async", "", "")}
    # When the handler finished, not when the batch was written.
    assert all(before <= r.created_at == r.updated_at <= added for r in rows)


def test_rows_hold_exactly_the_subscription_names_given(recorders) -> None:
    # On PostgreSQL the rows travel as one JSON document: quoting must not bend a name.
    names = ['it\'s "quoted"', "back\\slash %s", "ünïcødé → 📦"]
    ids = recorded_events(len(names))
    recorder = make(recorders, interval=3600)
    for event_id, name in zip(ids, names, strict=True):
        recorder.add("default", event_id, name)

    assert recorder.flush() == 3

    rows = Delivery.objects.filter(event_id__in=ids)
    assert {(r.event_id, r.subscription) for r in rows} == set(zip(ids, names, strict=True))


def test_a_full_batch_is_written_before_the_interval_is_up(recorders) -> None:
    ids = recorded_events(4)
    recorder = make(recorders, interval=3600, max_batch=3)
    recorder.add("default", ids[0], "billing")
    recorder.add("default", ids[1], "billing")
    assert recorder.waiting() == 2
    assert stored(ids) == []  # two rows: the writer waits for the interval

    recorder.add("default", ids[2], "billing")
    wait_for(lambda: len(stored(ids)) == 3, timeout=10, what="the full batch written")
    recorder.add("default", ids[3], "billing")
    assert recorder.waiting() == 1


def test_an_idle_writer_sleeps_until_a_row_comes(recorders) -> None:
    ids = recorded_events(2)
    recorder = make(recorders, interval=0.02)
    recorder.add("default", ids[0], "billing")
    wait_for(lambda: len(stored(ids)) == 1, timeout=10, what="the first row written")
    thread = recorder._thread
    assert thread is not None
    wait_for(lambda: recorder._idle, timeout=10, what="the thread asleep")

    # Nothing waits: 25 intervals go by without the thread waking once.
    assert wake_ups(thread, 0.5) <= 1

    recorder.add("default", ids[1], "billing")
    wait_for(lambda: len(stored(ids)) == 2, timeout=10, what="the row that woke it written")
    assert thread.is_alive()


def test_rows_a_failed_flush_puts_back_wake_an_idle_writer(recorders) -> None:
    ids = recorded_events(2)
    recorder = make(recorders, interval=0.02)
    recorder.add("default", ids[0], "billing")
    wait_for(lambda: recorder._idle, timeout=10, what="the thread asleep")

    # What a flush from another thread does when its write fails while the thread sleeps:
    # the rows go back, and the thread, which took none, must try them without another add().
    recorder._requeue("default", [(ids[1], "billing", time.time(), None, None)])

    wait_for(lambda: len(stored(ids)) == 2, timeout=10, what="the rows put back written")
    assert recorder.waiting() == 0


def test_stop_writes_what_waits(recorders) -> None:
    ids = recorded_events(3)
    recorder = make(recorders, interval=3600)
    for event_id in ids:
        recorder.add("default", event_id, "billing")
    assert stored(ids) == []

    recorder.stop()

    assert len(stored(ids)) == 3
    assert recorder.waiting() == 0


def test_a_row_already_there_is_kept_and_duplicates_in_a_batch_are_one_row(recorders) -> None:
    ids = recorded_events(2)
    Delivery.objects.create(
        event_id=ids[0], subscription="billing", mode="async", status="succeeded", attempts=2
    )
    recorder = make(recorders, interval=3600)
    recorder.add("default", ids[0], "billing")  # a late first run must not overwrite attempt 2
    recorder.add("default", ids[1], "billing")
    recorder.add("default", ids[1], "billing")  # a redelivered message, same batch

    assert recorder.flush() == 3

    assert stored(ids) == sorted([(str(ids[0]), "succeeded", 2), (str(ids[1]), "succeeded", 1)])


def test_a_row_whose_event_record_is_gone_is_logged_and_the_others_are_written(
    recorders, caplog
) -> None:
    ids = recorded_events(2)
    missing = uuid.uuid4()  # pruned meanwhile: no EventRecord
    recorder = make(recorders, interval=3600)
    for event_id in (ids[0], missing, ids[1]):
        recorder.add("default", event_id, "billing")

    with caplog.at_level(logging.ERROR, logger="django_events.worker"):
        written = recorder.flush()

    assert written == 2
    assert len(stored(ids)) == 2
    assert not Delivery.objects.filter(event_id=missing).exists()
    [message] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert message.getMessage() == (
        f"Could not record the successful delivery of event {missing} to billing: the "
        "event's record is gone (events_prune deleted it while the message waited, or it is "
        "in another database); the handler ran"
    )
    assert message.exc_info is None  # no ForeignKeyViolation traceback to read through
    assert message.subscription == "billing"
    assert recorder.waiting() == 0  # not retried forever


def test_rows_wait_while_the_database_fails_and_are_written_once_it_is_back(
    recorders, caplog
) -> None:
    ids = recorded_events(3)
    recorder = make(recorders, interval=3600)
    for event_id in ids:
        recorder.add("default", event_id, "billing")

    with caplog.at_level(logging.ERROR, logger="django_events.worker"), deliveries_table_gone():
        assert recorder.flush() == 0

    assert "Could not record 3 successful deliveries" in caplog.text
    assert recorder.waiting() == 3
    assert recorder.flush() == 3
    assert len(stored(ids)) == 3


def test_a_database_whose_write_failed_takes_no_rows_until_a_write_succeeds(recorders) -> None:
    ids = recorded_events(1)
    recorder = make(recorders, interval=3600)
    recorder.add("default", ids[0], "billing")
    assert recorder.takes("default")

    with deliveries_table_gone():
        assert recorder.flush() == 0

    assert not recorder.takes("default")
    assert recorder.takes("other")  # one database's outage says nothing of another
    assert recorder.flush() == 1  # the database is back: the waiting row is written
    assert recorder.takes("default")


def test_a_worker_writes_a_first_success_at_once_while_its_database_cannot_be_written(
    queue: str, publish_now, monkeypatch
) -> None:
    from django_events.delivery.worker import process_message
    from tests.ops import drain

    monkeypatch.setattr(batching, "FLUSH_INTERVAL", 3600)  # nothing flushes behind the test
    batching.reset_recorder()
    plain = {"event": "shop.paid", "handler": RECORD, "mode": "async", "name": "shop-plain"}
    with override_settings(DJANGO_EVENTS={**settings.DJANGO_EVENTS, "SUBSCRIPTIONS": [plain]}):
        paid = [publish_now("shop.paid", {"order_id": i, "total": 10}) for i in range(3)]
        messages = [m for m in drain(queue) if m["subscription"] == "shop-plain"]

        def deliver(index: int) -> None:
            outcome = process_message(messages[index], 0, batch_success=True)
            assert outcome.status == "succeeded"

        def row_of(index: int) -> bool:
            return Delivery.objects.filter(
                event_id=paid[index].id, subscription="shop-plain"
            ).exists()

        try:
            deliver(0)  # batched: its row waits for the writer
            assert not row_of(0) and batching.recorder().waiting() == 1
            with deliveries_table_gone():
                assert batching.recorder().flush() == 0

            deliver(1)  # the database failed: written before returning, not batched
            assert row_of(1) and batching.recorder().waiting() == 1

            assert batching.recorder().flush() == 1  # the batch gets through: batching again
            deliver(2)
            assert row_of(0) and not row_of(2) and batching.recorder().waiting() == 1
        finally:
            batching.reset_recorder()
    assert row_of(2)  # written when the recorder stopped
    batched = Delivery.objects.get(event_id=paid[0].id, subscription="shop-plain")
    assert (batched.status, batched.attempts, batched.mode) == ("succeeded", 1, "async")
    assert batched.duration_ms is not None and batched.duration_ms >= 0  # the handler's time


def test_rows_beyond_the_bound_are_dropped_with_an_error_while_the_database_fails(
    recorders, caplog
) -> None:
    recorder = make(recorders, interval=3600, max_waiting=3)
    for event_id in _ids(5):
        recorder.add("default", event_id, "billing")

    with caplog.at_level(logging.ERROR, logger="django_events.worker"), deliveries_table_gone():
        assert recorder.flush() == 0

    assert recorder.waiting() == 3
    assert "Dropped 2 success records: more than 3 waited for the database" in caplog.text


def test_one_recorder_per_process_until_reset() -> None:
    first = batching.recorder()
    assert batching.recorder() is first
    batching.reset_recorder()
    second = batching.recorder()
    assert second is not first
    assert second.interval == batching.FLUSH_INTERVAL
    batching.reset_recorder()


def test_a_row_added_after_stop_is_written_at_once(recorders) -> None:
    [event_id] = recorded_events(1)
    recorder = make(recorders, interval=3600)
    recorder.stop()

    recorder.add("default", event_id, "billing")

    assert stored([event_id]) == [(str(event_id), "succeeded", 1)]
    assert recorder.waiting() == 0


def test_rows_the_database_refuses_at_exit_are_reported_dropped(recorders, caplog) -> None:
    ids = recorded_events(3)
    recorder = make(recorders, interval=3600)
    for event_id in ids:
        recorder.add("default", event_id, "billing")

    with caplog.at_level(logging.ERROR, logger="django_events.worker"), deliveries_table_gone():
        recorder.stop()

    assert "Dropped 3 success records at exit: the database could not be written" in caplog.text
    assert stored(ids) == []
