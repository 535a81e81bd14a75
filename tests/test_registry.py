"""The registry: every source merged, names checked, patterns attached, typed events."""

from __future__ import annotations

import datetime
import decimal
import importlib
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pydantic
import pytest
from django.apps import apps
from django.conf import settings
from django.test import override_settings

from django_events import InvalidPayload, UnknownEvent, event, publish
from django_events.models import EventRecord
from django_events.testing import events_eager
from django_events.wiring import typed
from django_events.wiring.compiled import Registry
from django_events.wiring.declarations import RetryPolicy
from django_events.wiring.registry import get_registry, reset_registry
from tests.app import typed_handlers
from tests.conftest import wiring

BASE = Path(settings.BASE_DIR) / "manifests" / "base.yaml"
RECORD = "tests.app.handlers.record"
OTHER = "tests.app.handlers.record_other"


def problems(registry: Registry, *ids: str) -> list[tuple[str, str, str]]:
    """(id, origin, message) of the registry's problems, optionally only these ids."""
    return [(p.id, str(p.origin), p.message) for p in registry.problems if not ids or p.id in ids]


def names(subscriptions: Any) -> list[str]:
    return [s.name for s in subscriptions]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def typed_events() -> Iterator[ModuleType]:
    """Declare the @event classes of tests/app/typed_events.py for one test only.

    Importing that module declares them for good, so every test that imports it (directly or
    through a manifest's ``type:``) uses this fixture.
    """
    before = typed.declared_event_types()
    module = importlib.import_module("tests.app.typed_events")
    for cls in (module.OrderPlaced, module.PaymentReceived):
        if cls not in typed.declared_event_types():  # imported by an earlier test
            typed._declared.append(cls)
    reset_registry()
    yield module
    typed._declared[:] = before
    reset_registry()


@pytest.fixture
def declare(monkeypatch: pytest.MonkeyPatch) -> None:
    """The @event classes a test declares are forgotten after it."""
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())


@dataclass(frozen=True)
class Parcel:
    """A nested dataclass of the typed events declared in tests (module level: type hints)."""

    weight: decimal.Decimal
    sent_on: datetime.date | None = None


@pytest.fixture
def received() -> Iterator[list[Any]]:
    typed_handlers.received.clear()
    yield typed_handlers.received
    typed_handlers.received.clear()


