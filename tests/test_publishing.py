"""publish() and publish_many(): validation, records, commit semantics, modes and chains."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
import weakref
from datetime import datetime, timedelta

import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from django_events import (
    InterceptorError,
    InvalidPayload,
    UnknownEvent,
    apublish_many,
    publish,
    publish_many,
)
from django_events.delivery import broker, marking
from django_events.events import Event
from django_events.models import Delivery, EventRecord
from tests.app.models import HandlerRun, Order
from tests.conftest import wiring
from tests.test_registry import typed_events  # noqa: F401 - a fixture

SYNC = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "sync"}
INLINE = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.record",
    "mode": "inline",
    "name": "inline-record",
}
FAILING_SYNC = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.always_fails",
    "mode": "sync",
    "name": "sync-fails",
}
ASYNC = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.record",
    "mode": "async",
    "name": "async-record",
}
PAYLOAD = {"order_id": 1, "total": 12.5}


def handled(handler: str = "record") -> list[HandlerRun]:
    return list(HandlerRun.objects.filter(handler=handler).order_by("id"))


@pytest.mark.django_db(transaction=True)
def test_sync_handlers_run_after_commit_only() -> None:
    with wiring(SYNC), transaction.atomic():
        event = publish("orders.placed", PAYLOAD)
        assert handled() == []
        assert EventRecord.objects.get(pk=event.id).status == "dispatched"
    [run] = handled()
    assert run.event_id == event.id and run.payload == PAYLOAD
    delivery = Delivery.objects.get(event_id=event.id)
    assert (delivery.subscription, delivery.mode, delivery.status, delivery.attempts) == (
        "orders.placed:tests.app.handlers.record",
        "sync",
        "succeeded",
        1,
    )


@pytest.mark.django_db(transaction=True)
def test_changing_a_payload_after_publish_does_not_change_what_was_published() -> None:
    """Handlers run after the commit: they get each payload as it was published, not as the
    caller's dict (reused in a loop) is by then, nested values included."""
    payload: dict[str, object] = {"order_id": 0, "total": 1.0}
    nested = {"order_id": 0, "total": 1.0, "items": [{"sku": "a"}]}
    with wiring(SYNC), transaction.atomic():
        events = []
        for order_id in (1, 2, 3):
            payload["order_id"] = order_id
            events.append(publish("orders.placed", payload))
        events.append(publish("orders.placed", nested))
        nested["items"][0]["sku"] = "changed"  # type: ignore[index]
        payload["order_id"] = "not an integer"  # what the schema refuses
    expected = [{"order_id": n, "total": 1.0} for n in (1, 2, 3)]
    expected.append({"order_id": 0, "total": 1.0, "items": [{"sku": "a"}]})
    assert [run.payload for run in handled()] == expected
    assert [event.payload for event in events] == expected
    records = EventRecord.objects.in_bulk([event.id for event in events])
    assert [records[event.id].payload for event in events] == expected


@pytest.mark.django_db(transaction=True)
def test_rollback_runs_nothing_and_records_nothing() -> None:
    with wiring(SYNC), pytest.raises(ZeroDivisionError), transaction.atomic():
        event = publish("orders.placed", PAYLOAD)
        1 / 0  # noqa: B018
    assert handled() == []
    assert not EventRecord.objects.filter(pk=event.id).exists()


@pytest.mark.django_db(transaction=True)
def test_nested_atomic_delivers_on_the_outermost_commit() -> None:
    with wiring(SYNC), transaction.atomic():
        with transaction.atomic():
            publish("orders.placed", PAYLOAD)
        assert handled() == []
    assert len(handled()) == 1


@pytest.mark.django_db(transaction=True)
def test_rolled_back_savepoint_drops_its_event_only() -> None:
    with wiring(SYNC), transaction.atomic():
        kept = publish("orders.placed", {"order_id": 1, "total": 1})
        with pytest.raises(RuntimeError), transaction.atomic():
            publish("orders.placed", {"order_id": 2, "total": 2})
            raise RuntimeError
    assert [r.event_id for r in handled()] == [kept.id]
    assert list(EventRecord.objects.values_list("id", flat=True)) == [kept.id]


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_delivers_at_once() -> None:
    with wiring(SYNC):
        event = publish("orders.placed", PAYLOAD)
    assert [r.event_id for r in handled()] == [event.id]


