"""django_events.testing and the pytest plugin: captured_events and events_eager, with
pytest-django's fixtures and with Django's TestCase."""

from __future__ import annotations

import importlib.metadata
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import transaction
from django.test import TestCase, TransactionTestCase, override_settings

from django_events import InvalidPayload, UnknownEvent, publish, publish_many
from django_events.models import Delivery, EventRecord
from django_events.testing import CapturedEvents, EagerEvents, captured_events, events_eager
from tests.app.models import HandlerRun
from tests.conftest import wiring
from tests.test_registry import typed_events  # noqa: F401 - a fixture

PAYLOAD = {"order_id": 1, "total": 12.5}
RECORD = "tests.app.handlers.record"
EVERY_MODE = [
    {"event": "orders.placed", "handler": RECORD, "mode": mode, "name": mode}
    for mode in ("inline", "sync", "async")
]
ASYNC = {"event": "orders.placed", "handler": RECORD, "mode": "async", "name": "async-record"}
FAILING = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.always_fails",
    "mode": "async",
    "name": "async-fails",
    "when": {"total": {"gte": 100}},
}
SYNC = {"event": "orders.placed", "handler": RECORD, "mode": "sync", "name": "sync-record"}
CHAINS = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "chains.yaml")]


def handled(name: str = "record") -> list[HandlerRun]:
    return list(HandlerRun.objects.filter(handler=name).order_by("id"))


# -- captured_events ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_captured_events_honours_commit_and_rollback_and_dispatches_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with wiring(*EVERY_MODE, CELERY_APP="tests.brokers.unreachable"), captured_events() as got:
        with transaction.atomic():
            kept = publish("orders.placed", PAYLOAD)
            assert len(got) == 0  # not committed yet
            with pytest.raises(ZeroDivisionError), transaction.atomic():
                publish("orders.placed", {"order_id": 2, "total": 1})
                1 / 0  # noqa: B018
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            publish("orders.placed", {"order_id": 3, "total": 1})
            1 / 0  # noqa: B018
        outside = publish("orders.shipped", {"order_id": 1})  # no transaction: at once

    assert list(got) == [kept, outside]
    assert not HandlerRun.objects.exists()  # not even the inline handler ran
    assert not EventRecord.objects.exists() and not Delivery.objects.exists()
    assert not [r for r in caplog.records if r.name.startswith("django_events")]  # no broker


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("capture_first", [True, False])
def test_captured_events_dispatches_nothing_with_events_eager_either_side(
    capture_first: bool,
) -> None:
    """docs/testing.md: inside captured_events nothing is dispatched, even with events_eager
    active too, whichever of the two was entered first (two fixtures in any order)."""
    helpers = [captured_events, events_eager]
    outer, inner = helpers if capture_first else helpers[::-1]
    with wiring(*EVERY_MODE), outer() as one, inner() as two:
        event = publish("orders.placed", PAYLOAD)
    got = one if capture_first else two
    assert isinstance(got, CapturedEvents) and list(got) == [event]
    assert not HandlerRun.objects.exists()
    assert not EventRecord.objects.exists() and not Delivery.objects.exists()


def test_captured_events_needs_no_database(captured_events: CapturedEvents) -> None:
    """docs/testing.md: `captured_events` does not need the database. It used to read the
    webhook endpoints registered at run time on each publish: "Database access not allowed"
    in a test without one (unless an earlier test had left them in the process's cache)."""
    with wiring(*EVERY_MODE):
        event = publish("orders.placed", PAYLOAD)
        [shipped] = publish_many([("orders.shipped", {"order_id": 1})])

    assert list(captured_events) == [event, shipped]


