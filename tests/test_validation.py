"""Payload validation: verdicts, JSON paths of errors, the fast path, and non-JSON values."""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

import jsonschema
import jsonschema_rs
import pytest
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from pydantic.dataclasses import dataclass as pydantic_dataclass

from django_events import InvalidPayload, event, publish, publish_many
from django_events.exceptions import PayloadProblem
from django_events.models import EventRecord
from django_events.testing import events_eager
from django_events.wiring import typed
from django_events.wiring import validation as validation_module
from django_events.wiring.validation import PayloadValidator, json_problems
from tests.app import typed_handlers
from tests.conftest import wiring

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "total"],
    "properties": {
        "order_id": {"type": "integer"},
        "total": {"type": "number", "minimum": 0},
        "email": {"type": "string"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["sku"],
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            },
        },
    },
}


@pytest.fixture(params=["fast", "reference-only"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with jsonschema-rs answering "valid?" and again as if it were not installed."""
    enabled = request.param == "fast"
    if not enabled:
        monkeypatch.setattr(validation_module, "HAS_FAST", False)
    return enabled


def validator(schema: dict[str, Any] | bool, fast: bool) -> PayloadValidator:
    compiled = PayloadValidator(schema)
    assert (compiled._fast is not None) is fast  # the path under test is the one in use
    return compiled


def paths(problems: list[PayloadProblem]) -> list[str]:
    return [p.path for p in problems]


# -- verdicts and error paths ------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"order_id": 1, "total": 0},
        {"order_id": 1, "total": 9.99, "email": "a@example.com"},
        {"order_id": 1, "total": 1, "items": []},
        {"order_id": 1, "total": 1, "items": [{"sku": "A"}, {"sku": "B", "qty": 2}]},
        {"order_id": 1.0, "total": 1},  # 2020-12: an integer is a number with no fraction
        {"order_id": 1, "total": 1, "unknown": {"nested": [1, None]}},
        {"order_id": 10**30, "total": 10**30},
        {"order_id": 1, "total": 1, "items": ({"sku": "A"},)},  # a tuple is sent as an array
    ],
)
def test_valid_payloads_have_no_problems(fast: bool, payload: dict[str, Any]) -> None:
    assert validator(ORDER_SCHEMA, fast).problems(payload) == []


def test_every_error_is_reported_with_its_json_path(fast: bool) -> None:
    payload = {
        "order_id": "1",
        "total": -2,
        "email": None,
        "items": [{"sku": 1}, {"qty": 1}, {"sku": "C", "qty": "two"}],
    }

    problems = validator(ORDER_SCHEMA, fast).problems(payload)

    assert problems == [
        PayloadProblem("$.email", "None is not of type 'string'"),
        PayloadProblem("$.items[0].sku", "1 is not of type 'string'"),
        PayloadProblem("$.items[1]", "'sku' is a required property"),
        PayloadProblem("$.items[2].qty", "'two' is not of type 'integer'"),
        PayloadProblem("$.order_id", "'1' is not of type 'integer'"),
        PayloadProblem("$.total", "-2 is less than the minimum of 0"),
    ]
    assert str(problems[1]) == "$.items[0].sku: 1 is not of type 'string'"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {},
            [
                PayloadProblem("$", "'order_id' is a required property"),
                PayloadProblem("$", "'total' is a required property"),
            ],
        ),
        ([], [PayloadProblem("$", "[] is not of type 'object'")]),
        ("order", [PayloadProblem("$", "'order' is not of type 'object'")]),
        (
            {"order_id": True, "total": 1},
            [PayloadProblem("$.order_id", "True is not of type 'integer'")],
        ),
        (
            {"order_id": 1, "total": False},
            [PayloadProblem("$.total", "False is not of type 'number'")],
        ),
        (
            {"order_id": 1.5, "total": 1},
            [PayloadProblem("$.order_id", "1.5 is not of type 'integer'")],
        ),
        (
            {"order_id": 1, "total": 1, "items": {"sku": "A"}},
            [PayloadProblem("$.items", "{'sku': 'A'} is not of type 'array'")],
        ),
    ],
)
def test_invalid_payloads(fast: bool, payload: Any, expected: list[PayloadProblem]) -> None:
    assert validator(ORDER_SCHEMA, fast).problems(payload) == expected


@pytest.mark.parametrize("format_", ["date-time", "date", "time", "uuid", "email", "uri"])
def test_format_is_an_annotation_that_validation_does_not_assert(fast: bool, format_: str) -> None:
    """JSON Schema 2020-12's default, kept: asserting it would refuse payloads published today."""
    compiled = validator(
        {"type": "object", "properties": {"at": {"type": "string", "format": format_}}}, fast
    )

    assert compiled.problems({"at": "not that at all"}) == []
    assert paths(compiled.problems({"at": 5})) == ["$.at"]  # its type is checked


def test_keys_that_are_not_identifiers_are_quoted_in_paths(fast: bool) -> None:
    schema = {
        "type": "object",
        "properties": {"headers": {"type": "object", "additionalProperties": {"type": "string"}}},
    }

    problems = validator(schema, fast).problems({"headers": {"content-type": 1, "ok": "x"}})

    assert problems == [PayloadProblem("$.headers['content-type']", "1 is not of type 'string'")]


def test_values_the_fast_validator_cannot_read_are_reported_not_raised(fast: bool) -> None:
    when = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)

    problems = validator(ORDER_SCHEMA, fast).problems({"order_id": 1, "total": 1, "email": when})

    assert problems == [PayloadProblem("$.email", f"{when!r} is not of type 'string'")]
    # Not constrained by the schema: valid for the schema, json_problems() refuses it.
    assert validator(ORDER_SCHEMA, fast).problems({"order_id": 1, "total": 1, "at": when}) == []


def test_boolean_schemas(fast: bool) -> None:
    assert validator(True, fast).problems({"anything": 1}) == []
    assert validator(False, fast).problems({}) == [
        PayloadProblem("$", "False schema does not allow {}")
    ]


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "objekt"}, "'objekt' is not valid under any of the given schemas"),
        ({"type": "object", "required": "order_id"}, "'order_id' is not of type 'array'"),
        ({"properties": {"total": {"minimum": "0"}}}, "'0' is not of type 'number'"),
    ],
)
def test_an_invalid_schema_is_refused_when_compiled(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(jsonschema.SchemaError) as excinfo:
        PayloadValidator(schema)

    assert excinfo.value.message == message


# -- the fast path agrees with the reference ---------------------------------------------------

# A typical payload schema: four fields, two required, bounds, an enum and a string array.
TYPICAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "total"],
    "additionalProperties": False,
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "total": {"type": "number", "minimum": 0, "exclusiveMaximum": 1_000_000},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 8},
            "maxItems": 3,
            "uniqueItems": True,
        },
    },
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
# Near-valid values, so that valid payloads are generated as often as invalid ones.
FIELDS = {
    "order_id": st.integers(-2, 2**70) | st.floats(-2, 1e20, allow_nan=False) | json_values,
    "total": st.integers(-5, 2_000_000) | st.floats(-5, 2e6, allow_nan=False) | json_values,
    "currency": st.sampled_from(["EUR", "USD", "GBP", "eur", "EURO", ""]) | json_values,
    "tags": st.lists(st.text(max_size=9), max_size=4) | json_values,
}
payloads = st.one_of(
    st.fixed_dictionaries(
        {"order_id": FIELDS["order_id"], "total": FIELDS["total"]},
        optional={"currency": FIELDS["currency"], "tags": FIELDS["tags"]},
    ),
    st.fixed_dictionaries({}, optional={**FIELDS, "extra": json_values}),
    json_values,
)
REFERENCE = jsonschema.Draft202012Validator(TYPICAL_SCHEMA)
FAST = jsonschema_rs.validator_for(TYPICAL_SCHEMA)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_fast_and_reference_validators_agree(payload: Any) -> None:
    assert FAST.is_valid(payload) is REFERENCE.is_valid(payload)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_payload_validator_verdict_is_the_reference_verdict(payload: Any) -> None:
    compiled = PayloadValidator(TYPICAL_SCHEMA)
    assert compiled._fast is not None

    assert (compiled.problems(payload) == []) is REFERENCE.is_valid(payload)


