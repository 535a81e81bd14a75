"""What `send_deliveries` puts on the wire (a real RabbitMQ queue, read back)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from io import StringIO

import pytest
import redis
from celery import Celery
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import override_settings
from django.utils.module_loading import import_string

from django_events import publish, publish_many
from django_events.delivery import marking
from django_events.delivery.broker import (
    BrokerHealth,
    Unsent,
    health,
    send_deliveries,
    waiting_messages,
)
from django_events.delivery.messages import TASK_NAME
from django_events.delivery.recording import delivery, save_deliveries
from django_events.delivery.sealing import open_event
from django_events.events import Event
from django_events.models import EventRecord
from django_events.operations.relay import relay_pending
from django_events.wiring.registry import get_registry
from tests import brokers
from tests.conftest import wiring
from tests.ops import drain, shop_wiring

pytestmark = [pytest.mark.servers, pytest.mark.django_db]

# Brokers that close every connection they accept (their URLs set by the `closing_broker`
# fixture): an app a transport, as a publisher remembers each app's.
closing_amqp = Celery("tests-closing-amqp", set_as_current=False)
closing_redis = Celery("tests-closing-redis", set_as_current=False)
for _closing_app in (closing_amqp, closing_redis):
    _closing_app.conf.update(accept_content=["json"], broker_connection_timeout=3)
CLOSING_URLS = {"amqp": "amqp://guest:guest@127.0.0.1:{}//", "redis": "redis://127.0.0.1:{}/0"}
# The async subscription of the tests that read a sent message off its queue.
BILLING = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.record",
    "mode": "async",
    "name": "billing",
}

# An app that keeps Celery's task results in Redis, as many projects do (result_backend).
with_result_backend = brokers.make_app("amqp")
with_result_backend.conf.result_backend = brokers.REDIS_URL


class _ClosingBroker:
    """A loopback port that accepts each connection and closes it at once, counting them;
    ``celery_app``: the path of the Celery app whose broker it is."""

    def __init__(self, celery_app: str) -> None:
        self.celery_app = celery_app
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener closed
                return
            self.accepted += 1  # before the close the client waits for
            client.close()

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def closing_brokers() -> Iterator[dict[str, _ClosingBroker]]:
    """A closing broker a transport, for the module: a Celery app's connection pool keeps
    its broker's URL."""
    started: dict[str, _ClosingBroker] = {}
    try:
        for kind, app in (("amqp", closing_amqp), ("redis", closing_redis)):
            started[kind] = _ClosingBroker(f"tests.test_broker.closing_{kind}")
            app.conf.broker_url = CLOSING_URLS[kind].format(started[kind].port)
        yield started
    finally:
        for broker in started.values():
            broker.close()


@pytest.fixture(params=["amqp"])
def closing_broker(
    request: pytest.FixtureRequest, closing_brokers: dict[str, _ClosingBroker]
) -> _ClosingBroker:
    """The closing broker of the transport the test names (indirectly; by default AMQP),
    with no connection counted yet."""
    broker = closing_brokers[request.param]
    broker.accepted = 0
    return broker


def test_a_transport_that_does_not_load_is_an_error_once_an_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    event_id = uuid.uuid4()
    event = Event(event_id, "orders.placed", {}, {}, datetime.now(UTC), event_id, None, {})
    subscription = {"event": "orders.placed", "handler": "tests.app.handlers.record"}

    def told(app: Celery) -> list[int]:
        """The levels at which a send through ``app`` said its transport does not load."""
        caplog.clear()
        with caplog.at_level(logging.DEBUG, "django_events"):
            unsent = send_deliveries([(event, True, compiled.async_)], "default", app=app)
        assert unsent.ids == {event_id}  # refused: the record stays pending for the relay
        return [r.levelno for r in caplog.records if "does not load" in r.getMessage()]

    with wiring({**subscription, "mode": "async"}):
        compiled = get_registry().event("orders.placed")
        first = Celery(broker="nope://127.0.0.1//", set_as_current=False)
        assert told(first) == [logging.ERROR]
        assert told(first) == [logging.DEBUG]  # once is enough: events_check reports it too
        # Another app (another settings module, a test's app) is told of in its own right.
        assert told(Celery(broker="nope://127.0.0.1//", set_as_current=False)) == [logging.ERROR]