@pytest.mark.django_db
def test_event_ids_are_random_rfc4122_version_4_uuids() -> None:
    ids = [publish("orders.placed", {"order_id": n, "total": 1.0}).id for n in range(200)]
    assert len(set(ids)) == 200
    assert {i.version for i in ids} == {4}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    assert all(uuid.UUID(str(i), version=4) == i for i in ids)  # the bits uuid4() would set


@pytest.mark.django_db(transaction=True)
def test_inline_handler_runs_in_the_transaction_and_its_error_rolls_back() -> None:
    failing = {**INLINE, "handler": "tests.app.handlers.inline_fails"}
    with wiring(INLINE), transaction.atomic():
        publish("orders.placed", PAYLOAD)
        assert len(handled()) == 1  # ran at once, inside the transaction
    with wiring(failing, SYNC), pytest.raises(ValueError, match="refused"), transaction.atomic():
        Order.objects.create(total=5)
        publish("orders.placed", PAYLOAD)
    assert not Order.objects.exists()
    assert EventRecord.objects.count() == 1  # only the first event


@pytest.mark.django_db(transaction=True)
def test_publish_many_whose_inline_handler_raises_publishes_nothing_even_in_autocommit() -> None:
    # The second item's inline handler raises after the first's ran: publish_many() raised,
    # so none of it happened, outside a transaction as inside (where the caller carries on).
    failing = {
        **INLINE,
        "handler": "tests.app.handlers.inline_fails",
        "name": "inline-fails",
        "when": {"order_id": {"eq": 2}},
    }
    items = [("orders.placed", {**PAYLOAD, "order_id": n}) for n in (1, 2)]
    with wiring(INLINE, failing, SYNC):
        with pytest.raises(ValueError, match="refused"):
            publish_many(items)
        assert handled() == []  # the first item's inline run undone, no sync run
        assert not EventRecord.objects.exists()
        with transaction.atomic():
            Order.objects.create(total=5)
            with pytest.raises(ValueError, match="refused"):
                publish_many(items)
    assert Order.objects.count() == 1
    assert handled() == []
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("in_transaction", [False, True])
def test_an_inline_handlers_failing_hook_does_not_keep_the_deliveries_from_running(
    in_transaction: bool,
) -> None:
    # Django stops running a transaction's hooks at one that raises: the deliveries' hook is
    # registered before the inline handlers run, so theirs cannot stop it.
    hooked = {**INLINE, "handler": "tests.app.handlers.inline_hook_fails", "name": "hooked"}
    with wiring(hooked, SYNC), pytest.raises(RuntimeError, match="hook failed"):
        if in_transaction:
            with transaction.atomic():
                publish("orders.placed", PAYLOAD)
        else:  # the hook raises as publish()'s own transaction commits
            publish("orders.placed", PAYLOAD)
    [record] = EventRecord.objects.all()
    assert record.status == "dispatched"
    [run] = handled()  # the sync handler ran all the same
    assert run.event_id == record.pk


@pytest.mark.django_db(transaction=True)
def test_failing_sync_handler_is_recorded_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    with wiring(FAILING_SYNC, SYNC), transaction.atomic():
        event = publish("orders.placed", PAYLOAD)
    assert len(handled()) == 1  # the other handler still ran
    failure = Delivery.objects.get(event_id=event.id, subscription="sync-fails")
    assert failure.status == "failed" and failure.attempts == 1
    assert failure.last_error == "RuntimeError: boom for 1"
    assert "Traceback" in failure.traceback
    [record] = [r for r in caplog.records if r.name == "django_events.dispatch"]
    assert record.event_id == str(event.id) and record.subscription == "sync-fails"
    assert record.getMessage() == (
        f"Sync handler failed: subscription 'sync-fails', event orders.placed {event.id}"
    )