@pytest.mark.parametrize("verdict", [True, False])
def test_the_generated_payloads_cover_both_verdicts(verdict: bool) -> None:
    # Guards the strategy above: a generator of only invalid payloads would prove nothing.
    # find() searches until it meets one and raises NoSuchExample if it never does (200
    # random draws missed a valid payload now and then).
    found = find(
        payloads,
        lambda p: REFERENCE.is_valid(p) is verdict,
        settings=settings(max_examples=5000, database=None),
    )
    assert REFERENCE.is_valid(found) is verdict


# -- values that are not JSON ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"total": decimal.Decimal("1.50")},
            [PayloadProblem("$.total", "Decimal Decimal('1.50') is not JSON-serializable")],
        ),
        (
            {"at": datetime.datetime(2024, 5, 1, 12, 0)},
            [
                PayloadProblem(
                    "$.at", "datetime datetime.datetime(2024, 5, 1, 12, 0) is not JSON-serializable"
                )
            ],
        ),
        (
            {"on": datetime.date(2024, 5, 1)},
            [PayloadProblem("$.on", "date datetime.date(2024, 5, 1) is not JSON-serializable")],
        ),
        (
            {"id": uuid.UUID(int=1)},
            [
                PayloadProblem(
                    "$.id",
                    "UUID UUID('00000000-0000-0000-0000-000000000001') is not JSON-serializable",
                )
            ],
        ),
        ({"total": math.nan}, [PayloadProblem("$.total", "nan is not a JSON number")]),
        ({"total": math.inf}, [PayloadProblem("$.total", "inf is not a JSON number")]),
        (
            {"items": [{"qty": 1}, {"qty": -math.inf}]},
            [PayloadProblem("$.items[1].qty", "-inf is not a JSON number")],
        ),
        ({"tags": {"a"}}, [PayloadProblem("$.tags", "set {'a'} is not JSON-serializable")]),
        ({"raw": b"\x00"}, [PayloadProblem("$.raw", "bytes b'\\x00' is not JSON-serializable")]),
        ({"by_id": {1: "x"}}, [PayloadProblem("$.by_id", "key 1 is not a string")]),
        (
            {"meta": {"content-type": object}},
            [
                PayloadProblem(
                    "$.meta['content-type']", "type <class 'object'> is not JSON-serializable"
                )
            ],
        ),
        (
            {"a": decimal.Decimal(1), "b": [math.nan]},
            [
                PayloadProblem("$.a", "Decimal Decimal('1') is not JSON-serializable"),
                PayloadProblem("$.b[0]", "nan is not a JSON number"),
            ],
        ),
    ],
)
def test_json_problems_name_each_non_json_value(
    payload: dict[str, Any], expected: list[PayloadProblem]
) -> None:
    assert json_problems(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"a": None, "b": True, "c": 1, "d": 1.5, "e": "x", "f": [1, [2]], "g": {"h": {}}},
        {"t": (1, 2)},  # a tuple is an array
        {"big": 10**40, "tiny": 5e-324},
    ],
)
def test_json_problems_accepts_json(payload: dict[str, Any]) -> None:
    assert json_problems(payload) == []