@pytest.mark.django_db(transaction=True)
def test_captured_events_filters_and_asserts_on_payloads() -> None:
    with captured_events() as got:
        publish("orders.placed", {"order_id": 1, "total": 10})
        publish("orders.placed", {"order_id": 2, "total": 20, "email": "a@example.com"})
        publish("orders.shipped", {"order_id": 1})

    assert got.names == ["orders.placed", "orders.placed", "orders.shipped"]
    assert repr(got) == "<CapturedEvents ['orders.placed', 'orders.placed', 'orders.shipped']>"
    assert [e.data["order_id"] for e in got.named("orders.*")] == [1, 2, 1]
    assert got.payloads("orders.shipped") == [{"order_id": 1}]
    event = got.assert_published("orders.placed", {"order_id": 2})
    assert event.payload["email"] == "a@example.com"
    assert got.assert_published("orders.placed", times=2).data["order_id"] == 2
    got.assert_not_published("orders.cancelled")

    with pytest.raises(AssertionError) as info:
        got.assert_published("orders.placed", {"order_id": 3})
    assert str(info.value) == (
        "Expected at least 1 'orders.placed' event(s) with payload matching {'order_id': 3}, "
        "found 0. Differences: [0] orders.placed $.order_id: expected 3, got 1; "
        "[1] orders.placed $.order_id: expected 3, got 2. "
        "Published: orders.placed {'order_id': 1, 'total': 10}, orders.placed "
        "{'order_id': 2, 'total': 20, 'email': 'a@example.com'}, orders.shipped {'order_id': 1}"
    )
    with pytest.raises(AssertionError, match=r"Expected 1 'orders.placed' event\(s\), found 2"):
        got.assert_published("orders.placed", times=1)
    with pytest.raises(AssertionError, match="Expected no 'orders.ship\\*' event"):
        got.assert_not_published("orders.ship*")
    with pytest.raises(ValueError, match="use assert_not_published"):
        got.assert_published("orders.placed", times=0)
    got.clear()
    assert len(got) == 0


CANCELLED = {
    "order_id": 1,
    "refunded": True,
    "fee": 2,
    "coupon": None,
    "notes": {"by": "shop", "codes": [1, True]},
}


@pytest.mark.django_db(transaction=True)
def test_assert_published_compares_payload_values_as_json_values() -> None:
    """A dict payload's values compare type for type (True is not 1, as JSON's true is not a
    number); numbers by value (1 is 1.0: JSON has one number type)."""
    with captured_events() as got:
        publish("orders.cancelled", CANCELLED)

    got.assert_published("orders.cancelled", CANCELLED)
    got.assert_published("orders.cancelled", {"fee": 2.0, "refunded": True, "coupon": None})
    got.assert_published("orders.cancelled", {"notes": {"by": "shop", "codes": (1.0, True)}})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("payload", "difference"),
    [
        ({"refunded": 1}, "$.refunded: expected 1, got True"),
        ({"fee": True}, "$.fee: expected True, got 2"),
        ({"order_id": "1"}, "$.order_id: expected '1', got 1"),
        ({"coupon": 0}, "$.coupon: expected 0, got None"),
        ({"coupon": uuid.UUID(int=0)}, f"$.coupon: expected {uuid.UUID(int=0)!r}, got None"),
        ({"refund": True}, "$.refund: missing (expected True)"),
        ({"fee": {"net": 2}}, "$.fee: expected {'net': 2}, got 2"),
        ({"notes": "shop"}, "$.notes: expected 'shop', got {'by': 'shop', 'codes': [1, True]}"),
        ({"notes": {"by": "shop"}}, "$.notes.codes: unexpected key (got [1, True])"),
        (
            {"notes": {"by": "shop", "codes": [1, True], "at": None}},
            "$.notes.at: missing (expected None)",
        ),
        (
            {"notes": {"by": ["shop"], "codes": [1, True]}},
            "$.notes.by: expected ['shop'], got 'shop'",
        ),
        (
            {"notes": {"by": "shop", "codes": [1]}},
            "$.notes.codes: expected 1 item(s), got 2: [1, True]",
        ),
        ({"notes": {"by": "shop", "codes": [1, 1]}}, "$.notes.codes[1]: expected 1, got True"),
    ],
)
def test_assert_published_names_the_path_where_a_payload_differs(
    payload: dict[str, Any], difference: str
) -> None:
    with captured_events() as got:
        publish("orders.placed", PAYLOAD)
        publish("orders.cancelled", CANCELLED)

    with pytest.raises(AssertionError) as info:
        got.assert_published("orders.cancelled", payload)
    assert f"found 0. Differences: [1] orders.cancelled {difference}. Published: " in str(
        info.value
    )