@pytest.mark.django_db(transaction=True)
def test_a_sync_handlers_retry_later_is_recorded_as_not_retried() -> None:
    """Sync deliveries are never retried: "RetryLater: retry in 5s" alone would promise one."""
    asks = {**SYNC, "handler": "tests.app.handlers.retry_later"}
    with wiring(asks):
        event = publish("orders.placed", {**PAYLOAD, "times": 1, "seconds": 5})
    assert Delivery.objects.get(event_id=event.id).last_error == (
        "RetryLater: retry in 5s (not retried: sync deliveries are not; events_retry runs it again)"
    )


def test_unknown_event_raises_and_records_nothing(db: None) -> None:
    with pytest.raises(UnknownEvent, match="'orders.nope'"):
        publish("orders.nope", {})
    assert not EventRecord.objects.exists()


def test_an_unknown_event_says_the_close_name_and_the_configuration_errors(db: None) -> None:
    # A web process runs no system checks: a declaration left out for an error would only
    # show as "unknown event".
    broken = {**SYNC, "name": "broken", "mode": "asynch"}
    with wiring(SYNC, broken), pytest.raises(UnknownEvent) as info:
        publish("orders.placd", PAYLOAD)
    message = str(info.value)
    assert message.startswith(
        "Unknown event 'orders.placd': declare it in a manifest, settings or @event. "
        "Did you mean 'orders.placed'? The configuration has 1 error(s), and a declaration "
        "with an error is left out (the first: django_events.E103 "
    )
    assert "'asynch'" in message and message.endswith(": run manage.py events_check.")
    with wiring(SYNC), pytest.raises(UnknownEvent) as info:
        publish("zzz", PAYLOAD)
    assert str(info.value) == ("Unknown event 'zzz': declare it in a manifest, settings or @event.")


def test_invalid_payload_names_event_and_paths(db: None) -> None:
    with wiring(SYNC), pytest.raises(InvalidPayload) as info:
        publish("orders.placed", {"order_id": "x", "total": -1, "items": [{}]})
    error = info.value
    assert error.name == "orders.placed"
    assert [p.path for p in error.problems] == ["$", "$.items[0]", "$.order_id", "$.total"] or [
        p.path for p in error.problems
    ] == ["$.items[0]", "$.order_id", "$.total"]
    assert "'sku' is a required property" in str(error)
    assert "-1 is less than the minimum of 0" in str(error)
    assert not EventRecord.objects.exists()


def test_publish_many_names_the_item_whose_payload_is_invalid(db: None) -> None:
    items = (("orders.placed", {"order_id": n, "total": 1}) for n in (1, 2, "three", 4))
    with wiring(SYNC), pytest.raises(InvalidPayload) as info:
        publish_many(items)  # a generator: the index counts what it yielded
    error = info.value
    assert str(error) == (
        "publish_many() item at index 2: Invalid payload for event 'orders.placed': "
        "$.order_id: 'three' is not of type 'integer'"
    )
    assert (error.name, [p.path for p in error.problems]) == ("orders.placed", ["$.order_id"])
    with pytest.raises(InvalidPayload, match=r"^publish_many\(\) item at index 1: "):
        async_to_sync(apublish_many)([("orders.placed", PAYLOAD), ("orders.placed", [1])])
    assert not EventRecord.objects.exists()


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (
            ("orders.placd", PAYLOAD),
            UnknownEvent,
            "Unknown event 'orders.placd': declare it in a manifest, settings or @event. "
            "Did you mean 'orders.placed'?",
        ),
        (
            ("orders.placed", PAYLOAD, {"tenant": 3}),
            TypeError,
            "headers of 'orders.placed' must map str to str, got {'tenant': 3}",
        ),
        (
            ("orders.placed",),
            TypeError,
            "publish_many() items are (name, payload[, headers]), got ('orders.placed',)",
        ),
    ],
)
def test_publish_many_names_the_item_whose_name_or_headers_are_wrong(
    db: None, bad: tuple[object, ...], error: type[Exception], message: str
) -> None:
    items = [("orders.placed", PAYLOAD), ("orders.placed", PAYLOAD), bad]
    with wiring(SYNC), pytest.raises(error) as info:
        publish_many(iter(items))
    assert str(info.value) == f"publish_many() item at index 2: {message}"
    if isinstance(info.value, UnknownEvent):
        assert info.value.name == "orders.placd"
    with pytest.raises(error) as info:
        async_to_sync(apublish_many)([bad, ("orders.placed", PAYLOAD)])
    assert str(info.value) == f"publish_many() item at index 0: {message}"
    assert not EventRecord.objects.exists()
    assert not HandlerRun.objects.exists()


