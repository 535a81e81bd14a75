"""Broadcast subscriptions without a broker: how a worker records copies, events_queues."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from django_events import checks, publish
from django_events.delivery.broadcast import broadcast_queues, exchange_name, route
from django_events.delivery.messages import build_message, event_body
from django_events.delivery.worker import process_message
from django_events.models import Delivery
from tests.app.models import HandlerRun
from tests.conftest import wiring

BROADCAST = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.record",
    "mode": "async",
    "name": "bc",
    "queue": "cache",
    "broadcast": True,
}
NORMAL = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "async"}
PAYLOAD = {"order_id": 1, "total": 12.5}


def test_a_broadcast_goes_to_the_fanout_exchange_of_its_queue() -> None:
    options = route("cache")
    assert exchange_name("cache") == "cache.broadcast"
    assert (options["exchange"].name, options["exchange"].type) == ("cache.broadcast", "fanout")
    assert options["routing_key"] == "cache.broadcast"
    assert options["declare"] == [options["exchange"]]  # the exchange, never a queue
    with wiring(BROADCAST, NORMAL):
        assert broadcast_queues() == {"cache": ["bc"]}
        assert broadcast_queues(["django_events"]) == {}


def test_broadcast_on_a_subscription_that_is_not_async_is_W102() -> None:
    with wiring({**BROADCAST, "mode": "sync"}):
        reported = [(m.id, m.msg) for m in checks.check_configuration()]

    assert reported == [
        (
            "django_events.W102",
            "Subscription 'bc' is sync: queue and broadcast only apply to async subscriptions",
        )
    ]


@pytest.mark.django_db(transaction=True)
def test_a_failed_copy_is_recorded_once_not_retried_and_not_hidden_by_later_successes() -> None:
    with wiring(BROADCAST):
        event = publish("orders.placed", PAYLOAD)
        message = build_message(event_body(event), "bc", "default")
        with wiring(BROADCAST, PIPELINE=["tests.app.interceptors.FailsToHandle"]):
            failed = process_message(message, 0)  # one worker's copy fails
        assert process_message(message, 0).status == "succeeded"  # another worker's copy

    assert (failed.status, failed.retry_in) == ("failed", None)
    row = Delivery.objects.get(event_id=event.id, subscription="bc")
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.last_error.startswith("on ") and " pid " in row.last_error
    assert row.last_error.endswith(": LookupError: tenant of bc is gone")
    assert HandlerRun.objects.count() == 1


# One worker's release, then another's that cannot take the copy: it refuses the payload,
# cannot upcast it, or cannot read the message's format.
SHAPED = {**BROADCAST, "event": "bc.shaped"}
LOOSE = {"bc.shaped": {"schema": {"type": "object"}}}
STRICT = {"bc.shaped": {"schema": {"type": "object", "required": ["key"]}}}
NEWER = {"bc.shaped": {"version": 2, "upcast": {1: "tests.app.upcasters.explode"}}}


@pytest.mark.parametrize(
    ("events", "version", "why"),
    [
        (STRICT, 1, "Payload no longer valid for 'bc.shaped'"),
        (NEWER, 1, "upcaster exploded on purpose"),
        (LOOSE, 2, "Message format v2 is unknown to this worker"),
    ],
    ids=["schema", "upcaster", "format"],
)
@pytest.mark.django_db(transaction=True)
def test_a_copy_another_worker_cannot_take_is_not_hidden_by_a_success(
    events: dict[str, object], version: int, why: str
) -> None:
    with wiring(SHAPED, EVENTS=LOOSE):
        event = publish("bc.shaped", {"order_id": 1})
        message = build_message(event_body(event), "bc", "default")
        assert process_message(message, 0).status == "succeeded"  # one worker's copy
    with wiring(SHAPED, EVENTS=events):
        failed = process_message({**message, "v": version}, 0)  # another worker's

    assert (failed.status, failed.retry_in) == ("failed", None)
    row = Delivery.objects.get(event_id=event.id, subscription="bc")
    assert (row.status, row.attempts) == ("failed", 0)  # this worker ran nothing
    assert row.last_error.startswith("on ") and " pid " in row.last_error
    assert why in row.last_error
    assert HandlerRun.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_copies_sent_again_finish_a_pending_row_but_never_a_failure() -> None:
    # events_resume sends a held broadcast again (its row pending): a copy's success
    # finishes the row (it stayed pending for good); a failed copy is still never hidden.
    with wiring(BROADCAST):
        event = publish("orders.placed", PAYLOAD)
        Delivery.objects.create(event_id=event.id, subscription="bc", mode="async")  # pending
        again = build_message(event_body(event), "bc", "default", prior_attempts=0, rerun=True)
        assert process_message(again, 0).status == "succeeded"
        row = Delivery.objects.get(event_id=event.id, subscription="bc")
        assert (row.status, row.attempts, row.retry_at) == ("succeeded", 1, None)

        Delivery.objects.filter(pk=row.pk).update(status="failed", last_error="on host1: Boom")
        assert process_message(again, 0).status == "succeeded"
    row.refresh_from_db()
    assert (row.status, row.last_error) == ("failed", "on host1: Boom")


@pytest.mark.django_db(transaction=True)
def test_successful_copies_leave_one_succeeded_row() -> None:
    with wiring(BROADCAST):
        event = publish("orders.placed", PAYLOAD)
        message = build_message(event_body(event), "bc", "default")
        assert [process_message(message, 0).status for _ in range(2)] == ["succeeded"] * 2

    assert list(Delivery.objects.values_list("status", "attempts")) == [("succeeded", 1)]
    assert HandlerRun.objects.count() == 2


def test_events_queues_explains_what_a_worker_consumes() -> None:
    out = StringIO()
    with wiring(BROADCAST, NORMAL, {**NORMAL, "name": "cache-normal", "queue": "cache"}):
        call_command("events_queues", "--explain", stdout=out)
        plain = StringIO()
        call_command("events_queues", stdout=plain)

    assert plain.getvalue().strip() == "cache,django_events"
    assert out.getvalue().splitlines() == [
        "cache:",
        "  one worker runs each message: cache-normal",
        "  every worker gets a copy (fanout exchange cache.broadcast): bc",
        "django_events:",
        "  one worker runs each message: orders.placed:tests.app.handlers.record",
        "  webhook endpoints registered at run time (the admin)",
        "Start workers with: celery -A <project> worker -Q cache,django_events",
        "Broadcasts reach only workers whose Celery app called "
        "django_events.delivery.broadcast.consume_broadcasts(app).",
    ]
