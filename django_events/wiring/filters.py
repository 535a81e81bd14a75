"""The ``when`` filter language: data compiled to predicates, never ``eval``."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Any], bool]

MISSING = object()  # what `lookup` returns for a path that is not there


class FilterError(ValueError):
    """A ``when`` block is malformed; ``path`` says where inside it."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"when{path}: {message}")


def json_equal(actual: Any, expected: Any) -> bool:
    """Equality as JSON sees it: ``true`` is not ``1`` (Python says it is), ``1`` is ``1.0``."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    if isinstance(actual, Mapping) and isinstance(expected, Mapping):
        return actual.keys() == expected.keys() and all(
            json_equal(actual[key], expected[key]) for key in actual
        )
    if isinstance(actual, list | tuple) and isinstance(expected, list | tuple):
        return len(actual) == len(expected) and all(map(json_equal, actual, expected))
    return bool(actual == expected)


def _member(actual: Any, expected: list[Any]) -> bool:
    return any(json_equal(actual, item) for item in expected)


def _ordered(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(actual: Any, expected: Any) -> bool:
        if actual is MISSING or isinstance(actual, bool) != isinstance(expected, bool):
            return False
        try:
            return bool(op(actual, expected))
        except TypeError:  # e.g. "abc" > 3: a mismatched type never matches
            return False

    return compare


def _contains(actual: Any, expected: Any) -> bool:
    if actual is MISSING or actual is None:
        return False
    if isinstance(actual, list | tuple):
        return _member(expected, list(actual))
    try:
        return expected in actual
    except TypeError:
        return False


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda actual, expected: actual is not MISSING and json_equal(actual, expected),
    "ne": lambda actual, expected: actual is MISSING or not json_equal(actual, expected),
    "gt": _ordered(operator.gt),
    "gte": _ordered(operator.ge),
    "lt": _ordered(operator.lt),
    "lte": _ordered(operator.le),
    "in": lambda actual, expected: actual is not MISSING and _member(actual, expected),
    "not_in": lambda actual, expected: actual is MISSING or not _member(actual, expected),
    "exists": lambda actual, expected: (actual is not MISSING) == bool(expected),
    "contains": _contains,
}
_COMBINATORS = ("any", "all", "not")


def lookup(payload: Any, path: str) -> Any:
    """Follow a dotted path through dicts (and lists, by index); missing gives a sentinel."""
    value = payload
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part, MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
        if value is MISSING:
            return value
    return value


def compile_filter(when: Any, path: str = "") -> Predicate:
    """Compile a ``when`` block to a predicate over the payload dict."""
    if not isinstance(when, Mapping):
        raise FilterError(path, f"expected a mapping, got {when!r}")
    if not when:
        raise FilterError(path, "an empty filter matches nothing useful; remove it")
    predicates = [_compile_key(key, value, f"{path}.{key}") for key, value in when.items()]
    if len(predicates) == 1:
        return predicates[0]
    return lambda payload: all(p(payload) for p in predicates)


def _compile_key(key: Any, value: Any, path: str) -> Predicate:
    if not isinstance(key, str) or not key:
        raise FilterError(path, f"a payload path must be a non-empty string, got {key!r}")
    if key in ("any", "all"):
        if not isinstance(value, list) or not value:
            raise FilterError(path, f"{key!r} takes a non-empty list of filters")
        parts = [compile_filter(item, f"{path}[{i}]") for i, item in enumerate(value)]
        combine = any if key == "any" else all
        return lambda payload: combine(p(payload) for p in parts)
    if key == "not":
        inner = compile_filter(value, path)
        return lambda payload: not inner(payload)
    if isinstance(value, Mapping) and value and all(k in OPERATORS for k in value):
        tests = [_compile_operator(op, expected, f"{path}.{op}") for op, expected in value.items()]
        return lambda payload: all(test(lookup(payload, key)) for test in tests)
    if isinstance(value, Mapping) and any(k in OPERATORS for k in value):
        unknown = sorted(k for k in value if k not in OPERATORS)
        raise FilterError(path, f"unknown operator(s) {unknown}; use one of {sorted(OPERATORS)}")
    expected = value
    return lambda payload: OPERATORS["eq"](lookup(payload, key), expected)


def _compile_operator(op: str, expected: Any, path: str) -> Callable[[Any], bool]:
    if op in ("in", "not_in") and not isinstance(expected, list):
        raise FilterError(path, f"{op!r} takes a list, got {expected!r}")
    if op == "exists" and not isinstance(expected, bool):
        raise FilterError(path, f"'exists' takes true or false, got {expected!r}")
    compare = OPERATORS[op]
    return lambda actual: compare(actual, expected)


def comparisons(
    when: Mapping[str, Any], negated: bool = False
) -> list[tuple[str, str | None, Any, bool]]:
    """The (payload path, operator, value, negated) of each comparison in a valid ``when``, in
    order; the operator is None for a plain value (equality), and ``negated`` is true under an
    odd number of ``not`` (what the comparison decides, the filter then decides the other way)."""
    found: list[tuple[str, str | None, Any, bool]] = []
    for key, value in when.items():
        if key in ("any", "all"):
            for item in value:
                found += comparisons(item, negated)
        elif key == "not":
            found += comparisons(value, not negated)
        elif isinstance(value, Mapping) and value and all(k in OPERATORS for k in value):
            found += [(key, op, expected, negated) for op, expected in value.items()]
        else:
            found.append((key, None, value, negated))
    return found