@pytest.fixture
def app_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An events.yaml at the root of the installed test app (found by AUTODISCOVER)."""
    monkeypatch.setattr(apps.get_app_config("testapp"), "path", str(tmp_path))
    return tmp_path / "events.yaml"


# -- merging the sources -----------------------------------------------------------------------


def test_base_settings_build_a_clean_registry() -> None:
    registry = get_registry()

    assert registry.problems == []
    assert sorted(registry.events) == ["orders.cancelled", "orders.placed", "orders.shipped"]
    assert registry.sources == [str(BASE)]
    assert registry.events["orders.placed"].declaration.redact == ("email",)
    assert registry.events["orders.cancelled"].records_all is False
    assert registry.events["orders.placed"].records_all is True


def test_manifests_settings_app_manifest_and_event_classes_merge(
    app_manifest: Path, typed_events: ModuleType
) -> None:
    write(
        app_manifest,
        """
        version: 1
        events:
          shop.reviewed:
            schema: {type: object, required: [stars]}
        subscriptions:
          - event: shop.reviewed
            handler: tests.app.handlers.record
            name: from-app
        """,
    )

    with wiring(
        {"event": "billing.invoiced", "handler": RECORD, "name": "from-settings"},
        {"event": "typed.order_placed", "handler": OTHER, "name": "typed-from-settings"},
        EVENTS={"billing.invoiced": {"description": "An invoice went out."}},
        AUTODISCOVER=True,
    ):
        registry = get_registry()

    assert problems(registry) == []
    assert registry.sources == [str(BASE), str(app_manifest)]
    assert set(registry.events) == {
        "orders.placed",
        "orders.shipped",
        "orders.cancelled",  # base.yaml
        "shop.reviewed",  # the app's events.yaml
        "billing.invoiced",  # settings
        "typed.order_placed",
        "typed.payment_received",  # @event classes
    }
    assert str(registry.events["shop.reviewed"].declaration.origin) == f"{app_manifest}:3"
    assert str(registry.events["billing.invoiced"].declaration.origin) == (
        "settings.DJANGO_EVENTS['EVENTS']['billing.invoiced']"
    )
    assert str(registry.events["typed.order_placed"].declaration.origin) == (
        "@event tests.app.typed_events.OrderPlaced"
    )
    assert registry.events["typed.order_placed"].type is typed_events.OrderPlaced
    assert registry.events["typed.payment_received"].declaration.durable is False
    assert set(registry.subscriptions) == {"from-app", "from-settings", "typed-from-settings"}
    assert names(registry.events["shop.reviewed"].sync) == ["from-app"]


def test_without_autodiscover_the_app_manifest_is_ignored(app_manifest: Path) -> None:
    write(app_manifest, "version: 1\nevents:\n  shop.reviewed: {}\n")

    with wiring(AUTODISCOVER=False):
        assert "shop.reviewed" not in get_registry().events
    with wiring(AUTODISCOVER=True):
        assert "shop.reviewed" in get_registry().events


def test_a_manifest_listed_and_autodiscovered_is_read_once(app_manifest: Path) -> None:
    write(app_manifest, "version: 1\nevents:\n  shop.reviewed: {}\n")

    with wiring(MANIFESTS=[BASE, app_manifest], AUTODISCOVER=True):
        registry = get_registry()

    assert registry.sources == [str(BASE), str(app_manifest)]
    assert problems(registry) == []


# -- duplicate names ---------------------------------------------------------------------------


def test_event_declared_in_a_manifest_and_in_settings_is_E106_naming_both() -> None:
    with wiring(EVENTS={"orders.placed": {"description": "again"}}):
        registry = get_registry()

    assert problems(registry) == [
        (
            "django_events.E106",
            "settings.DJANGO_EVENTS['EVENTS']['orders.placed']",
            f"Event 'orders.placed' is declared twice (also at {BASE}:3)",
        )
    ]
    # The first declaration stays: the manifest's schema still applies.
    assert registry.events["orders.placed"].declaration.redact == ("email",)


def test_event_declared_in_two_manifests_is_E106_naming_both_lines(tmp_path: Path) -> None:
    other = write(
        tmp_path / "other.yaml",
        """
        version: 1
        events:
          billing.invoiced: {}
          orders.shipped:
            description: shipped again
        """,
    )

    with wiring(MANIFESTS=[BASE, other]):
        registry = get_registry()

    assert problems(registry) == [
        (
            "django_events.E106",
            f"{other}:4",
            f"Event 'orders.shipped' is declared twice (also at {BASE}:20)",
        )
    ]


def test_event_class_with_a_manifest_name_is_E106(typed_events: ModuleType) -> None:
    with wiring(EVENTS={"typed.payment_received": {}}):
        registry = get_registry()

    assert problems(registry) == [
        (
            "django_events.E106",
            "@event tests.app.typed_events.PaymentReceived",
            "Event 'typed.payment_received' is declared twice "
            "(also at settings.DJANGO_EVENTS['EVENTS']['typed.payment_received'])",
        )
    ]


def test_subscription_name_used_twice_is_E107_naming_both(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "subs.yaml",
        """
        version: 1
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.record
            name: audit
        """,
    )

    with wiring(
        {"event": "orders.shipped", "handler": OTHER, "name": "audit"},
        MANIFESTS=[BASE, manifest],
    ):
        registry = get_registry()

    assert problems(registry) == [
        (
            "django_events.E107",
            "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
            f"Subscription 'audit' is declared twice (also at {manifest}:3)",
        )
    ]
    assert registry.subscriptions["audit"].declaration.event == "orders.placed"
    assert names(registry.events["orders.shipped"].sync) == []


def test_same_event_and_handler_twice_collide_on_the_default_name() -> None:
    with wiring(
        {"event": "orders.placed", "handler": RECORD},
        {"event": "orders.placed", "handler": RECORD, "mode": "inline"},
    ):
        registry = get_registry()

    assert problems(registry) == [
        (
            "django_events.E107",
            "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][1]",
            "Subscription 'orders.placed:tests.app.handlers.record' is declared twice "
            "(also at settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0])",
        )
    ]


# -- undeclared events and patterns ------------------------------------------------------------


def test_subscription_to_an_undeclared_event_is_E105() -> None:
    with wiring({"event": "orders.placd", "handler": RECORD, "name": "typo"}):
        registry = get_registry()

    assert problems(registry) == [
        (
            "django_events.E105",
            "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
            "Subscription 'typo' subscribes to an undeclared event: 'orders.placd'",
        )
    ]
    assert "typo" not in registry.subscriptions
    assert registry.problems[0].hint == (
        "Declare the event in a manifest, in settings or with @event."
    )


def test_pattern_that_matches_nothing_is_W101_and_not_an_error() -> None:
    with wiring({"event": "billing.*", "handler": RECORD, "name": "billing-audit"}):
        registry = get_registry()

    assert problems(registry) == [
        (
            "django_events.W101",
            "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
            "Subscription 'billing-audit' pattern matches no declared event: 'billing.*'",
        )
    ]
    assert not registry.problems[0].is_error
    assert "billing-audit" in registry.subscriptions
    assert all(not e.sync for e in registry.events.values())


def test_wildcards_attach_to_the_matching_events_by_mode() -> None:
    with wiring(
        {"event": "orders.*", "handler": RECORD, "name": "orders-sync"},
        {"event": "*", "handler": OTHER, "name": "everything", "mode": "async"},
        {"event": "orders.p*", "handler": RECORD, "name": "p-inline", "mode": "inline"},
        {"event": "orders.shipped", "handler": OTHER, "name": "shipped-only"},
        EVENTS={"billing.invoiced": {}, "ordersXplaced": {}},
    ):
        registry = get_registry()

    assert problems(registry) == []
    events = registry.events
    assert names(events["orders.placed"].sync) == ["orders-sync"]
    assert names(events["orders.placed"].inline) == ["p-inline"]
    assert names(events["orders.shipped"].sync) == ["orders-sync", "shipped-only"]
    assert names(events["orders.cancelled"].sync) == ["orders-sync"]
    assert names(events["billing.invoiced"].sync) == []
    assert names(events["ordersXplaced"].sync) == []  # the dot is literal, not "any character"
    for name in (
        "orders.placed",
        "orders.shipped",
        "orders.cancelled",
        "billing.invoiced",
        "ordersXplaced",
    ):
        assert names(events[name].async_) == ["everything"]
    # One subscription object, shared by every event it matches.
    assert events["orders.placed"].async_[0] is events["billing.invoiced"].async_[0]


def test_default_subscription_name_is_event_and_handler() -> None:
    with wiring({"event": "orders.*", "handler": RECORD}):
        registry = get_registry()

    assert list(registry.subscriptions) == ["orders.*:tests.app.handlers.record"]


# -- retry policies and queues -----------------------------------------------------------------


def test_retry_policy_merges_subscription_retry_over_default_retry() -> None:
    with wiring(
        {"event": "orders.placed", "handler": RECORD, "mode": "async", "name": "default"},
        {
            "event": "orders.placed",
            "handler": OTHER,
            "mode": "async",
            "name": "custom",
            "retry": {"max_attempts": 7, "backoff": 0.5},
        },
        DEFAULT_RETRY={"max_backoff": 60, "jitter": False},
    ):
        subscriptions = get_registry().subscriptions

    assert subscriptions["default"].retry == RetryPolicy(
        max_attempts=3, backoff=2, max_backoff=60, jitter=False
    )
    assert subscriptions["custom"].retry == RetryPolicy(
        max_attempts=7, backoff=0.5, max_backoff=60, jitter=False
    )


def test_retry_policy_without_default_retry_uses_the_documented_default() -> None:
    value = {k: v for k, v in settings.DJANGO_EVENTS.items() if k != "DEFAULT_RETRY"}
    value["SUBSCRIPTIONS"] = [
        {
            "event": "orders.placed",
            "handler": RECORD,
            "mode": "async",
            "name": "a",
            "retry": {"jitter": False},
        }
    ]
    with override_settings(DJANGO_EVENTS=value):
        retry = get_registry().subscriptions["a"].retry

    assert retry == RetryPolicy(max_attempts=3, backoff=2, max_backoff=300, jitter=False)
    assert [retry.delay(n) for n in (1, 2, 3, 8, 9, 20)] == [2, 4, 8, 256, 300, 300]


def test_retry_policy_with_jitter_spreads_each_delay_over_its_upper_half() -> None:
    """The default (``jitter: true``): retries of many events do not all come at once."""
    value = {k: v for k, v in settings.DJANGO_EVENTS.items() if k != "DEFAULT_RETRY"}
    value["SUBSCRIPTIONS"] = [{"event": "orders.placed", "handler": RECORD, "mode": "async"}]
    with override_settings(DJANGO_EVENTS=value):
        [subscription] = get_registry().subscriptions.values()

    retry = subscription.retry
    assert retry.jitter is True
    for number, base in ((1, 2), (3, 8), (20, 300)):
        delays = [retry.delay(number) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays), (number, delays)
        assert len(set(delays)) > 1


def test_queues_are_those_of_async_subscriptions_sorted_once_each() -> None:
    with wiring(
        {
            "event": "orders.placed",
            "handler": RECORD,
            "mode": "async",
            "queue": "billing",
            "name": "a",
        },
        {
            "event": "orders.shipped",
            "handler": RECORD,
            "mode": "async",
            "queue": "billing",
            "name": "b",
        },
        {"event": "orders.*", "handler": OTHER, "mode": "async", "name": "c"},
        {
            "event": "orders.placed",
            "handler": OTHER,
            "mode": "async",
            "queue": "alerts",
            "name": "d",
        },
        {"event": "orders.placed", "handler": RECORD, "mode": "sync", "name": "e"},
        DEFAULT_QUEUE="events-default",
    ):
        registry = get_registry()

        assert registry.queues() == ["alerts", "billing", "events-default"]
        assert registry.subscriptions["c"].queue == "events-default"
        assert registry.subscriptions["e"].queue == "events-default"  # unused: sync


def test_no_async_subscription_means_no_queue() -> None:
    with wiring({"event": "orders.placed", "handler": RECORD}):
        assert get_registry().queues() == []


# -- rebuilding --------------------------------------------------------------------------------


def test_the_registry_is_built_once_and_rebuilt_after_reset() -> None:
    first = get_registry()

    assert get_registry() is first
    reset_registry()
    second = get_registry()
    assert second is not first
    assert set(second.events) == set(first.events)


def test_override_settings_rebuilds_the_registry_and_restores_it() -> None:
    before = get_registry()
    assert "billing.invoiced" not in before.events

    with wiring({"event": "billing.invoiced", "handler": RECORD}, EVENTS={"billing.invoiced": {}}):
        inside = get_registry()
        assert inside is not before
        assert "billing.invoiced" in inside.events
        assert names(inside.events["billing.invoiced"].sync) == [
            "billing.invoiced:tests.app.handlers.record"
        ]

    after = get_registry()
    assert "billing.invoiced" not in after.events
    assert after.subscriptions == {}


def test_a_changed_manifest_is_read_again_after_reset(tmp_path: Path) -> None:
    manifest = write(tmp_path / "events.yaml", "version: 1\nevents:\n  a.one: {}\n")
    with wiring(MANIFESTS=[manifest]):
        assert list(get_registry().events) == ["a.one"]
        write(manifest, "version: 1\nevents:\n  a.two: {}\n")
        assert list(get_registry().events) == ["a.one"]  # cached until reset
        reset_registry()
        assert list(get_registry().events) == ["a.two"]


# -- typed events ------------------------------------------------------------------------------


def test_event_class_schema_is_derived_from_the_type(typed_events: ModuleType) -> None:
    registry = get_registry()

    schema = registry.events["typed.order_placed"].declaration.schema
    assert schema == {
        "type": "object",
        "properties": {
            "order_id": {"type": "integer"},
            "total": {"type": "number"},
            "placed_at": {"type": "string", "format": "date-time"},
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer"}},
                    "required": ["sku"],
                },
            },
            "coupon": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["order_id", "total", "placed_at"],
    }
    description = registry.events["typed.order_placed"].declaration.description
    assert description == "A typed order."
    pydantic_decl = registry.events["typed.payment_received"].declaration
    assert pydantic_decl.description == "Money arrived (pydantic)."
    assert pydantic_decl.schema is not None and pydantic_decl.schema is not True
    assert pydantic_decl.schema["required"] == ["payment_id", "amount"]


def test_manifest_type_path_gives_a_typed_event(tmp_path: Path, typed_events: ModuleType) -> None:
    manifest = write(
        tmp_path / "events.yaml",
        """
        version: 1
        events:
          shipping.shipped:
            type: tests.app.typed_events.Shipment
          shipping.broken:
            type: tests.app.typed_events.NoSuchClass
          shipping.not_a_model:
            type: tests.app.handlers.record
        """,
    )

    with wiring(MANIFESTS=[manifest]):
        registry = get_registry()

    Shipment = typed_events.Shipment

    assert registry.events["shipping.shipped"].type is Shipment
    assert registry.events["shipping.shipped"].declaration.schema == typed.schema_for(Shipment)
    assert [(i, o) for i, o, _ in problems(registry)] == [
        ("django_events.E109", f"{manifest}:5"),
        ("django_events.E109", f"{manifest}:7"),
    ]
    assert problems(registry)[0][2].startswith(
        "Event 'shipping.broken': type 'tests.app.typed_events.NoSuchClass' is unusable: "
    )


@pytest.mark.django_db
def test_publishing_a_dataclass_instance_gives_handlers_the_instance(
    typed_events: ModuleType, received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    OrderPlaced, Line = typed_events.OrderPlaced, typed_events.Line
    order = OrderPlaced(
        order_id=4,
        total=19.5,
        placed_at=datetime.datetime(2024, 5, 1, 9, 30, tzinfo=datetime.UTC),
        lines=[Line("A-1", 2)],
    )

    with wiring({"event": "typed.order_placed", "handler": "tests.app.typed_handlers.keep"}):
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            event = publish(order)
            assert received == []  # sync: after commit

        assert len(callbacks) == 1
        [got] = received
        assert got.id == event.id
        assert got.name == "typed.order_placed"
        assert got.payload == order
        assert isinstance(got.payload, OrderPlaced)
        assert got.data == {
            "order_id": 4,
            "total": 19.5,
            "placed_at": "2024-05-01T09:30:00+00:00",
            "lines": [{"sku": "A-1", "quantity": 2}],
            "coupon": None,
        }
        assert EventRecord.objects.get(pk=event.id).payload == got.data


@pytest.mark.django_db
def test_publishing_a_pydantic_instance_gives_handlers_the_instance(
    typed_events: ModuleType,
    received: list[Any],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payment = typed_events.PaymentReceived(
        payment_id=uuid.UUID(int=9), amount=decimal.Decimal("12.30")
    )

    monkeypatch.setattr(typed_handlers.KeepingHandler, "instances", 0)

    with (
        wiring(
            {
                "event": "typed.payment_received",
                "handler": "tests.app.typed_handlers.KeepingHandler",
            }
        ),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish(payment)
        publish(payment)

    assert [e.payload for e in received] == [payment, payment]
    assert all(isinstance(e.payload, typed_events.PaymentReceived) for e in received)
    assert received[0].data == {
        "payment_id": "00000000-0000-0000-0000-000000000009",
        "amount": "12.30",
        "currency": "EUR",
    }
    assert typed_handlers.KeepingHandler.instances == 1  # once per process, not per event


@pytest.mark.django_db
def test_publishing_a_typed_event_by_name_builds_the_instance(
    typed_events: ModuleType, received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    data = {
        "order_id": 5,
        "total": 3,
        "placed_at": "2024-05-01T09:30:00+00:00",
        "lines": [{"sku": "B-2"}],
    }

    with (
        wiring({"event": "typed.order_placed", "handler": "tests.app.typed_handlers.keep"}),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish("typed.order_placed", data)

    [got] = received
    assert got.payload == typed_events.OrderPlaced(
        order_id=5,
        total=3,
        placed_at=datetime.datetime(2024, 5, 1, 9, 30, tzinfo=datetime.UTC),
        lines=[typed_events.Line("B-2", 1)],
    )
    assert isinstance(got.payload.placed_at, datetime.datetime)


@pytest.mark.django_db
def test_typed_events_are_validated_like_any_other(
    typed_events: ModuleType, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks() as callbacks:
        with pytest.raises(InvalidPayload) as excinfo:
            publish("typed.order_placed", {"order_id": "5", "total": 3})
        with pytest.raises(UnknownEvent):
            publish(typed_events.Shipment(1, "ups", datetime.date(2024, 1, 1)))
        with pytest.raises(InvalidPayload) as wrong_type:
            publish(
                "typed.order_placed",
                typed_events.PaymentReceived(
                    payment_id=uuid.UUID(int=1), amount=decimal.Decimal(1)
                ),
            )

    assert str(excinfo.value) == (
        "Invalid payload for event 'typed.order_placed': "
        "$: 'placed_at' is a required property; $.order_id: '5' is not of type 'integer'"
    )
    assert str(wrong_type.value) == (
        "Invalid payload for event 'typed.order_placed': "
        "$: expected a dict or OrderPlaced, got PaymentReceived"
    )
    assert callbacks == []
    assert not EventRecord.objects.exists()


@pytest.mark.django_db
def test_manifest_typed_event_round_trips_rich_fields(
    tmp_path: Path,
    typed_events: ModuleType,
    received: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    Shipment = typed_events.Shipment
    manifest = write(
        tmp_path / "events.yaml",
        """
        version: 1
        events:
          shipping.shipped:
            type: tests.app.typed_events.Shipment
        subscriptions:
          - event: shipping.shipped
            handler: tests.app.typed_handlers.keep
        """,
    )
    tracking = uuid.UUID(int=77)
    shipment = Shipment(8, "ups", datetime.date(2024, 1, 2), ("p1", "p2"), {"p1": tracking})

    with (
        wiring(MANIFESTS=[manifest]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish("shipping.shipped", shipment)
        publish(
            "shipping.shipped",
            {
                "order_id": 8,
                "carrier": "ups",
                "shipped_on": "2024-01-02",
                "parcels": ["p1", "p2"],
                "tracking": {"p1": str(tracking)},
            },
        )

    assert [e.payload for e in received] == [shipment, shipment]
    assert (
        received[0].data
        == received[1].data
        == {
            "order_id": 8,
            "carrier": "ups",
            "shipped_on": "2024-01-02",
            "parcels": ["p1", "p2"],
            "tracking": {"p1": "00000000-0000-0000-0000-00000000004d"},
        }
    )


def test_event_refuses_a_bad_name_and_a_class_it_cannot_describe(declare: None) -> None:
    class Plain:
        order_id: int

    @dataclass
    class WithBytes:
        blob: bytes

    with pytest.raises(ValueError, match=r"^Event name 'orders placed' must match"):
        event("orders placed")
    with pytest.raises(TypeError, match=r"^@event\('o.plain'\) needs a dataclass or a pydantic"):
        event("o.plain")(Plain)
    with pytest.raises(TypeError, match=r"^Cannot derive a JSON Schema for <class 'bytes'>; use"):
        event("o.bytes")(WithBytes)

    assert typed.declared_event_types() == []
    assert not {"o.plain", "o.bytes"} & set(get_registry().events)


@pytest.mark.django_db
def test_typed_event_with_fixed_tuples_literals_and_optional_dataclasses(
    declare: None, received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    @event("typed.parcel_sent")
    @dataclass
    class ParcelSent:
        size: tuple[int, int]
        speed: Literal["slow", "fast"]
        parcel: Parcel | None = None
        notes: Any = None

    schema = get_registry().events["typed.parcel_sent"].declaration.schema
    assert isinstance(schema, dict)
    assert schema["required"] == ["size", "speed"]
    assert schema["properties"]["size"] == {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "integer"}],
        "items": False,
        "minItems": 2,
    }
    assert schema["properties"]["speed"] == {"enum": ["slow", "fast"]}

    data = {
        "size": [20, 30],
        "speed": "fast",
        "parcel": {"weight": "1.5", "sent_on": "2024-01-02"},
        "notes": ["fragile", 1],
    }
    with (
        wiring({"event": "typed.parcel_sent", "handler": "tests.app.typed_handlers.keep"}),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish("typed.parcel_sent", data)
        publish("typed.parcel_sent", {"size": [1, 2], "speed": "slow", "parcel": None})
        with pytest.raises(InvalidPayload) as too_long:
            publish("typed.parcel_sent", {"size": [1, 2, 3], "speed": "slow"})
        with pytest.raises(InvalidPayload) as unknown_speed:
            publish("typed.parcel_sent", {"size": [1, 2], "speed": "warp"})

    assert [e.payload for e in received] == [
        ParcelSent(
            (20, 30),
            "fast",
            Parcel(decimal.Decimal("1.5"), datetime.date(2024, 1, 2)),
            ["fragile", 1],
        ),
        ParcelSent((1, 2), "slow"),
    ]
    assert isinstance(received[0].payload.size, tuple)
    assert received[0].data == data  # stored and sent as published
    assert str(too_long.value) == (
        "Invalid payload for event 'typed.parcel_sent': "
        "$.size: Expected at most 2 items but found 1 extra: 3"
    )
    assert str(unknown_speed.value) == (
        "Invalid payload for event 'typed.parcel_sent': "
        "$.speed: 'warp' is not one of ['slow', 'fast']"
    )


@pytest.mark.django_db
def test_typed_event_with_a_time_field(
    declare: None, received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    @event("typed.opened")
    @dataclass
    class Opened:
        opens_at: datetime.time

    schema = get_registry().events["typed.opened"].declaration.schema
    assert isinstance(schema, dict)
    assert schema["properties"]["opens_at"] == {"type": "string", "format": "time"}
    with (
        wiring({"event": "typed.opened", "handler": "tests.app.typed_handlers.keep"}),
        django_capture_on_commit_callbacks(execute=True),
    ):
        published = publish(Opened(datetime.time(9, 30)))
        publish("typed.opened", {"opens_at": "18:00:00"})

    assert published.data == {"opens_at": "09:30:00"}
    assert [e.payload for e in received] == [
        Opened(datetime.time(9, 30)),
        Opened(datetime.time(18, 0)),
    ]


@pytest.mark.django_db
def test_typed_event_without_required_fields_publishes_an_empty_payload(
    declare: None, received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    @event("typed.pinged")
    @dataclass
    class Pinged:
        note: str = ""

    assert get_registry().events["typed.pinged"].declaration.schema == {
        "type": "object",
        "properties": {"note": {"type": "string"}},
    }
    with (
        wiring({"event": "typed.pinged", "handler": "tests.app.typed_handlers.keep"}),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish("typed.pinged")

    assert [e.payload for e in received] == [Pinged()]


@pytest.mark.django_db
def test_a_typed_string_field_that_does_not_parse_is_refused(
    declare: None, received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    """The derived schema says "a string" (formats are not asserted): publish() parses it."""

    @event("typed.weighed")
    @dataclass
    class Weighed:
        parcel: Parcel

    with (
        wiring({"event": "typed.weighed", "handler": "tests.app.typed_handlers.keep"}),
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(InvalidPayload) as excinfo,
    ):
        publish("typed.weighed", {"parcel": {"weight": "heavy", "sent_on": "2024-02-30"}})

    assert [str(p) for p in excinfo.value.problems] == [
        "$.parcel.weight: 'heavy' is not a decimal number",
        "$.parcel.sent_on: '2024-02-30' is not an ISO 8601 date (YYYY-MM-DD)",
    ]
    assert received == []


@pytest.mark.django_db
def test_publishing_a_pydantic_event_by_name_gives_handlers_the_model(
    typed_events: ModuleType, received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    with (
        wiring({"event": "typed.payment_received", "handler": "tests.app.typed_handlers.keep"}),
        django_capture_on_commit_callbacks(execute=True),
    ):
        publish("typed.payment_received", {"payment_id": str(uuid.UUID(int=3)), "amount": "2.5"})

    [got] = received
    assert got.payload == typed_events.PaymentReceived(
        payment_id=uuid.UUID(int=3), amount=decimal.Decimal("2.5")
    )
    assert got.payload.currency == "EUR"


@dataclass
class Tallied:
    """A dataclass event with a field the class sets itself and integer dict keys."""

    counts: dict[int, str]
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = len(self.counts)


class Stamped(pydantic.BaseModel):
    """Strict, with a datetime; a validator; a computed field."""

    model_config = pydantic.ConfigDict(strict=True)

    n: int
    at: datetime.datetime

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def day(self) -> str:
        return self.at.date().isoformat()

    @pydantic.field_validator("n")
    @classmethod
    def positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value


class Coupon(pydantic.BaseModel):
    """An aliased field with a default: its JSON form holds the field's name."""

    coupon_code: str | None = pydantic.Field(None, alias="couponCode")