def test_json_problems_detects_a_cycle_instead_of_recursing_forever() -> None:
    payload: dict[str, Any] = {"items": []}
    payload["items"].append(payload)

    assert json_problems(payload) == [PayloadProblem("$.items[0]", "circular reference")]


def test_the_same_value_twice_is_not_a_cycle() -> None:
    shared = {"sku": "A"}

    assert json_problems({"first": shared, "second": [shared, shared]}) == []


# -- through publish() -------------------------------------------------------------------------


def _nested(levels: int) -> Any:
    """``levels`` lists, one in another (``[[...[1]...]]``)."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"order_id": "7", "total": 1, "items": [{"sku": 3}]},
            "Invalid payload for event 'orders.placed': $.items[0].sku: 3 is not of type 'string'; "
            "$.order_id: '7' is not of type 'integer'",
        ),
        (
            {"order_id": 7, "total": decimal.Decimal("9.90")},
            "Invalid payload for event 'orders.placed': "
            "$.total: Decimal Decimal('9.90') is not JSON-serializable",
        ),
        (
            {"order_id": 7, "total": math.nan},
            "Invalid payload for event 'orders.placed': $.total: nan is not a JSON number",
        ),
        (
            {"order_id": 7, "total": 1, "at": datetime.date(2024, 1, 1)},
            "Invalid payload for event 'orders.placed': "
            "$.at: date datetime.date(2024, 1, 1) is not JSON-serializable",
        ),
        (
            {"order_id": 7, "total": 1, "email": datetime.date(2024, 1, 1)},
            "Invalid payload for event 'orders.placed': "
            "$.email: '•••' is not of type 'string'",  # redact: [email]
        ),
        (
            ["order_id", 7],
            "Invalid payload for event 'orders.placed': $: expected a dict, got list",
        ),
        (
            {"order_id": 7, "total": 1, "email": "a\x00b"},
            "Invalid payload for event 'orders.placed': "
            "$.email: NUL (\\u0000) or a lone surrogate in a string",
        ),
        (
            {"order_id": 7, "total": 1, "items": [{"sku": "\udc80"}]},
            "Invalid payload for event 'orders.placed': "
            "$.items[0].sku: NUL (\\u0000) or a lone surrogate in a string",
        ),
        (
            {"order_id": 7, "total": 1, "note\ud800": 1},
            "Invalid payload for event 'orders.placed': "
            "$: a key holds NUL (\\u0000) or a lone surrogate in a string",
        ),
        (
            {"order_id": 7, "total": 1, "deep": _nested(64)},
            "Invalid payload for event 'orders.placed': "
            f"$.deep{'[0]' * 63}: nested deeper than 64 levels",
        ),
        (
            {"order_id": 7, "total": 1, "deep": _nested(5000)},
            "Invalid payload for event 'orders.placed': "
            f"$.deep{'[0]' * 63}: nested deeper than 64 levels",
        ),
    ],
)
def test_publish_refuses_invalid_payloads_and_records_nothing(
    django_capture_on_commit_callbacks: Any, payload: Any, message: str
) -> None:
    with (
        django_capture_on_commit_callbacks() as callbacks,
        pytest.raises(InvalidPayload) as excinfo,
    ):
        publish("orders.placed", payload)

    assert str(excinfo.value) == message
    assert excinfo.value.name == "orders.placed"
    assert all(p.path.startswith("$") for p in excinfo.value.problems)
    assert callbacks == []
    assert not EventRecord.objects.exists()


_FLAT_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.sampled_from([decimal.Decimal(1), b"x", uuid.UUID(int=2)]),
)


def _storable(text: str) -> bool:
    return "\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text)


@given(st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), _FLAT_VALUES, max_size=6))
@settings(max_examples=300)
def test_flat_payloads_get_the_verdict_json_would_give(payload: dict[Any, Any]) -> None:
    # The flat-dict fast path must agree with what JSON can carry unchanged and store.
    carried = all(isinstance(k, str) and _storable(k) for k in payload) and all(
        v is None
        or (isinstance(v, str) and _storable(v))
        or (isinstance(v, int) and not isinstance(v, str))
        or (isinstance(v, float) and math.isfinite(v))
        for v in payload.values()
    )
    assert (json_problems(payload) == []) is carried


@pytest.mark.django_db
def test_the_deepest_payload_allowed_is_published() -> None:
    event = publish("orders.placed", {"order_id": 7, "total": 1, "deep": _nested(63)})
    assert EventRecord.objects.get(pk=event.id).payload["deep"] == _nested(63)


@pytest.mark.parametrize(
    "payload",
    [
        {"email": "secret\x00value"},
        {"email": "secret\ud83dvalue"},
        {"items": [{"sku": "x", "secret\x00key": 1}]},
    ],
    ids=["nul", "lone-surrogate", "nul-in-a-key"],
)
@pytest.mark.django_db
def test_unstorable_text_is_refused_before_the_database_sees_it(payload: dict[str, Any]) -> None:
    """PostgreSQL would raise DataError, abort the caller's transaction and quote the text."""
    with transaction.atomic():
        keep = publish("orders.placed", {"order_id": 1, "total": 2})
        with pytest.raises(InvalidPayload) as excinfo:
            publish("orders.placed", {"order_id": 1, "total": 2, **payload})
        assert "secret" not in str(excinfo.value)  # redacted fields must not reach logs
        with pytest.raises(InvalidPayload):
            publish_many([("orders.placed", {"order_id": 1, "total": 2, **payload})])
        # The caller's transaction is still usable.
        assert EventRecord.objects.filter(pk=keep.id).exists()
    assert list(EventRecord.objects.values_list("pk", flat=True)) == [keep.id]


