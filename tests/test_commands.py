"""events_queues: what a worker must consume."""

from __future__ import annotations

from io import StringIO

from django.core.management import call_command

from tests.conftest import wiring


def queues() -> str:
    out = StringIO()
    call_command("events_queues", stdout=out)
    return out.getvalue().strip()


def test_events_queues_lists_each_async_queue_once() -> None:
    subs = [
        {
            "event": "orders.placed",
            "handler": "tests.app.handlers.record",
            "mode": "async",
            "queue": "billing",
        },
        {"event": "orders.*", "handler": "tests.app.handlers.record_other", "mode": "async"},
        {
            "event": "orders.shipped",
            "handler": "tests.app.handlers.record",
            "mode": "async",
            "queue": "billing",
        },
        {"event": "orders.shipped", "handler": "tests.app.handlers.record_other", "mode": "sync"},
    ]
    with wiring(*subs, DEFAULT_QUEUE="events-default"):
        assert queues() == "billing,events-default"


def test_events_queues_is_never_empty() -> None:
    with wiring(DEFAULT_QUEUE="fallback"):
        assert queues() == "fallback"