def test_publish_many_names_the_item_an_interceptor_refused(db: None) -> None:
    items = [("orders.placed", {**PAYLOAD, "order_id": n}) for n in (1, 2, 3)]
    with (
        wiring(SYNC, PIPELINE=["tests.app.interceptors.RefusesOrderTwo"]),
        pytest.raises(InterceptorError) as info,
    ):
        publish_many(items)
    assert str(info.value) == (
        "publish_many() item at index 1: Interceptor tests.app.interceptors.RefusesOrderTwo "
        "refused event 'orders.placed': ValueError: order 2 is on hold"
    )
    assert not EventRecord.objects.exists()


def test_payload_must_be_json(db: None) -> None:
    with pytest.raises(InvalidPayload, match="not JSON-serializable"):
        publish("orders.placed", {"order_id": 1, "total": 1, "extra": object()})
    with pytest.raises(InvalidPayload, match="expected a dict"):
        publish("orders.placed", [1, 2])


def test_headers_must_be_strings(db: None) -> None:
    with pytest.raises(TypeError, match="headers of 'orders.placed' must map str to str"):
        publish("orders.placed", PAYLOAD, headers={"tenant": 3})  # type: ignore[dict-item]
    event = publish("orders.placed", PAYLOAD, headers={"tenant": "acme"})
    assert EventRecord.objects.get(pk=event.id).headers == {"tenant": "acme"}


@pytest.mark.django_db(transaction=True)
def test_events_published_by_a_handler_chain_correlation_and_causation() -> None:
    chain = {"event": "orders.placed", "handler": "tests.app.handlers.chain_next", "mode": "sync"}
    shipped = {"event": "orders.shipped", "handler": "tests.app.handlers.record", "mode": "sync"}
    with wiring(chain, shipped), transaction.atomic():
        first = publish("orders.placed", PAYLOAD)
    [second] = EventRecord.objects.filter(name="orders.shipped")
    assert first.correlation_id == first.id and first.causation_id is None
    assert second.correlation_id == first.id
    assert second.causation_id == first.id
    [run] = handled("record")
    assert run.causation_id == first.id


@pytest.mark.django_db(transaction=True)
def test_wildcard_and_filtered_subscriptions() -> None:
    everything = {"event": "*", "handler": "tests.app.handlers.record_other", "mode": "sync"}
    big = {**SYNC, "when": {"any": [{"total": {"gte": 1000}}, {"email": {"exists": True}}]}}
    with wiring(everything, big):
        publish("orders.placed", {"order_id": 1, "total": 5})
        b = publish("orders.placed", {"order_id": 2, "total": 5000})
        c = publish("orders.placed", {"order_id": 3, "total": 1, "email": "a@b.c"})
        publish("orders.shipped", {"order_id": 3})
    assert len(handled("record_other")) == 4
    assert [r.event_id for r in handled("record")] == [b.id, c.id]


@pytest.mark.django_db(transaction=True)
def test_class_handler_is_instantiated_once_per_process() -> None:
    from tests.app.handlers import ClassHandler

    before = ClassHandler.instances
    sub = {**SYNC, "handler": "tests.app.handlers.ClassHandler"}
    with wiring(sub):
        publish("orders.placed", PAYLOAD)
        publish("orders.placed", PAYLOAD)
    assert len(handled("class_handler")) == 2
    assert ClassHandler.instances == before + 1