@pytest.mark.django_db(transaction=True)
def test_captured_events_still_rejects_an_invalid_payload_and_an_unknown_event() -> None:
    with captured_events() as got:
        with pytest.raises(InvalidPayload, match="total"):
            publish("orders.placed", {"order_id": 1, "total": -1})
        with pytest.raises(UnknownEvent, match="orders.lost"):
            publish("orders.lost", {"order_id": 1})

    assert list(got) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("typed_events")
def test_captured_typed_events_compare_with_instances() -> None:
    import decimal

    from tests.app.typed_events import PaymentReceived

    payment = PaymentReceived(payment_id=uuid.uuid4(), amount=decimal.Decimal("9.50"))
    with captured_events() as got:
        publish(payment)

    assert got.assert_published("typed.payment_received", payment).payload is payment
    assert got.assert_published("typed.payment_received", {"amount": "9.50"})
    other = PaymentReceived(payment_id=payment.payment_id, amount=decimal.Decimal("1"))
    with pytest.raises(AssertionError) as info:
        got.assert_published("typed.payment_received", other)
    difference = f"[0] typed.payment_received payload {payment!r} != {other!r}."
    assert f"Differences: {difference}" in str(info.value)


@pytest.mark.django_db(transaction=True)
def test_captured_events_sees_headers_from_interceptors() -> None:
    with wiring(PIPELINE=["tests.app.interceptors.Outer"]), captured_events() as got:
        publish("orders.placed", PAYLOAD)
    assert got[0].headers == {"stamp": "outer"}


def test_captured_events_with_pytest_django_on_commit_fixture(
    db: None, django_capture_on_commit_callbacks: Any, captured_events: CapturedEvents
) -> None:
    # `db` wraps the test in a transaction: commit callbacks run only through the fixture.
    with django_capture_on_commit_callbacks(execute=True):
        publish("orders.placed", PAYLOAD)
        assert len(captured_events) == 0
    captured_events.assert_published("orders.placed", PAYLOAD, times=1)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        publish("orders.placed", PAYLOAD)
    assert len(callbacks) == 1 and len(captured_events) == 1  # not run: not committed


def test_the_plugin_is_an_entry_point() -> None:
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert "django_events.testing.pytest_plugin" in [p.value for p in plugins]


# -- events_eager ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_events_eager_runs_async_handlers_in_process_after_commit(
    events_eager: EagerEvents,
) -> None:
    with wiring(ASYNC, SYNC, CELERY_APP="tests.brokers.unreachable"):
        with transaction.atomic():
            event = publish("orders.placed", PAYLOAD)
            assert handled() == []
        with pytest.raises(RuntimeError), transaction.atomic():
            publish("orders.placed", {"order_id": 2, "total": 1})
            raise RuntimeError

    assert [r.event_id for r in handled()] == [event.id, event.id]  # async + sync
    assert events_eager.delivered == [("async-record", event)]
    deliveries = dict(Delivery.objects.values_list("subscription", "status"))
    assert deliveries == {"async-record": "succeeded", "sync-record": "succeeded"}
    assert EventRecord.objects.get().status == "dispatched"


