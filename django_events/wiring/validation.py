"""Payload validators, compiled once per event.

``jsonschema`` is the reference: it checks the schemas and writes the error messages. When
``jsonschema-rs`` is installed it answers the hot-path question "is this payload valid?";
on a "no", ``jsonschema`` produces the errors (and has the last word).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator, validators

from django_events.exceptions import PayloadProblem
from django_events.wiring.manifest import JsonPath, format_path
from django_events.wiring.redaction import MASK, error_message, redacted_paths, under

try:
    import jsonschema_rs
except ImportError:  # the optional "fast" extra is not installed
    HAS_FAST = False
else:
    HAS_FAST = True

# A tuple travels as a JSON array, and jsonschema-rs reads it as one: so does the reference.
_ReferenceValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "array", lambda checker, instance: isinstance(instance, list | tuple)
    ),
)


class PayloadValidator:
    """Validates payloads against one JSON Schema (draft 2020-12)."""

    def __init__(self, schema: dict[str, Any] | bool) -> None:
        Draft202012Validator.check_schema(schema)  # raises jsonschema.SchemaError
        self.schema = schema
        self._reference = _ReferenceValidator(schema)
        self._fast = _compile_fast(schema)

    def problems(self, payload: Any, redact: Iterable[str] = ()) -> list[PayloadProblem]:
        """Return every schema violation in ``payload`` (empty when it is valid).

        A message does not quote the values at the ``redact`` paths (found by its path).
        """
        try:
            fast_verdict = self._fast is not None and self._fast.is_valid(payload)
        except ValueError:  # a value jsonschema-rs cannot read (datetime, set, int key...)
            fast_verdict = False  # the reference validator decides, and explains
        if fast_verdict:
            return []
        errors = sorted(self._reference.iter_errors(payload), key=lambda e: list(map(str, e.path)))
        paths = redacted_paths(redact)
        return [
            PayloadProblem(format_path(e.absolute_path), error_message(e, paths)) for e in errors
        ]


def _compile_fast(schema: dict[str, Any] | bool) -> Any:
    if not HAS_FAST:
        return None
    try:
        return jsonschema_rs.validator_for(schema)
    except (ValueError, jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError):
        # A schema that jsonschema accepts but jsonschema-rs does not: use the reference.
        return None


def json_problems(payload: Any, redact: Iterable[str] = ()) -> list[PayloadProblem]:
    """Report values that cannot travel as JSON (the record and the message are JSON).

    A message does not quote the value at (or inside) a ``redact`` path.
    """
    if _is_plain_json(payload):
        return []
    problems: list[PayloadProblem] = []
    _json_walk(payload, (), problems, set(), redacted_paths(redact))
    return problems


def _json_walk(
    value: Any,
    path: JsonPath,
    problems: list[PayloadProblem],
    seen: set[int],
    redacted: list[tuple[str, ...]],
) -> None:
    if value is None or isinstance(value, str | int):  # bool is an int
        return
    shown = repr(MASK) if under(path, redacted) else repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            problems.append(PayloadProblem(format_path(path), f"{shown} is not a JSON number"))
        return
    if not isinstance(value, dict | list | tuple):
        problems.append(
            PayloadProblem(
                format_path(path), f"{type(value).__name__} {shown} is not JSON-serializable"
            )
        )
        return
    if id(value) in seen:
        problems.append(PayloadProblem(format_path(path), "circular reference"))
        return
    seen.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                _json_walk(item, (*path, key), problems, seen, redacted)
            else:  # json.dumps would turn it into a string: the handler would see another key
                problems.append(PayloadProblem(format_path(path), f"key {key!r} is not a string"))
    else:
        for index, item in enumerate(value):
            _json_walk(item, (*path, index), problems, seen, redacted)
    seen.discard(id(value))


def _refuse(value: Any) -> Any:
    raise TypeError(value)


# Values that JSON carries unchanged (exact types: a subclass may serialize differently).
_JSON_SCALARS = frozenset({str, int, bool, type(None)})


def _is_plain_json(payload: Any) -> bool:
    """The hot path: a flat dict of scalars is checked in place, anything else by C json;
    the walk explains failures."""
    if type(payload) is dict and _is_flat_json(payload):
        return True
    try:
        text = json.dumps(payload, default=_refuse, allow_nan=False)
    except (TypeError, ValueError):
        return False
    # json.dumps turns non-string keys into strings silently: a round trip must be equal.
    return "{" not in text or json.loads(text) == payload


def _is_flat_json(payload: dict[Any, Any]) -> bool:
    # A round trip through json costs ~2.5 us; this loop ~0.2 us for a typical payload.
    for key, value in payload.items():
        kind = type(value)
        if type(key) is not str:
            return False
        if kind not in _JSON_SCALARS and not (kind is float and math.isfinite(value)):
            return False
    return True