@pytest.mark.django_db(transaction=True)
def test_publish_many_validates_everything_first_and_inserts_once(
    django_assert_num_queries,
) -> None:
    with wiring(SYNC):
        with pytest.raises(InvalidPayload), transaction.atomic():
            publish_many([("orders.placed", PAYLOAD), ("orders.placed", {"order_id": "bad"})])
        assert not EventRecord.objects.exists()
        with transaction.atomic():
            with django_assert_num_queries(1):  # one INSERT for all the records
                events = publish_many(
                    [("orders.placed", {"order_id": i, "total": i}) for i in range(50)]
                )
            assert handled() == []
    assert len(events) == 50
    assert EventRecord.objects.count() == 50
    assert sorted(r.payload["order_id"] for r in handled()) == list(range(50))
    assert Delivery.objects.filter(status="succeeded").count() == 50


@pytest.mark.django_db
def test_a_payload_where_the_event_goes_is_a_type_error_not_an_unknown_event() -> None:
    @dataclasses.dataclass
    class NotDeclared:
        order_id: int

    with wiring(SYNC):
        for first in ({"order_id": 1}, None, [1], 7):
            with pytest.raises(TypeError, match="its name \\(str\\) or an instance of an @event"):
                publish(first, PAYLOAD)
        with pytest.raises(UnknownEvent, match="neither an @event class nor the type:"):
            publish(NotDeclared(1))
        with pytest.raises(TypeError, match=r"an instance of NotDeclared, not the class"):
            publish(NotDeclared)
        with pytest.raises(TypeError, match="got dict"):
            publish_many([({"order_id": 1}, None)])
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("typed_events")
def test_publish_many_takes_typed_instances_and_headers_and_refuses_other_shapes() -> None:
    from tests.app.typed_events import Shipment  # not an @event: a manifest types it

    typed = {"shipping.shipped": {"type": "tests.app.typed_events.Shipment"}}
    shipment = Shipment(1, "ups", datetime(2024, 1, 2).date())
    with wiring(SYNC, EVENTS=typed):
        events = publish_many(
            [
                shipment,
                ("orders.placed", PAYLOAD, {"X-Source": "import"}),
                ("orders.shipped", {"order_id": 1}),
            ]
        )
        with pytest.raises(TypeError, match=r"items are \(name, payload\[, headers\]\), got"):
            publish_many([("orders.placed",)])

    assert [(e.name, e.headers.get("X-Source")) for e in events] == [
        ("shipping.shipped", None),
        ("orders.placed", "import"),
        ("orders.shipped", None),
    ]
    assert events[0].payload == shipment
    assert EventRecord.objects.count() == 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("typed_events")
def test_a_typed_instance_with_a_payload_too_is_refused() -> None:
    """An instance is its own payload: a second argument is an error, not silently dropped."""
    from decimal import Decimal

    from tests.app.typed_events import PaymentReceived, Shipment

    typed = {"shipping.shipped": {"type": "tests.app.typed_events.Shipment"}}
    payment = PaymentReceived(payment_id=uuid.uuid4(), amount=Decimal("9.50"))
    shipment = Shipment(1, "ups", datetime(2024, 1, 2).date())
    subscriptions = [
        {"event": name, "handler": "tests.app.handlers.record", "mode": "sync", "name": name}
        for name in ("typed.payment_received", "shipping.shipped", "orders.shipped")
    ]
    with wiring(*subscriptions, EVENTS=typed):
        with pytest.raises(TypeError) as info:
            publish(payment, {"amount": "1.00"})
        with pytest.raises(
            TypeError, match="'shipping.shipped': the Shipment instance is the payload"
        ):
            publish(shipment, {}, headers={"X-Source": "import"})
        with pytest.raises(
            TypeError, match="'shipping.shipped': the Shipment instance is the payload"
        ):
            publish_many([("orders.shipped", {"order_id": 1}), (shipment, {"carrier": "dhl"})])
        publish_many([(shipment, None, {"X-Source": "import"})])  # no payload: headers only

    assert str(info.value) == (
        "Event 'typed.payment_received': the PaymentReceived instance is the payload, so no "
        "payload argument is taken (got dict); publish the instance alone, or the name "
        "'typed.payment_received' with a payload dict"
    )
    assert [r.event_name for r in handled()] == ["shipping.shipped"]  # nothing else ran