def test_celery_app_given_as_celerys_current_app_proxy_is_the_app_behind_it() -> None:
    from celery import current_app

    from django_events.delivery.broker import celery_app

    with wiring(CELERY_APP="celery.current_app"):
        app = celery_app()
    assert type(app) is type(current_app._get_current_object())
    assert weakref.ref(app)() is app  # the broker's outage and transport are kept by app


def test_celery_headers_name_the_delivery_and_leave_the_payload_out() -> None:
    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    queue = f"headers-{uuid.uuid4().hex[:8]}"
    event_id = uuid.uuid4()
    data = {"order_id": 3, "total": 9.5, "email": "secret@example.com"}
    event = Event(event_id, "orders.placed", data, {}, datetime.now(UTC), event_id, None, data)
    with wiring(BILLING, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"):
        compiled = get_registry().event("orders.placed")
        assert send_deliveries([(event, True, compiled.async_)], "default") == Unsent()
    try:
        with brokers.amqp.connection_for_write() as conn:
            message = conn.default_channel.basic_get(queue, no_ack=True)
        assert message is not None
        headers = message.headers
        assert headers["task"] == TASK_NAME
        assert headers["argsrepr"] == f"('billing', '{event_id}')"
        assert headers["kwargsrepr"] == "{}"
        assert "secret@example.com" not in str(headers)
        body = message.body if isinstance(message.body, str) else message.body.decode()
        # The payload travels in the body only, its redacted fields sealed (delivery/sealing.py).
        assert '"order_id": 3' in body and '"sealed": ' in body
        assert "secret@example.com" not in body
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def test_each_message_of_a_batch_carries_its_own_events_sealed_payload() -> None:
    """A batch's events are sealed before its first send: each message still carries its
    own event's sealed payload, with that event's own options (durable or not)."""
    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    queue = f"sealed-batch-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    events = []
    for n in range(3):
        event_id = uuid.uuid4()
        data = {"order_id": n, "total": 9.5, "email": f"buyer{n}@example.com"}
        events.append(Event(event_id, "orders.placed", data, {}, now, event_id, None, data))
    with wiring(BILLING, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"):
        compiled = get_registry().event("orders.placed")
        durable = {str(event.id): n == 0 for n, event in enumerate(events)}
        batch = [(event, durable[str(event.id)], compiled.async_) for event in events]
        assert send_deliveries(batch, "default") == Unsent()
        try:
            opened, persistent = {}, {}
            with brokers.amqp.connection_for_write() as conn:
                for _ in events:
                    message = conn.default_channel.basic_get(queue, no_ack=True)
                    assert message is not None
                    body = message.body if isinstance(message.body, str) else message.body.decode()
                    assert "@example.com" not in body
                    (delivered,), _, _ = json.loads(body)
                    event_part = open_event(delivered["event"])
                    opened[event_part["id"]] = event_part["payload"]
                    persistent[event_part["id"]] = message.properties["delivery_mode"] == 2
        finally:
            with brokers.amqp.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
    assert opened == {str(event.id): event.data for event in events}
    assert persistent == durable


def _taken_off(queue: str) -> list[dict[str, object]]:
    """The deliveries waiting on RabbitMQ's ``queue``, taken off it."""
    taken = []
    with brokers.amqp.connection_for_write() as conn:
        while message := conn.default_channel.basic_get(queue, no_ack=True):
            body = message.body if isinstance(message.body, str) else message.body.decode()
            (delivered,), _, _ = json.loads(body)
            taken.append(delivered)
    return taken


@pytest.mark.django_db(transaction=True)
def test_events_whose_payload_cannot_be_sealed_stay_pending_and_the_broker_is_not_blamed(
    caplog,
) -> None:
    """An empty SECRET_KEY seals nothing: the events that redact fields stay pending, said
    so once a send; the others go, the broker is not taken for down, and the relay sends the
    pending ones once SECRET_KEY is back."""
    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    queue = f"unsealed-{uuid.uuid4().hex[:8]}"
    paid = {"order_id": 1, "email": "ada@example.com"}
    try:
        with shop_wiring(queue, CELERY_APP="tests.brokers.amqp"):
            with override_settings(SECRET_KEY=""), caplog.at_level(logging.INFO, "django_events"):
                with transaction.atomic():  # a batch with an event that redacts nothing
                    unsealed, cancelled = publish_many(
                        [("shop.paid", paid), ("orders.cancelled", {"order_id": 1})]
                    )
                # On PostgreSQL the background marker's path (every event of the batch recorded):
                with transaction.atomic():  # alone
                    alone = publish("shop.paid", {**paid, "order_id": 2})
                with transaction.atomic():  # beside a payload with no field to redact
                    beside, plain = publish_many(
                        [("shop.paid", {**paid, "order_id": 3}), ("shop.paid", {"order_id": 4})]
                    )
                marking.flush()
            assert not health.is_down(brokers.amqp)
            said = [r for r in caplog.records if r.name == "django_events.broker"]
            said = [r.getMessage() for r in said if r.levelno >= logging.WARNING]
            assert [line.split(": ImproperlyConfigured: ")[0] for line in said] == [
                f"Cannot seal the payload of 1 event(s) (shop.paid; the first: {event.id}): "
                "they stay pending, for events_relay to send once it can seal them"
                for event in (unsealed, alone, beside)
            ]
            assert all("SECRET_KEY" in line for line in said)
            records = dict(EventRecord.objects.values_list("id", "status"))
            # orders.cancelled records failures only: sent, it needs none.
            unsent = (unsealed, alone, beside)
            assert records == {**{e.id: "pending" for e in unsent}, plain.id: "dispatched"}
            sent = [m["event"]["id"] for m in _taken_off(queue)]
            assert sorted(sent) == sorted([str(cancelled.id), str(plain.id)])

            assert relay_pending().sent == 3
            resent = {m["event"]["id"]: m["event"] for m in _taken_off(queue)}
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    assert set(EventRecord.objects.values_list("status", flat=True)) == {"dispatched"}
    assert resent.keys() == {str(e.id) for e in unsent}
    assert all("sealed" in e and "ada@" not in json.dumps(e) for e in resent.values())
    assert open_event(resent[str(unsealed.id)])["payload"] == paid


def test_deliveries_leave_the_apps_result_backend_waiting_for_no_result() -> None:
    """The delivery task keeps no result, and its messages say so: an app with a Redis result
    backend is not subscribed to a result channel for each message sent (the send's
    `_Sent` never unsubscribes it, as a dropped `AsyncResult` would)."""
    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    brokers.require_server(brokers.REDIS_URL, "Redis")
    queue = f"results-{uuid.uuid4().hex[:8]}"
    subscription = {"event": "orders.placed", "handler": "tests.app.handlers.record"}
    now = datetime.now(UTC)
    data = {"order_id": 3, "total": 9.5}
    ids = [uuid.uuid4() for _ in range(3)]
    events = [Event(i, "orders.placed", data, {}, now, i, None, data) for i in ids]
    app_path = f"{__name__}.with_result_backend"
    try:
        with wiring({**subscription, "mode": "async"}, DEFAULT_QUEUE=queue, CELERY_APP=app_path):
            compiled = get_registry().event("orders.placed")
            sent = send_deliveries([(e, True, compiled.async_) for e in events], "default")
            assert sent == Unsent()
        with brokers.amqp.connection_for_write() as conn:
            messages = [conn.default_channel.basic_get(queue, no_ack=True) for _ in events]
        assert all(m is not None and m.headers["ignore_result"] is True for m in messages)
        channels = [with_result_backend.backend.get_key_for_task(m.headers["id"]) for m in messages]
        with redis.Redis.from_url(brokers.REDIS_URL) as client:
            subscribers = client.pubsub_numsub(*channels)
        assert [count for _, count in subscribers] == [0] * len(events)
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def test_a_queue_deleted_meanwhile_is_declared_again_on_a_new_publishing_connection() -> None:
    """The queues a kept confirming connection declared are remembered with it, not beyond:
    once it is replaced (a broker restart, a connection dropped) they are declared again."""
    from django_events.delivery import broker

    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    queue = f"declared-{uuid.uuid4().hex[:8]}"
    subscription = {"event": "orders.placed", "handler": "tests.app.handlers.record"}
    data = {"order_id": 3, "total": 9.5}

    def send() -> None:
        event_id = uuid.uuid4()
        event = Event(event_id, "orders.placed", data, {}, datetime.now(UTC), event_id, None, data)
        compiled = get_registry().event("orders.placed")
        assert send_deliveries([(event, True, compiled.async_)], "default") == Unsent()

    try:
        with wiring(
            subscription | {"mode": "async"}, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"
        ):
            send()
            send()  # the same kept connection: declared already
            with brokers.amqp.connection_for_write() as conn:
                assert conn.default_channel.queue_declare(queue, passive=True).message_count == 2
                conn.default_channel.queue_delete(queue)
            broker._drop_confirming(brokers.amqp)  # as a connection found broken is
            send()
            with brokers.amqp.connection_for_write() as conn:
                assert conn.default_channel.queue_declare(queue, passive=True).message_count == 1
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def test_time_limits_leave_a_webhooks_own_timeout_to_report_first() -> None:
    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    common = {"event": "orders.placed", "queue": queue, "timeout": 2}
    handler = {**common, "handler": "tests.app.handlers.record", "mode": "async", "name": "job"}
    hook = {
        **common,
        "mode": "webhook",
        "name": "hook",
        "url": "https://hooks.example/orders",
        "secret": "TEST_HOOK_SIGNING_SECRET",
    }
    # Without a timeout of its own a webhook still gets one: the HTTP client's default bounds
    # each phase (10 s), not a receiver that trickles its answer.
    plain_hook = {k: v for k, v in hook.items() if k != "timeout"} | {"name": "plain-hook"}
    data = {"order_id": 3, "total": 9.5}
    event_id = uuid.uuid4()
    event = Event(event_id, "orders.placed", data, {}, datetime.now(UTC), event_id, None, data)
    with wiring(handler, hook, plain_hook, CELERY_APP="tests.brokers.amqp"):
        compiled = get_registry().event("orders.placed")
        assert send_deliveries([(event, True, compiled.async_)], "default") == Unsent()
    limits = {}
    try:
        with brokers.amqp.connection_for_write() as conn:
            while message := conn.default_channel.basic_get(queue, no_ack=True):
                name = message.headers["argsrepr"].split("'")[1]
                limits[name] = tuple(message.headers["timelimit"])
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    # (hard, soft): a handler's soft limit is its timeout; a webhook's timeout bounds each
    # phase of the call (connect, send, read), the limit all three and 5 s.
    assert limits == {"job": (7, 2), "hook": (16, 11), "plain-hook": (40, 35)}


@pytest.mark.parametrize("tried", [False, True], ids=["within-the-probe-interval", "after-it"])
def test_a_publish_after_a_failed_resend_still_says_its_events_stay_pending(
    tried: bool, queue: str, publish_now, caplog
) -> None:
    # The outage's first failure is a manual retry's: it says what becomes of that delivery.
    # The first event a publisher then leaves pending says so too, at ERROR: tried again
    # or not (within the probe interval no publisher tries).
    paid = publish_now("shop.paid", {"order_id": 5})
    save_deliveries("default", [delivery(paid.id, "shop-receipt", "async", "failed", 1, "Boom")])
    with shop_wiring(queue, CELERY_APP="tests.brokers.unreachable"):
        with pytest.raises(CommandError):
            call_command("events_retry", "--subscription", "shop-receipt", stdout=StringIO())
        if tried:
            time.sleep(BrokerHealth.first_probe + 0.1)
        later = [publish_now("shop.paid", {"order_id": n}) for n in (6, 7)]
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name == "django_events.broker"
    ]
    assert len(errors) == 2, errors
    assert errors[0].startswith("Broker unreachable; 1 delivery(ies) not sent again: ")
    assert errors[1].startswith("Broker unreachable; 1 event(s) stay pending for events_relay: ")
    assert "Connection refused" in errors[1]
    assert {EventRecord.objects.get(pk=e.id).status for e in later} == {"pending"}


@pytest.mark.parametrize(
    ("closing_broker", "confirms"),
    [
        ("amqp", True),  # the publisher's own connection, kept for its confirms
        ("amqp", False),  # a producer of Celery's pool
        ("redis", True),  # Redis has no confirms: Celery's pool all the same
    ],
    ids=["amqp-confirms", "amqp-no-confirms", "redis"],
    indirect=["closing_broker"],
)
def test_a_broker_that_drops_every_connection_fails_a_commit_at_once(
    closing_broker: _ClosingBroker, confirms: bool, queue: str, publish_now
) -> None:
    # The publisher's own connect policy: one reconnect at once when an outage starts, none
    # while it is known. Not kombu's defaults for a channel, which try again 2 s, then 4 s
    # later for as long as the connect timeout (3 s here) has not passed: 6 s of a commit.
    with shop_wiring(queue, CELERY_APP=closing_broker.celery_app, PUBLISHER_CONFIRMS=confirms):
        first = publish_now("shop.paid", {"order_id": 1})
        assert closing_broker.accepted == 2
        time.sleep(BrokerHealth.first_probe + 0.1)  # the next publisher probes the broker
        second = publish_now("shop.paid", {"order_id": 2})
        assert closing_broker.accepted == 3
    assert {EventRecord.objects.get(pk=e.id).status for e in (first, second)} == {"pending"}


@pytest.mark.parametrize("closing_broker", ["amqp", "redis"], indirect=True)
def test_each_relay_pass_fails_at_once_on_a_broker_that_drops_every_connection(
    closing_broker: _ClosingBroker, queue: str
) -> None:
    # The relay always tries, with the publishers' policy: one reconnect when an outage
    # starts, none while it is known (with kombu's defaults: 3 connections a pass, 6 s).
    record = EventRecord.objects.create(
        id=uuid.uuid4(), name="shop.paid", payload={"order_id": 1}, correlation_id=uuid.uuid4()
    )
    with shop_wiring(queue, CELERY_APP=closing_broker.celery_app):
        for accepted in (2, 3, 4):
            with pytest.raises(CommandError):
                call_command("events_relay", "--min-age", "0", stdout=StringIO())
            assert closing_broker.accepted == accepted
    assert EventRecord.objects.get(pk=record.pk).status == "pending"
    out = StringIO()
    with shop_wiring(queue):  # the broker is back
        call_command("events_relay", "--min-age", "0", stdout=out)
    assert "Relayed 1 event(s); 0 still pending." in out.getvalue()
    assert len(drain(queue)) == 1


@pytest.mark.parametrize("closing_broker", ["amqp", "redis"], indirect=True)
def test_asking_a_broker_that_drops_every_connection_about_a_queue_fails_at_once(
    closing_broker: _ClosingBroker, queue: str
) -> None:
    # The relay's check for lost messages asks once per queue a pass; with kombu's defaults
    # the channel tried again 2 s later.
    app = import_string(closing_broker.celery_app)
    assert waiting_messages(queue, app) is None
    assert closing_broker.accepted == 1
