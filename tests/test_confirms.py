"""Publisher confirms for a whole batch: the bookkeeping, and a real RabbitMQ relay batch."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from django_events.delivery.broker import Unsent, send_deliveries
from django_events.delivery.confirms import PublisherConfirms
from django_events.events import Event
from django_events.wiring.registry import get_registry
from tests import brokers
from tests.conftest import wiring


class ScriptedChannel:
    """Pure-logic stand-in for an AMQP channel: each drain delivers the next scripted frame."""

    def __init__(self, frames: list[tuple[str, int, bool]]) -> None:
        self.events: dict[str, set[Callable[..., None]]] = defaultdict(set)
        self.selected = False
        self.frames = frames
        self.connection = self

    def confirm_select(self) -> None:
        self.selected = True

    def drain_events(self, timeout: float) -> None:
        if not self.frames:
            raise TimeoutError
        kind, tag, multiple = self.frames.pop(0)
        for callback in self.events[kind]:
            callback(tag, multiple)


def publish_tags(confirms: PublisherConfirms, *event_ids: uuid.UUID) -> None:
    for event_id in event_ids:
        confirms.published(event_id)


def test_a_multiple_ack_confirms_every_message_up_to_its_tag() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    channel = ScriptedChannel([("basic_ack", 2, True), ("basic_ack", 4, False)])
    confirms = PublisherConfirms.start(channel)
    assert confirms is not None and channel.selected
    publish_tags(confirms, a, a, b, c)  # tags 1-4: event a has two messages
    assert confirms.wait(timeout=5) == {b}  # tag 3 never confirmed
    assert channel.frames == []


def test_a_nacked_message_leaves_its_event_unsent_even_if_another_was_acked() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    channel = ScriptedChannel(
        [("basic_ack", 1, False), ("basic_nack", 2, False), ("basic_ack", 3, False)]
    )
    confirms = PublisherConfirms.start(channel)
    assert confirms is not None
    publish_tags(confirms, a, a, b)
    assert confirms.wait(timeout=5) == {a}


def test_a_multiple_nack_refuses_every_pending_message_up_to_its_tag() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    channel = ScriptedChannel([("basic_ack", 1, False), ("basic_nack", 3, True)])
    confirms = PublisherConfirms.start(channel)
    assert confirms is not None
    publish_tags(confirms, a, b, c)
    assert confirms.wait(timeout=5) == {b, c}


def test_refused_messages_are_told_from_those_the_broker_has_not_answered() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    channel = ScriptedChannel([("basic_ack", 1, False), ("basic_nack", 2, False)])
    confirms = PublisherConfirms.start(channel)
    assert confirms is not None
    publish_tags(confirms, a, b, c)
    assert confirms.wait(timeout=5) == {b, c}
    assert (confirms.refused(), confirms.unanswered()) == ({b}, {c})


def test_without_confirms_on_the_transport_there_is_nothing_to_track() -> None:
    assert PublisherConfirms.start(object()) is None


@pytest.mark.servers
@pytest.mark.django_db
# confirm_publish: py-amqp's own per-message confirms, which docs/reliability.md suggests
# for the commit path, must not hide the acks from the relay's batch.
@pytest.mark.parametrize("transport_options", [{}, {"confirm_publish": True}])
def test_a_confirmed_batch_reaches_rabbitmq_whole(transport_options: dict[str, Any]) -> None:
    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    app = brokers.make_app("amqp")
    app.conf.broker_transport_options = transport_options
    queue = f"confirms-{uuid.uuid4().hex[:8]}"
    subscriptions = [
        {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "async"},
        {
            "event": "orders.placed",
            "handler": "tests.app.handlers.record_other",
            "mode": "async",
        },
    ]
    with wiring(*subscriptions, DEFAULT_QUEUE=queue, CELERY_APP="tests.brokers.amqp"):
        compiled = get_registry().event("orders.placed")
        events = [_event(order_id) for order_id in range(30)]
        unsent = send_deliveries(
            [(e, True, compiled.async_) for e in events], "default", app=app, confirm=True
        )
    try:
        assert unsent == Unsent()
        with brokers.amqp.connection_for_write() as conn:
            declared: Any = conn.default_channel.queue_declare(queue, passive=True)
        assert declared.message_count == 60  # one message per (event, subscription)
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)


def _event(order_id: int) -> Event:
    event_id = uuid.uuid4()
    data = {"order_id": order_id, "total": 1.0}
    return Event(event_id, "orders.placed", data, {}, datetime.now(UTC), event_id, None, data)