@pytest.mark.django_db(transaction=True)
def test_typed_events_the_class_accepts_reach_handlers_through_the_worker_path(
    declare: None, received: list[Any]
) -> None:
    """A strict model's datetime, a computed field, an aliased field (read back by name, not
    left at its default), a dataclass field with init=False and integer dict keys."""
    event("typed.tallied")(Tallied)
    event("typed.stamped")(Stamped)
    event("typed.coupon")(Coupon)
    keep = {"handler": "tests.app.typed_handlers.keep", "mode": "async"}
    tallied = Tallied({1: "a", 2: "b"})
    stamped = Stamped(n=7, at=datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC))
    coupon = Coupon(couponCode="SAVE")
    names = ("typed.tallied", "typed.stamped", "typed.coupon")
    with wiring(*({**keep, "event": name} for name in names)), events_eager():
        published = [publish(tallied), publish(stamped), publish(coupon)]

    assert [e.payload for e in received] == [tallied, stamped, coupon]
    assert published[0].data == {"counts": {"1": "a", "2": "b"}, "total": 2}
    assert published[1].data == {"n": 7, "at": "2026-01-02T03:04:00Z", "day": "2026-01-02"}
    assert published[2].data == {"coupon_code": "SAVE"}


@pytest.mark.django_db
def test_data_a_typed_events_class_refuses_is_an_invalid_payload(declare: None) -> None:
    event("typed.stamped")(Stamped)
    with wiring(), pytest.raises(InvalidPayload) as refused:
        publish("typed.stamped", {"n": 0, "at": "2026-01-02T03:04:00Z"})
    assert [(p.path, p.message) for p in refused.value.problems] == [
        ("$.n", "Value error, must be positive")
    ]
    assert not EventRecord.objects.exists()


def test_delivery_tasks_is_the_default_that_via_celery_overrides() -> None:
    from django_events.wiring.registry import get_registry
    from tests.conftest import wiring

    base = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "async"}
    subscriptions = [
        {**base, "name": "by-default"},
        {**base, "name": "on-celery", "via": "celery"},
        {**base, "name": "on-tasks", "via": "tasks"},
    ]
    for delivery, by_default in (("tasks", "tasks"), ("celery", "celery")):
        with wiring(*subscriptions, DELIVERY=delivery):
            via = {n: s.via for n, s in get_registry().subscriptions.items()}
        assert via == {"by-default": by_default, "on-celery": "celery", "on-tasks": "tasks"}