@pytest.mark.django_db(transaction=True)
def test_record_failures_only_keeps_failed_events() -> None:
    with wiring(SYNC, FAILING_SYNC, RECORD="failures"):
        ok = publish("orders.shipped", {"order_id": 1})
        bad = publish("orders.placed", PAYLOAD)
    assert not EventRecord.objects.filter(pk=ok.id).exists()
    assert EventRecord.objects.get(pk=bad.id).payload == PAYLOAD
    assert list(Delivery.objects.values_list("subscription", "status")) == [
        ("sync-fails", "failed")
    ]


@pytest.mark.django_db(transaction=True)
def test_unreachable_broker_leaves_the_record_pending_and_commits(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="django_events.broker")
    with wiring(ASYNC, SYNC, CELERY_APP="tests.brokers.unreachable"):
        started = time.monotonic()
        with transaction.atomic():
            Order.objects.create(total=1)
            first = publish("orders.placed", PAYLOAD)
        with transaction.atomic():
            second = publish("orders.placed", PAYLOAD)
        elapsed = time.monotonic() - started
    assert Order.objects.count() == 1
    assert set(EventRecord.objects.values_list("id", "status")) == {
        (first.id, "pending"),
        (second.id, "pending"),
    }
    assert len(handled()) == 2  # sync handlers are not held back by the broker
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Broker unreachable" in errors[0].getMessage()
    assert elapsed < 15  # bounded by broker_connection_timeout, never a hang


@pytest.mark.django_db(transaction=True)
def test_an_outage_is_one_celery_apps_and_another_apps_sends_do_not_end_it(caplog) -> None:
    # Two Celery apps in one process, the broker of one down: the other's sends succeed
    # without saying the outage ended, and the next probe of the first says nothing new.
    caplog.set_level(logging.DEBUG, logger="django_events.broker")

    def publish_with(app: str) -> Event:
        with wiring(ASYNC, CELERY_APP=app), transaction.atomic():
            return publish("orders.placed", PAYLOAD)

    down = publish_with("tests.brokers.unreachable")
    sent = publish_with("tests.celery_app.app")  # in memory
    time.sleep(broker.BrokerHealth.first_probe + 0.1)  # the next publisher probes the broker
    still_down = publish_with("tests.brokers.unreachable")
    said = [
        (r.levelname, r.getMessage().partition(";")[0])
        for r in caplog.records
        if r.name == "django_events.broker" and r.levelno >= logging.INFO
    ]
    assert said == [("ERROR", "Broker unreachable")]
    assert [EventRecord.objects.get(pk=e.id).status for e in (down, sent, still_down)] == [
        "pending",
        "dispatched",
        "pending",
    ]


@pytest.mark.django_db(transaction=True)
def test_a_broker_url_whose_transport_does_not_load_leaves_the_record_pending(caplog) -> None:
    # "redsi://": kombu cannot load the transport. publish() and the commit raise nothing,
    # as for a broker that is down; the record waits for the relay; the log says why.
    with wiring(ASYNC, SYNC, CELERY_APP="tests.brokers.unloadable"):
        with transaction.atomic():
            Order.objects.create(total=1)
            event = publish("orders.placed", PAYLOAD)
        outside = publish("orders.placed", PAYLOAD)
    assert Order.objects.count() == 1
    assert set(EventRecord.objects.values_list("id", "status")) == {
        (event.id, "pending"),
        (outside.id, "pending"),
    }
    assert len(handled()) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("redsi" in e for e in errors), errors


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("celery_app", ["tests.app.nope.app", None])
def test_without_a_celery_app_async_events_stay_pending_and_it_says_why(
    celery_app, monkeypatch, caplog
) -> None:
    from celery import _state as celery_state

    if celery_app is None:  # a process where no Celery app was ever created
        monkeypatch.setattr(celery_state._tls, "current_app", None)
        monkeypatch.setattr(celery_state, "default_app", None)
        monkeypatch.setattr(celery_state, "_apps", weakref.WeakSet())
    with wiring(ASYNC, SYNC, CELERY_APP=celery_app), transaction.atomic():
        event = publish("orders.placed", PAYLOAD)

    assert EventRecord.objects.get(pk=event.id).status == "pending"  # for events_relay
    assert len(handled()) == 1  # the sync handler ran all the same
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage() == (
        "DJANGO_EVENTS['CELERY_APP'] does not import; events stay pending"
        if celery_app
        else "No Celery app: set DJANGO_EVENTS['CELERY_APP']; events stay pending"
    )
    assert error.event_id == str(event.id)


