"""The `when` filter language: operators, paths, composition, and malformed filters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_events.wiring.filters import OPERATORS, FilterError, compile_filter
from django_events.wiring.registry import get_registry

from .conftest import wiring

ORDER: dict[str, Any] = {
    "order_id": 7,
    "total": 120.5,
    "status": "paid",
    "express": True,
    "note": None,
    "tags": ["gift", "fragile"],
    "customer": {"id": 3, "email": "a@example.com", "address": {"country": "FR"}},
    "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": 1}],
}


def matches(when: Any, payload: Any = ORDER) -> bool:
    return compile_filter(when)(payload)


# -- operators ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        # a bare value is equality
        ({"status": "paid"}, True),
        ({"status": "open"}, False),
        ({"note": None}, True),
        ({"tags": ["gift", "fragile"]}, True),
        ({"tags": ["fragile", "gift"]}, False),
        ({"customer": {"id": 3, "email": "a@example.com", "address": {"country": "FR"}}}, True),
        # eq / ne
        ({"order_id": {"eq": 7}}, True),
        ({"order_id": {"eq": 7.0}}, True),
        ({"order_id": {"eq": 8}}, False),
        ({"order_id": {"ne": 8}}, True),
        ({"order_id": {"ne": 7}}, False),
        # gt / gte / lt / lte
        ({"total": {"gt": 120}}, True),
        ({"total": {"gt": 120.5}}, False),
        ({"total": {"gte": 120.5}}, True),
        ({"total": {"gte": 121}}, False),
        ({"total": {"lt": 121}}, True),
        ({"total": {"lt": 120.5}}, False),
        ({"total": {"lte": 120.5}}, True),
        ({"total": {"lte": 120}}, False),
        ({"status": {"gt": "old"}}, True),  # strings compare as strings
        ({"total": {"gte": 100, "lt": 200}}, True),  # several operators on one key: AND
        ({"total": {"gte": 100, "lt": 110}}, False),
        # in / not_in
        ({"status": {"in": ["paid", "shipped"]}}, True),
        ({"status": {"in": ["open"]}}, False),
        ({"status": {"in": []}}, False),
        ({"status": {"not_in": ["open", "cancelled"]}}, True),
        ({"status": {"not_in": ["paid"]}}, False),
        ({"tags": {"in": [["gift", "fragile"], "x"]}}, True),
        # exists
        ({"note": {"exists": True}}, True),  # present, even if null
        ({"coupon": {"exists": True}}, False),
        ({"coupon": {"exists": False}}, True),
        ({"note": {"exists": False}}, False),
        # contains: list membership, substring, object key
        ({"tags": {"contains": "gift"}}, True),
        ({"tags": {"contains": "glass"}}, False),
        ({"status": {"contains": "ai"}}, True),
        ({"status": {"contains": "x"}}, False),
        ({"customer": {"contains": "email"}}, True),
        ({"items": {"contains": {"sku": "B-2", "qty": 1}}}, True),
        ({"items": {"contains": {"sku": "B-2"}}}, False),
    ],
)
def test_operators(when: dict[str, Any], expected: bool) -> None:
    assert matches(when) is expected


def test_every_documented_operator_is_implemented() -> None:
    assert set(OPERATORS) == {
        "eq",
        "ne",
        "gt",
        "gte",
        "lt",
        "lte",
        "in",
        "not_in",
        "exists",
        "contains",
    }


# -- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ({"customer.id": 3}, True),
        ({"customer.address.country": "FR"}, True),
        ({"customer.address.country": {"in": ["DE", "IT"]}}, False),
        ({"items.0.sku": "A-1"}, True),
        ({"items.1.qty": {"lt": 2}}, True),
        ({"items.1.sku": "A-1"}, False),
        ({"tags.1": "fragile"}, True),
        ({"items.2.sku": {"exists": True}}, False),  # index past the end: missing
        ({"items.-1.sku": {"exists": True}}, False),  # no negative indexes
        ({"items.sku": {"exists": True}}, False),  # a name on a list: missing
        ({"status.0": {"exists": True}}, False),  # strings are not indexed
        ({"customer.address.country.code": {"exists": True}}, False),
        ({"customer.phone": {"exists": False}}, True),
    ],
)
def test_dotted_paths_and_list_indexes(when: dict[str, Any], expected: bool) -> None:
    assert matches(when) is expected


@pytest.mark.parametrize(
    "when",
    [
        {"missing": 1},
        {"missing": None},
        {"missing": {"eq": None}},
        {"missing": {"gt": 0}},
        {"missing": {"gte": 0}},
        {"missing": {"lt": 0}},
        {"missing": {"lte": 0}},
        {"missing": {"in": [None]}},
        {"missing": {"contains": "x"}},
        {"missing": {"exists": True}},
        {"customer.missing.deeper": {"eq": 1}},
    ],
)
def test_a_missing_key_matches_no_positive_test(when: dict[str, Any]) -> None:
    assert matches(when) is False


@pytest.mark.parametrize(
    "when",
    [
        {"missing": {"ne": 1}},
        {"missing": {"not_in": [1]}},
        {"missing": {"exists": False}},
        {"not": {"missing": 1}},
    ],
)
def test_a_missing_key_matches_negative_tests(when: dict[str, Any]) -> None:
    assert matches(when) is True


# -- type mismatches never raise and never match ----------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        {"status": {"gt": 3}},
        {"status": {"lte": 3}},
        {"total": {"lt": "a lot"}},
        {"tags": {"gte": 1}},
        {"customer": {"lt": {"id": 4}}},
        {"note": {"gt": 0}},
        {"note": {"contains": "x"}},
        {"order_id": {"contains": 7}},
        {"tags": {"contains": ["gift"]}},
        {"status": {"contains": 1}},
        {"status": {"eq": 1}},
        # JSON true is not 1, even though Python says True == 1
        {"express": 1},
        {"express": {"eq": 1}},
        {"express": {"in": [1, 2]}},
        {"express": {"gt": 0}},
        {"express": {"gte": 1}},
        {"order_id": {"eq": True}},
        {"tags": {"contains": True}},
        {"items": {"contains": {"sku": "A-1", "qty": True}}},
    ],
)
def test_type_mismatch_is_no_match(when: dict[str, Any]) -> None:
    assert matches(when) is False


def test_type_mismatch_negations_match() -> None:
    assert matches({"express": {"ne": 1}}) is True
    assert matches({"express": {"not_in": [0, 1]}}) is True
    assert matches({"express": {"eq": True}}) is True


@pytest.mark.parametrize("payload", [None, [], "text", 3, [{"status": "paid"}], {"status": []}])
def test_any_payload_shape_is_safe(payload: Any) -> None:
    assert matches({"status": {"gte": "paid"}}, payload) is False
    assert matches({"status.0.x": {"exists": False}}, payload) is True


# -- composition -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ({"status": "paid", "total": {"gt": 100}}, True),  # several keys: AND
        ({"status": "paid", "total": {"gt": 1000}}, False),
        ({"any": [{"status": "open"}, {"total": {"gt": 100}}]}, True),
        ({"any": [{"status": "open"}, {"total": {"gt": 1000}}]}, False),
        ({"all": [{"status": "paid"}, {"total": {"gt": 100}}]}, True),
        ({"all": [{"status": "paid"}, {"total": {"gt": 1000}}]}, False),
        ({"not": {"status": "paid"}}, False),
        ({"not": {"status": "open"}}, True),
        ({"not": {"not": {"status": "paid"}}}, True),
        ({"not": {"status": "paid", "total": {"gt": 1000}}}, True),  # not (A and B)
        (
            {
                "customer.address.country": "FR",
                "any": [
                    {"all": [{"express": True}, {"tags": {"contains": "gift"}}]},
                    {"total": {"gte": 1000}},
                ],
                "not": {"status": {"in": ["cancelled", "refunded"]}},
            },
            True,
        ),
        (
            {
                "any": [
                    {"all": [{"express": False}, {"tags": {"contains": "gift"}}]},
                    {"not": {"customer.address.country": "FR"}},
                ],
            },
            False,
        ),
    ],
)
def test_any_all_not_composition(when: dict[str, Any], expected: bool) -> None:
    assert matches(when) is expected


# -- malformed filters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "path", "message"),
    [
        ([], "", "when: expected a mapping, got []"),
        ("total > 3", "", "when: expected a mapping, got 'total > 3'"),
        ({}, "", "when: an empty filter matches nothing useful; remove it"),
        (
            {"total": {"gte": 3, "bigger": 2}},
            ".total",
            "when.total: unknown operator(s) ['bigger']; use one of ['contains', 'eq', 'exists', "
            "'gt', 'gte', 'in', 'lt', 'lte', 'ne', 'not_in']",
        ),
        ({"status": {"in": "paid"}}, ".status.in", "when.status.in: 'in' takes a list, got 'paid'"),
        (
            {"status": {"not_in": None}},
            ".status.not_in",
            "when.status.not_in: 'not_in' takes a list, got None",
        ),
        (
            {"note": {"exists": "yes"}},
            ".note.exists",
            "when.note.exists: 'exists' takes true or false, got 'yes'",
        ),
        ({"any": []}, ".any", "when.any: 'any' takes a non-empty list of filters"),
        ({"all": {"status": "paid"}}, ".all", "when.all: 'all' takes a non-empty list of filters"),
        (
            {"any": [{"status": "paid"}, {"total": {"in": 3}}]},
            ".any[1].total.in",
            "when.any[1].total.in: 'in' takes a list, got 3",
        ),
        (
            {"all": [{"any": [{}]}]},
            ".all[0].any[0]",
            "when.all[0].any[0]: an empty filter matches nothing useful; remove it",
        ),
        ({"not": ["status"]}, ".not", "when.not: expected a mapping, got ['status']"),
        (
            {"not": {"status": {"exists": 1}}},
            ".not.status.exists",
            "when.not.status.exists: 'exists' takes true or false, got 1",
        ),
        (
            {"customer.address": {"country": "FR", "eq": "x"}},
            ".customer.address",
            "when.customer.address: unknown operator(s) ['country']; use one of ['contains', 'eq', "
            "'exists', 'gt', 'gte', 'in', 'lt', 'lte', 'ne', 'not_in']",
        ),
        ({1: "x"}, ".1", "when.1: a payload path must be a non-empty string, got 1"),
        ({"": "x"}, ".", "when.: a payload path must be a non-empty string, got ''"),
    ],
)
def test_malformed_filter_raises_with_the_path_inside_when(
    when: Any, path: str, message: str
) -> None:
    with pytest.raises(FilterError) as excinfo:
        compile_filter(when)

    assert excinfo.value.path == path
    assert str(excinfo.value) == message
    assert isinstance(excinfo.value, ValueError)


def test_malformed_filter_in_a_subscription_is_E108_naming_it() -> None:
    with wiring(
        {
            "event": "orders.placed",
            "handler": "tests.app.handlers.record",
            "name": "big-orders",
            "when": {"any": [{"total": {"gt": 3, "above": 3}}]},
        }
    ):
        registry = get_registry()

    assert [(p.id, p.message, str(p.origin)) for p in registry.problems] == [
        (
            "django_events.E108",
            "Subscription 'big-orders': when.any[0].total: unknown operator(s) ['above']; "
            "use one of ['contains', 'eq', 'exists', 'gt', 'gte', 'in', 'lt', 'lte', 'ne', "
            "'not_in']",
            "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
        )
    ]
    assert "big-orders" not in registry.subscriptions


def test_a_subscription_filter_is_compiled_into_the_registry() -> None:
    with wiring(
        {
            "event": "orders.placed",
            "handler": "tests.app.handlers.record",
            "name": "big",
            "when": {"total": {"gte": 1000}},
        },
        {"event": "orders.placed", "handler": "tests.app.handlers.record", "name": "all"},
    ):
        registry = get_registry()

    big, every = registry.subscriptions["big"], registry.subscriptions["all"]
    assert every.accepts is None
    assert big.accepts is not None
    assert big.accepts({"order_id": 1, "total": 1000}) is True
    assert big.accepts({"order_id": 1, "total": 999.99}) is False


# -- properties --------------------------------------------------------------------------------

KEYS = ["a", "b", "0"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(-5, 5, allow_nan=False)
    | st.text(alphabet="ab0", max_size=3)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS), children, max_size=3)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=3)
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join)
operator_tests = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "contains"]), json_values),
    st.tuples(st.sampled_from(["in", "not_in"]), st.lists(json_values, max_size=3)),
    st.tuples(st.just("exists"), st.booleans()),
)
leaf_filters = st.builds(lambda path, op: {path: {op[0]: op[1]}}, paths, operator_tests) | (
    st.builds(lambda path, value: {path: value}, paths, scalars)
)
filters = st.recursive(
    leaf_filters,
    lambda children: (
        st.builds(lambda f: {"not": f}, children)
        | st.builds(lambda fs: {"any": fs}, st.lists(children, min_size=1, max_size=3))
        | st.builds(lambda fs: {"all": fs}, st.lists(children, min_size=1, max_size=3))
    ),
    max_leaves=6,
)


@given(filters, payloads)
def test_a_valid_filter_never_raises_and_not_inverts_it(when: Any, payload: Any) -> None:
    result = compile_filter(when)(payload)

    assert isinstance(result, bool)
    assert compile_filter({"not": when})(payload) is (not result)


@given(filters, filters, payloads)
def test_any_and_all_follow_de_morgan(first: Any, second: Any, payload: Any) -> None:
    any_of = compile_filter({"any": [first, second]})(payload)
    none_of_the_negations = compile_filter({"all": [{"not": first}, {"not": second}]})(payload)

    assert any_of is (not none_of_the_negations)
    assert compile_filter({"all": [first, second]})(payload) is (
        compile_filter(first)(payload) and compile_filter(second)(payload)
    )


@given(paths, json_values, st.lists(json_values, max_size=4), payloads)
def test_negated_operators_are_exact_complements(
    path: str, value: Any, values: list[Any], payload: Any
) -> None:
    def run(op: str, expected: Any) -> bool:
        return compile_filter({path: {op: expected}})(payload)

    assert run("ne", value) is (not run("eq", value))
    assert run("not_in", values) is (not run("in", values))
    assert run("in", values) is any(run("eq", v) for v in values)
    assert run("exists", False) is (not run("exists", True))
    assert compile_filter({path: value})(payload) is run("eq", value)


@given(
    st.integers(-100, 100) | st.floats(-100, 100, allow_nan=False),
    st.integers(-100, 100) | st.floats(-100, 100, allow_nan=False),
)
def test_number_comparisons_agree_with_arithmetic(actual: float, bound: float) -> None:
    payload = {"n": actual}

    assert matches({"n": {"gt": bound}}, payload) is (actual > bound)
    assert matches({"n": {"gte": bound}}, payload) is (actual >= bound)
    assert matches({"n": {"lt": bound}}, payload) is (actual < bound)
    assert matches({"n": {"lte": bound}}, payload) is (actual <= bound)
    assert matches({"n": {"gte": bound}}, payload) is (
        matches({"n": {"gt": bound}}, payload) or matches({"n": bound}, payload)
    )