# -- typed events: strings that must parse as their dataclass field's type --------------------


@dataclass(frozen=True)
class Refunded:
    """A dataclass event whose fields travel as strings (module level: type hints)."""

    amount: decimal.Decimal
    refunded_at: datetime.datetime
    refund_id: uuid.UUID
    booked_on: datetime.date | None = None
    lines: list[decimal.Decimal] | None = None
    by_ticket: dict[uuid.UUID, datetime.time] = field(default_factory=dict)
    notes: dict[uuid.UUID, str] | None = None
    window: tuple[str, datetime.date] | None = None


GOOD_REFUND = {
    "amount": "12.50",
    "refunded_at": "2024-05-01T09:30:00+00:00",
    "refund_id": str(uuid.UUID(int=1)),
}


@pytest.fixture
def refunded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Declare ``Refunded`` for one test; yield what its handler received."""
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())
    event("refunds.issued", redact=("refund_id",))(Refunded)
    typed_handlers.received.clear()
    yield typed_handlers.received
    typed_handlers.received.clear()


def handled_in(mode: str) -> Any:
    return wiring(
        {"event": "refunds.issued", "handler": "tests.app.typed_handlers.keep", "mode": mode}
    )


@pytest.mark.parametrize("mode", ["inline", "sync", "async"])
@pytest.mark.django_db
def test_publish_refuses_a_dataclass_whose_strings_do_not_parse_as_its_field_types(
    refunded: list[Any], django_capture_on_commit_callbacks: Any, mode: str
) -> None:
    """A dataclass does not check its fields: handlers got 'abc' for a Decimal, whatever
    their mode (a sync handler the instance, an async one the string kept by the rebuild)."""
    wrong = Refunded(
        amount="abc",  # type: ignore[arg-type]
        refunded_at="not a date",  # type: ignore[arg-type]
        refund_id=uuid.UUID(int=1),
        booked_on="2024-02-30",  # type: ignore[arg-type]
    )

    with (
        handled_in(mode),
        events_eager(),
        django_capture_on_commit_callbacks(execute=True) as callbacks,
    ):
        with pytest.raises(InvalidPayload) as excinfo:
            publish(wrong)
        with pytest.raises(InvalidPayload):
            publish_many([wrong])

    assert str(excinfo.value) == (
        "Invalid payload for event 'refunds.issued': "
        "$.amount: 'abc' is not a decimal number; "
        "$.refunded_at: 'not a date' is not an ISO 8601 date and time; "
        "$.booked_on: '2024-02-30' is not an ISO 8601 date (YYYY-MM-DD)"
    )
    assert [p.path for p in excinfo.value.problems] == ["$.amount", "$.refunded_at", "$.booked_on"]
    assert callbacks == []
    assert refunded == []
    assert not EventRecord.objects.exists()


@pytest.mark.django_db
def test_publish_by_name_refuses_typed_strings_that_do_not_parse_wherever_they_nest(
    refunded: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    ticket = str(uuid.UUID(int=2))
    payload = {
        **GOOD_REFUND,
        "refund_id": "secret-refund",  # redacted: not quoted
        "lines": ["1.5", "1,5"],
        "by_ticket": {"nope": "09:30", ticket: "25:00"},
        "notes": {"x": "a note", ticket: "why not"},
        "window": ["until", "2024-13-01"],
    }

    with (
        handled_in("sync"),
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(InvalidPayload) as excinfo,
    ):
        publish("refunds.issued", payload)

    assert [str(p) for p in excinfo.value.problems] == [
        "$.refund_id: '•••' is not a UUID",
        "$.lines[1]: '1,5' is not a decimal number",
        "$.by_ticket: key 'nope' is not a UUID",
        f"$.by_ticket['{ticket}']: '25:00' is not an ISO 8601 time",
        "$.notes: key 'x' is not a UUID",
        "$.window[1]: '2024-13-01' is not an ISO 8601 date (YYYY-MM-DD)",
    ]
    assert "secret-refund" not in str(excinfo.value)
    assert callbacks == []
    assert refunded == []


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.django_db
def test_typed_strings_that_parse_are_published_and_handlers_get_the_declared_types(
    refunded: list[Any], django_capture_on_commit_callbacks: Any, mode: str
) -> None:
    payload = {
        **GOOD_REFUND,
        "booked_on": None,
        "lines": ["1.5"],
        "by_ticket": {},
        "notes": None,
        "window": None,
    }

    with (
        handled_in(mode),
        events_eager(),
        django_capture_on_commit_callbacks(execute=True),
    ):
        published = publish("refunds.issued", payload)

    assert [e.payload for e in refunded] == [
        Refunded(
            amount=decimal.Decimal("12.50"),
            refunded_at=datetime.datetime(2024, 5, 1, 9, 30, tzinfo=datetime.UTC),
            refund_id=uuid.UUID(int=1),
            lines=[decimal.Decimal("1.5")],
        )
    ]
    assert EventRecord.objects.get(pk=published.id).payload == payload


@pytest.mark.django_db
def test_a_stored_typed_payload_that_does_not_parse_is_delivered_as_stored(
    refunded: list[Any],
) -> None:
    """A record of an earlier release (publish() refuses such strings now) still reaches its
    handlers, on replay too: the string kept, nothing lost."""
    record = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="refunds.issued",
        payload={**GOOD_REFUND, "amount": "abc"},
        correlation_id=uuid.uuid4(),
        status="dispatched",
        occurred_at=timezone.now(),
    )
    subscription = {
        "name": "refunds-kept",
        "event": "refunds.issued",
        "handler": "tests.app.typed_handlers.keep",
    }

    with wiring(subscription):
        call_command("events_replay", "refunds-kept", stdout=StringIO())

    [got] = refunded
    assert got.id == record.id
    assert got.payload.amount == "abc"
    assert got.payload.refund_id == uuid.UUID(int=1)


@pydantic_dataclass(frozen=True)
class Stamped:
    """A pydantic dataclass: pydantic checks its fields, more leniently than fromisoformat."""

    at: datetime.datetime
    amount: decimal.Decimal


@pytest.mark.django_db
def test_a_pydantic_dataclass_is_checked_by_pydantic_not_by_publish(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())
    event("stamps.taken")(Stamped)
    typed_handlers.received.clear()
    keep = {"event": "stamps.taken", "handler": "tests.app.typed_handlers.keep"}

    with wiring(keep), django_capture_on_commit_callbacks(execute=True):
        # A Unix time as text: pydantic reads it, datetime.fromisoformat does not.
        publish("stamps.taken", {"at": "1700000000", "amount": "1.5"})
        with pytest.raises(InvalidPayload) as excinfo:
            publish("stamps.taken", {"at": "1700000000", "amount": "abc"})

    [got] = typed_handlers.received
    typed_handlers.received.clear()
    assert got.payload == Stamped(
        at=datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC),
        amount=decimal.Decimal("1.5"),
    )
    assert [p.path for p in excinfo.value.problems] == ["$.amount"]