@pytest.mark.django_db(transaction=True)
def test_sent_events_are_marked_dispatched_and_unsent_ones_stay_pending(monkeypatch) -> None:
    unsent: set[uuid.UUID] = set()

    def send(items, alias, marker=None):  # the broker took every message but those of `unsent`
        if marker is not None:  # PostgreSQL: the background marker marks what was taken
            marker.taken(alias, [e.id for e, _, _ in items if e.id not in unsent])
        return broker.Unsent(refused=frozenset(unsent))

    monkeypatch.setattr(broker, "send_deliveries", send)
    with wiring(ASYNC):
        before = timezone.now()
        with transaction.atomic():
            events = publish_many([("orders.placed", PAYLOAD)] * 3)
            unsent.add(events[1].id)
        marking.flush()
        after = timezone.now()
    records = {r.id: r for r in EventRecord.objects.all()}
    sent = [records[events[0].id], records[events[2].id]]
    assert {r.status for r in sent} == {"dispatched"}
    assert all(r.dispatched_at is not None and before <= r.dispatched_at <= after for r in sent)
    pending = records[events[1].id]
    assert (pending.status, pending.dispatched_at) == ("pending", None)


def test_typed_payload_and_event_fields(db: None, django_capture_on_commit_callbacks) -> None:
    with wiring(SYNC), django_capture_on_commit_callbacks() as callbacks:
        event = publish("orders.placed", PAYLOAD, headers={"h": "v"})
    assert isinstance(event, Event)
    assert isinstance(event.id, uuid.UUID) and event.occurred_at.tzinfo is not None
    assert event.payload == PAYLOAD and event.headers == {"h": "v"}
    assert len(callbacks) == 1 and handled() == []


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_using_records_on_that_database_and_waits_for_its_commit() -> None:
    with wiring(SYNC):
        with transaction.atomic(using="other"):
            event = publish("orders.placed", PAYLOAD, using="other")
            assert handled() == []
            with transaction.atomic():  # a commit on another alias delivers nothing
                Order.objects.create(total=1)
            assert handled() == []
        assert [r.event_id for r in handled()] == [event.id]
    assert EventRecord.objects.using("other").filter(pk=event.id).exists()
    assert not EventRecord.objects.filter(pk=event.id).exists()
    assert Delivery.objects.using("other").get(event_id=event.id).status == "succeeded"


@pytest.mark.django_db
def test_event_ids_are_distinct_version_4_uuids_that_round_trip() -> None:
    with wiring():
        ids = [publish("orders.placed", {"order_id": n, "total": 1.0}).id for n in range(50)]
    assert len(set(ids)) == 50
    for event_id in ids:
        assert isinstance(event_id, uuid.UUID)
        assert (event_id.version, event_id.variant) == (4, uuid.RFC_4122)
        copy = uuid.UUID(str(event_id))
        assert copy == event_id and hash(copy) == hash(event_id)
    assert set(EventRecord.objects.filter(pk__in=ids).values_list("pk", flat=True)) == set(ids)


