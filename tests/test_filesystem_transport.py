"""django_events.contrib.filesystem_transport: kombu's filesystem transport, files appear whole,
and consumers polled from an event loop (Celery's, in a worker).

Real files, real kombu connections, a producer and a consumer running at the same time (no
server needed). kombu's own transport fails the first test most runs: its consumer takes a
message file that is still being written and cannot decode it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub, set_event_loop
from kombu.exceptions import ChannelError

from django_events.contrib import filesystem_transport
from django_events.contrib.filesystem_transport import Transport

TRANSPORT = "django_events.contrib.filesystem_transport:Transport"


def options(folder: Path) -> dict[str, Any]:
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": 0,  # the consumer reads the folder as often as it can
    }


def connect(folder: Path) -> Connection:
    return Connection("filesystem://", transport=TRANSPORT, transport_options=options(folder))


def test_a_consumer_polling_while_large_messages_are_written_gets_each_one_whole(
    tmp_path: Path,
) -> None:
    queue = Queue("orders", Exchange("orders"), "orders")
    count, blob = 150, "x" * 300_000  # big files: long writes, wide windows for a reader
    failures: list[BaseException] = []

    def produce() -> None:
        try:
            with connect(tmp_path) as conn:
                producer = conn.Producer()
                for number in range(count):
                    producer.publish(
                        {"number": number, "blob": blob},
                        exchange=queue.exchange,
                        routing_key="orders",
                        declare=[queue],
                        serializer="json",
                    )
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)

    received = []
    with connect(tmp_path) as conn:
        consumer = conn.SimpleQueue(queue)
        writer = threading.Thread(target=produce)
        writer.start()
        try:
            while len(received) < count:
                message = consumer.get(timeout=30)
                received.append((message.payload["number"], len(message.payload["blob"])))
                message.ack()
        finally:
            writer.join()
    assert failures == []
    assert sorted(received) == [(number, len(blob)) for number in range(count)]
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []  # no partial file left


def test_connections_binding_to_a_new_exchange_at_once_all_end_up_in_its_table(
    tmp_path: Path,
) -> None:
    exchange = Exchange("broadcast", type="fanout")
    names = [f"worker-{n}" for n in range(8)]
    start = threading.Barrier(len(names))
    failures: list[BaseException] = []

    def bind(name: str) -> None:
        try:
            with connect(tmp_path) as conn:
                start.wait()
                Queue(name, exchange).bind(conn.default_channel).declare()
                conn.default_channel.get_table("broadcast")  # a reader during the others' writes
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=bind, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with connect(tmp_path) as conn:
        table = conn.default_channel.get_table("broadcast")
        assert sorted(binding.queue for binding in table) == names
        conn.Producer().publish({"hello": 1}, exchange=exchange, serializer="json")
        for name in names:  # a fanout message reaches every bound queue
            assert conn.SimpleQueue(name).get(timeout=5).payload == {"hello": 1}
    assert [p.name for p in (tmp_path / "control").glob(".*")] == []  # no partial table left


def test_a_file_still_being_written_is_not_taken_by_a_consumer(tmp_path: Path) -> None:
    # A name of its own: kombu remembers bindings per process, not per folder.
    queue = Queue("refunds", Exchange("refunds"), "refunds")
    with connect(tmp_path) as conn:
        consumer = conn.SimpleQueue(queue)
        # What a producer's file looks like halfway through writing (this kombu's own reader).
        filesystem_transport._hidden(tmp_path).write_bytes(b'{"body": "half')
        with pytest.raises(consumer.Empty):
            consumer.get(timeout=0.3)
        conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="refunds")
        assert consumer.get(timeout=5).payload == {"n": 1}


def test_a_message_that_cannot_be_written_is_a_channel_error(tmp_path: Path) -> None:
    queue = Queue("invoices", Exchange("invoices"), "invoices")
    gone = {**options(tmp_path), "data_folder_out": str(tmp_path / "unmounted")}
    with Connection("filesystem://", transport=TRANSPORT, transport_options=gone) as conn:
        queue(conn.default_channel).declare()  # bound in the control folder, which is there
        with pytest.raises(ChannelError, match="Cannot add file"):
            conn.Producer().publish(
                {"n": 1}, exchange=queue.exchange, routing_key="invoices", retry=False
            )
    assert not (tmp_path / "unmounted").exists()


@pytest.mark.parametrize("name", ["../outside", "a/b"])
def test_an_exchange_name_that_leaves_the_control_folder_is_refused(
    tmp_path: Path, name: str
) -> None:
    with connect(tmp_path) as conn, pytest.raises(ChannelError, match="Invalid exchange name"):
        conn.default_channel._queue_bind(name, "key", None, "q")
    assert not (tmp_path / "outside.exchange").exists()


def test_an_exchange_table_that_cannot_be_created_is_a_channel_error(tmp_path: Path) -> None:
    name = "x" * 300  # longer than a file name may be
    with connect(tmp_path) as conn, pytest.raises(ChannelError, match="^Cannot create "):
        Queue("q-long", Exchange(name, type="fanout")).bind(conn.default_channel).declare()
    assert list((tmp_path / "control").iterdir()) == []  # no partial table left


def test_celery_uses_it_when_broker_transport_names_it(tmp_path: Path) -> None:
    app = Celery("transport-check", set_as_current=False)
    app.conf.update(
        broker_url="filesystem://",
        broker_transport=TRANSPORT,
        broker_transport_options=options(tmp_path),
    )
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        assert conn.transport.driver_type == "filesystem"


@pytest.fixture
def hub() -> Iterator[Hub]:
    """An event loop, current as a Celery worker's is (kombu's `get_event_loop`)."""
    loop = Hub()
    set_event_loop(loop)
    try:
        yield loop
    finally:
        set_event_loop(None)
        loop.close()


def run_until(hub: Hub, condition: Callable[[], bool], timeout: float = 10) -> None:
    loop, deadline = hub.create_loop(), time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the event loop did not get there"
        next(loop)


def test_celery_runs_its_event_loop_and_own_pool_for_it() -> None:
    # Celery's WorkController.should_use_eventloop reads this; kombu's says False.
    assert Transport.implements.asynchronous is True


def test_in_an_event_loop_consumers_get_messages_within_the_prefetch_limit(
    tmp_path: Path, hub: Hub
) -> None:
    queue = Queue("shipments", Exchange("shipments"), "shipments")
    received: list[Any] = []
    with connect(tmp_path) as conn:
        producer = conn.Producer()
        for number in range(3):
            producer.publish(
                {"n": number},
                exchange=queue.exchange,
                routing_key="shipments",
                declare=[queue],
                serializer="json",
            )
        consumer = conn.Consumer(
            [queue], callbacks=[lambda body, message: received.append(message)], accept=["json"]
        )
        consumer.qos(prefetch_count=2)
        consumer.consume()  # nothing calls drain_events: the loop's timer polls the folder

        run_until(hub, lambda: len(received) == 2)
        for _ in range(5):  # a few more turns: the third waits for a free slot
            next(hub.create_loop())
        assert len(received) == 2
        assert len([p for p in tmp_path.iterdir() if p.name.endswith(".msg")]) == 1

        received[0].ack()
        run_until(hub, lambda: len(received) == 3)
        # Same millisecond, same place in kombu's order: the file names' uuids decide.
        assert sorted(m.payload["n"] for m in received) == [0, 1, 2]
        for message in received[1:]:
            message.ack()
        consumer.cancel()
    # Each taken once; an unacknowledged one would have been written back at the close.
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".msg")] == []


def test_without_an_event_loop_consumers_are_drained_as_with_kombus(tmp_path: Path) -> None:
    queue = Queue("returns", Exchange("returns"), "returns")
    with connect(tmp_path) as conn:
        conn.Producer().publish(
            {"n": 1},
            exchange=queue.exchange,
            routing_key="returns",
            declare=[queue],
            serializer="json",
        )
        received: list[Any] = []
        with conn.Consumer(
            [queue], callbacks=[lambda body, message: received.append(body)], accept=["json"]
        ):
            conn.drain_events(timeout=5)
    assert received == [{"n": 1}]


def test_filesystem_urls_need_no_host_and_log_no_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="kombu.connection"), connect(tmp_path) as conn:
        queue = Queue("quiet", Exchange("quiet"), "quiet")
        conn.Producer().publish({"n": 1}, routing_key="quiet", declare=[queue])
        conn.clone().release()
        message = queue(conn.default_channel).get(accept=["json"])
    assert message is not None and message.payload == {"n": 1}
    assert [r.getMessage() for r in caplog.records] == []  # kombu's "No hostname was supplied"