@pytest.mark.django_db(transaction=True)
def test_events_eager_posts_webhooks_over_the_network() -> None:
    """docs/testing.md: webhook subscriptions and endpoints are really sent (the receiver
    here is on loopback), their retries at once; a test that must not send stubs them."""
    import base64

    from django_events.delivery import endpoints
    from django_events.delivery.webhooks import WebhookFailed
    from tests.webhook_receiver import Receiver

    secret = "whsec_" + base64.b64encode(b"eager-secret-0123456789abcdef").decode()
    with Receiver(secret) as receiver:
        hook = {
            "event": "orders.placed",
            "mode": "webhook",
            "name": "hook",
            "url": "TEST_EAGER_URL",
            "secret": "TEST_EAGER_SECRET",
            "retry": {"max_attempts": 2, "backoff": 60},
        }
        with (
            wiring(hook, WEBHOOKS_ALLOW_PRIVATE=True),
            override_settings(TEST_EAGER_URL=receiver.url("ok"), TEST_EAGER_SECRET=secret),
            events_eager() as eager,
        ):
            endpoints.create_endpoint(receiver.url("ok"), ["orders.*"], secret=secret)
            publish("orders.placed", PAYLOAD)
            with (
                override_settings(TEST_EAGER_URL=receiver.url("down")),
                pytest.raises(WebhookFailed, match="HTTP 500"),
            ):
                publish("orders.placed", PAYLOAD)

    sent = receiver.of("ok")
    assert len(sent) == 3 and all(r.verified for r in sent)  # hook once, the endpoint twice
    assert all(r.json["data"] == PAYLOAD for r in sent)
    assert len(receiver.of("down")) == 2  # max_attempts, without the 60 s backoff
    assert [f.subscription for f in eager.failures] == ["hook"]


@pytest.mark.django_db(transaction=True)
def test_events_eager_raises_a_failed_async_handler_into_the_test() -> None:
    with (
        wiring(ASYNC, FAILING, SYNC),
        events_eager() as eager,
        pytest.raises(RuntimeError, match="boom for 5") as info,
        transaction.atomic(),
    ):
        event = publish("orders.placed", {"order_id": 5, "total": 100})

    assert info.value.__notes__ == [
        f"events_eager: async subscription 'async-fails' failed on 'orders.placed' {event.id}"
    ]
    failure = Delivery.objects.get(subscription="async-fails")
    assert (failure.status, failure.attempts) == ("failed", 3)  # retried at once, no waiting
    assert len(handled("always_fails")) == 3
    assert len(handled()) == 2  # the other async one and the sync one still ran
    assert [(f.subscription, f.event.id) for f in eager.failures] == [("async-fails", event.id)]


@pytest.mark.django_db(transaction=True)
def test_events_eager_a_failure_ends_the_commits_later_callbacks_as_django_does() -> None:
    """What docs/testing.md says: Django stops a commit's on-commit callbacks at the first
    that raises, so what was registered after the failing event does not run."""
    fails_for_1 = {**FAILING, "when": {"order_id": 1}}
    syncs_for_2 = {**SYNC, "when": {"order_id": 2}}
    later: list[str] = []
    with (
        wiring(fails_for_1, syncs_for_2),
        events_eager(),
        pytest.raises(RuntimeError, match="boom for 1"),
        transaction.atomic(),
    ):
        publish("orders.placed", {"order_id": 1, "total": 1})
        publish("orders.placed", {"order_id": 2, "total": 1})
        transaction.on_commit(lambda: later.append("the test's own callback"))

    assert handled() == [] and later == []  # the second event's sync handler, the callback
    with wiring(fails_for_1, syncs_for_2), events_eager(), transaction.atomic():
        publish("orders.placed", {"order_id": 2, "total": 1})  # alone, it runs
    assert len(handled()) == 1