@pytest.mark.django_db
def test_occurred_at_follows_use_tz_as_timezone_now_does(
    django_capture_on_commit_callbacks,
) -> None:
    # The registry reads USE_TZ once (figure 1); changing the setting must still be seen.
    with wiring():
        with override_settings(USE_TZ=False), django_capture_on_commit_callbacks():
            naive = publish("orders.placed", PAYLOAD, using="default").occurred_at
        with django_capture_on_commit_callbacks():
            aware = publish("orders.placed", PAYLOAD).occurred_at
    assert naive.tzinfo is None
    assert abs(naive - datetime.now()) < timedelta(minutes=1)  # local time, as Django's
    assert aware.tzinfo is not None and aware.utcoffset() == timedelta(0)


@pytest.mark.django_db
def test_published_events_are_whole_frozen_events() -> None:
    # publish() builds its Event without the dataclass __init__ (figure 1): every field must
    # still be set, and the event as frozen and equal as one built the ordinary way.
    event = publish("orders.placed", {"order_id": 3, "total": 1.5})

    values = {f.name: getattr(event, f.name) for f in dataclasses.fields(Event)}
    assert event == Event(**values)
    assert values["data"] == {"order_id": 3, "total": 1.5}
    assert values["correlation_id"] == event.id and values["causation_id"] is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.name = "orders.other"  # type: ignore[misc]


@pytest.mark.django_db
def test_records_hold_exactly_what_their_events_hold() -> None:
    from datetime import datetime, timedelta
    from datetime import timezone as dt_timezone

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_events.delivery.recording import insert_records

    chained, cause = uuid.uuid4(), uuid.uuid4()
    data = {
        "order_id": 2**53,
        "total": 0.1,
        "note": "naïve 'quoted' \"double\" back\\slash\nnewline \u2603 %s %(x)s",
        "nested": {"list": [1, None, True, {"a": []}], "empty": ""},
    }
    headers = {"x-request-id": "r'1\"\\", "traceparent": "00-ab"}
    india = dt_timezone(timedelta(hours=5, minutes=30))
    at = datetime(2026, 3, 29, 1, 59, 59, 999999, tzinfo=india)
    events = [
        Event(uuid.uuid4(), "orders.placed", {}, {}, timezone.now(), uuid.uuid4(), None, {}),
        Event(chained, "orders.placed", data, headers, at, chained, cause, data),
    ]
    with CaptureQueriesContext(connection) as queries:
        insert_records("default", [(events[0], "pending"), (events[1], "dispatched")])
    assert len(queries) == 1  # one statement, and Django's query log saw it
    if connection.vendor == "postgresql":  # the rows as one JSON document
        assert "jsonb_to_recordset" in queries[0]["sql"]
    for event, status in zip(events, ["pending", "dispatched"], strict=True):
        record = EventRecord.objects.get(pk=event.id)
        assert (record.name, record.payload, record.headers, record.status) == (
            event.name,
            event.data,
            event.headers,
            status,
        )
        assert record.occurred_at == event.occurred_at
        assert (record.correlation_id, record.causation_id) == (
            event.correlation_id,
            event.causation_id,
        )
        assert record.dispatched_at is None


@pytest.mark.django_db
def test_the_record_insert_goes_through_django_execute_wrappers() -> None:
    from django.db import connection

    seen: list[str] = []

    def spy(execute, sql, params, many, context):  # what an APM agent or a query logger does
        seen.append(sql)
        return execute(sql, params, many, context)

    with wiring(SYNC), connection.execute_wrapper(spy), transaction.atomic():
        publish_many([("orders.placed", {"order_id": i, "total": i}) for i in range(3)])
    inserts = [sql for sql in seen if "django_events_eventrecord" in sql and "INSERT" in sql]
    assert len(inserts) == 1


@pytest.mark.django_db(transaction=True)
def test_a_broker_whose_client_library_is_missing_leaves_the_record_pending(
    without_module, caplog
) -> None:
    # redis:// without the redis package: kombu 5.7 fails with AttributeError, not
    # ImportError. publish() and the commit raise nothing; the record waits for the relay.
    without_module("redis")
    with wiring(ASYNC, CELERY_APP="tests.brokers.redis"), transaction.atomic():
        event = publish("orders.placed", PAYLOAD)
    assert EventRecord.objects.get(pk=event.id).status == "pending"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "transport 'redis' does not load" in errors[0], errors