@pytest.mark.django_db(transaction=True)
def test_events_eager_a_failure_runs_sync_handlers_after_and_leaves_its_records_pending() -> None:
    """What docs/testing.md says: the failing event's sync handlers run after its async
    deliveries (they said before); its record stays pending with those of its publish_many()
    call, delivered as they were, and an earlier publish() of the commit is marked as usual."""
    fails_for_2 = {**FAILING, "when": {"order_id": 2}}
    with (
        wiring(ASYNC, fails_for_2, SYNC),
        events_eager(),
        pytest.raises(RuntimeError, match="boom for 2"),
        transaction.atomic(),
    ):
        first = publish("orders.placed", {"order_id": 1, "total": 1})
        batch = publish_many([("orders.placed", {"order_id": n, "total": 1}) for n in (2, 3)])

    runs = [(r.handler, r.payload["order_id"]) for r in HandlerRun.objects.order_by("id")]
    assert runs == [
        *[("record", 1)] * 2,  # async-record, then sync-record
        ("record", 2),  # async-record
        *[("always_fails", 2)] * 3,
        ("record", 3),  # async-record: the batch's async deliveries all ran
        ("record", 2),  # then the batch's sync handlers, the failing event's included
        ("record", 3),
    ]
    statuses = dict(EventRecord.objects.values_list("pk", "status"))
    assert statuses == {first.id: "dispatched", batch[0].id: "pending", batch[1].id: "pending"}


@pytest.mark.django_db(transaction=True)
def test_events_eager_without_propagate_records_failures_like_a_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "django_events.worker")
    with wiring(FAILING), events_eager(propagate=False) as eager:
        event = publish("orders.placed", {"order_id": 5, "total": 100})

    [failure] = eager.failures
    assert isinstance(failure.error, RuntimeError) and failure.event == event
    assert Delivery.objects.get().status == "failed"
    messages = [r.getMessage() for r in caplog.records if r.name == "django_events.worker"]
    # Each names what failed, for a log read with Celery's default format (no extras).
    where = f"subscription 'async-fails', event orders.placed {event.id}"
    assert f"Handler failed (attempt 3 of 3): {where}" in messages
    assert (
        f"Delivery failed for good after 3 attempt(s): RuntimeError: boom for 5; {where}"
        in messages
    )


@pytest.mark.django_db(transaction=True)
def test_an_idempotent_success_is_kept_for_an_event_recording_failures_only() -> None:
    """The success record that makes a redelivery a no-op needs the event's record."""
    idempotent = {**ASYNC, "name": "idem", "idempotent": True}
    with wiring(idempotent, RECORD="failures"), events_eager() as eager:
        event = publish("orders.placed", PAYLOAD)
        quiet = publish("orders.shipped", {"order_id": 1})  # no subscription: no record

    assert eager.delivered == [("idem", event)]
    assert [r.event_id for r in handled()] == [event.id]
    assert list(EventRecord.objects.values_list("pk", "status")) == [(event.id, "dispatched")]
    assert Delivery.objects.get(event_id=event.id).status == "succeeded"
    assert not EventRecord.objects.filter(pk=quiet.id).exists()


@pytest.mark.django_db(transaction=True)
def test_events_eager_follows_a_sync_async_async_chain() -> None:
    with wiring(MANIFESTS=CHAINS), events_eager():
        first = publish("chain.placed", {"steps": ["chain.billed", "chain.shipped"]})

    runs = {r.event_name: r for r in handled("forward")}
    assert list(runs) == ["chain.placed", "chain.billed", "chain.shipped"]
    assert {r.correlation_id for r in runs.values()} == {first.id}
    assert runs["chain.placed"].causation_id is None
    assert runs["chain.billed"].causation_id == runs["chain.placed"].event_id
    assert runs["chain.shipped"].causation_id == runs["chain.billed"].event_id


PUBLISHES_SHIPPED = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.chain_next_atomically",
    "mode": "async",
    "name": "async-ships",
}
SHIPPED_FAILS = {
    "event": "orders.shipped",
    "handler": "tests.app.handlers.always_fails",
    "mode": "async",
    "name": "shipped-fails",
    "retry": {"max_attempts": 1},
}


@pytest.mark.django_db(transaction=True)
def test_events_eager_fails_a_child_delivery_alone() -> None:
    with wiring(PUBLISHES_SHIPPED, SHIPPED_FAILS), events_eager(propagate=False) as eager:
        placed = publish("orders.placed", {"order_id": 3, "total": 1.0})

    assert len(handled("chain_next")) == 1  # the parent ran once, not once per attempt
    assert len(handled("always_fails")) == 1
    parent = Delivery.objects.get(event_id=placed.id)
    assert (parent.subscription, parent.status, parent.attempts) == ("async-ships", "succeeded", 1)
    child = Delivery.objects.get(subscription="shipped-fails")
    assert (child.status, child.attempts) == ("failed", 1)
    assert [(f.subscription, f.event.name) for f in eager.failures] == [
        ("shipped-fails", "orders.shipped")
    ]
    assert [name for name, _ in eager.delivered] == ["async-ships", "shipped-fails"]


@pytest.mark.django_db(transaction=True)
def test_events_eager_raises_a_child_failure_as_the_childs_after_the_parent_succeeded() -> None:
    with (
        wiring(PUBLISHES_SHIPPED, SHIPPED_FAILS),
        events_eager() as eager,
        pytest.raises(RuntimeError, match="boom for 3") as raised,
    ):
        publish("orders.placed", {"order_id": 3, "total": 1.0})

    assert "async subscription 'shipped-fails' failed on 'orders.shipped'" in "".join(
        raised.value.__notes__
    )
    assert len(handled("chain_next")) == 1
    assert len(eager.failures) == 1
    assert Delivery.objects.get(subscription="async-ships").status == "succeeded"


def test_events_eager_with_pytest_django_on_commit_fixture(
    db: None, django_capture_on_commit_callbacks: Any, events_eager: EagerEvents
) -> None:
    with wiring(ASYNC, FAILING), django_capture_on_commit_callbacks(execute=True):
        publish("orders.placed", PAYLOAD)
        assert handled() == []
    assert len(handled()) == 1
    with (
        wiring(ASYNC, FAILING),
        pytest.raises(RuntimeError, match="boom"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish("orders.placed", {"order_id": 9, "total": 500})


@pytest.mark.django_db(transaction=True)
def test_both_helpers_leave_nothing_behind_when_their_block_raises() -> None:
    with wiring(*EVERY_MODE, CELERY_APP="tests.brokers.unreachable"):
        with pytest.raises(ZeroDivisionError), captured_events() as got:
            1 / 0  # noqa: B018
        with pytest.raises(ZeroDivisionError), events_eager() as eager:
            1 / 0  # noqa: B018
        event = publish("orders.placed", PAYLOAD)

    assert list(got) == [] and eager.delivered == []
    assert [r.event_id for r in handled()] == [event.id, event.id]  # inline and sync ran
    assert EventRecord.objects.get().status == "pending"  # async: left for the relay


# -- Django's TestCase ----------------------------------------------------------------------


class CapturedInTestCase(TestCase):
    def test_captured_after_commit_callbacks_run(self) -> None:
        with captured_events() as got:
            with self.captureOnCommitCallbacks(execute=True):
                publish("orders.placed", PAYLOAD)
            with self.captureOnCommitCallbacks(execute=False):
                publish("orders.shipped", {"order_id": 1})
        assert got.names == ["orders.placed"]


class EagerInTestCase(TestCase):
    def test_async_handler_runs_inside_the_test_transaction(self) -> None:
        idempotent = {**ASYNC, "name": "idem", "idempotent": True}
        with (
            wiring(ASYNC, idempotent),
            events_eager(),
            self.captureOnCommitCallbacks(execute=True),
        ):
            event = publish("orders.placed", PAYLOAD)
        assert len(handled()) == 2
        assert set(Delivery.objects.filter(event_id=event.id).values_list("status", flat=True)) == {
            "succeeded"
        }


class EagerInTransactionTestCase(TransactionTestCase):
    def test_failure_raises_at_commit(self) -> None:
        with wiring(FAILING), events_eager(), pytest.raises(RuntimeError), transaction.atomic():
            publish("orders.placed", {"order_id": 1, "total": 100})
        assert Delivery.objects.get().status == "failed"
