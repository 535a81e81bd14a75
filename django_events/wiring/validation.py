"""Payload validators, compiled once per event.

``jsonschema`` is the reference: it checks the schemas and writes the error messages. When
``jsonschema-rs`` is installed it answers the hot-path question "is this payload valid?";
on a "no", ``jsonschema`` produces the errors (and has the last word).
"""

from __future__ import annotations

import json
import math
import re
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


# Levels of objects and arrays a payload may nest (the payload object is level 1). Deeper
# payloads do not survive the trip: the prefork pool pickles each message to its child, and
# pickle gives up near 500 levels on CPython (a RecursionError that stops the worker, for
# every worker that receives it); json and the databases stop near 1000. 64 leaves room for
# recursive schemas, filters and handlers, which walk payloads recursively too.
MAX_DEPTH = 64

UNSTORABLE_TEXT = "NUL (\\u0000) or a lone surrogate in a string"
# PostgreSQL refuses both in text and jsonb; no UTF-8 encoder can write a lone surrogate.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> bool:
    """Whether ``text`` can be stored and sent as UTF-8 (no NUL, no lone surrogate)."""
    return (text.isascii() and "\x00" not in text) or _UNSTORABLE.search(text) is None


def json_problems(payload: Any, redact: Iterable[str] = ()) -> list[PayloadProblem]:
    """Report values that cannot travel as JSON (the record and the message are JSON):
    non-JSON values, strings with NUL or a lone surrogate, nesting deeper than `MAX_DEPTH`.

    A message does not quote the value at (or inside) a ``redact`` path.
    """
    flat = type(payload) is dict and _is_flat_json(payload)  # checked in place, not copied
    if flat or plain_json_copy(payload) is not None:
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
    if isinstance(value, str):
        if not storable_text(value):
            problems.append(PayloadProblem(format_path(path), UNSTORABLE_TEXT))
        return
    if value is None or isinstance(value, int):  # bool is an int
        return
    if not isinstance(value, dict | list | tuple):
        # Only scalars are quoted (a container's repr could recurse as deep as it nests).
        shown = repr(MASK) if under(path, redacted) else repr(value)
        if not isinstance(value, float):
            problem = f"{type(value).__name__} {shown} is not JSON-serializable"
        elif math.isfinite(value):
            return
        else:
            problem = f"{shown} is not a JSON number"
        problems.append(PayloadProblem(format_path(path), problem))
        return
    if id(value) in seen:
        problems.append(PayloadProblem(format_path(path), "circular reference"))
        return
    if len(path) >= MAX_DEPTH:  # this container is level len(path) + 1
        problems.append(PayloadProblem(format_path(path), f"nested deeper than {MAX_DEPTH} levels"))
        return
    seen.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                if not storable_text(key):
                    problems.append(
                        PayloadProblem(format_path(path), f"a key holds {UNSTORABLE_TEXT}")
                    )
                    continue
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


def plain_json_copy(payload: Any) -> Any:
    """A copy of ``payload`` if it is plain JSON that can travel as it is, out of reach of
    later changes to ``payload``; None if it may not be (`json_problems` walks it to say).

    The hot path: a flat dict of scalars is checked in place and copied with ``dict()``;
    anything else goes through C json, whose round trip is the copy.
    """
    if type(payload) is dict and _is_flat_json(payload):
        return dict(payload)
    try:
        text = json.dumps(payload, default=_refuse, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    # ensure_ascii escapes NUL and every surrogate (pairs too: the walk tells them apart).
    if "\\u0000" in text or "\\ud" in text:
        return None
    # Fewer brackets than levels allowed (those in strings count too): not too deep.
    if text.count("[") + text.count("{") > MAX_DEPTH and _deeper_than_allowed(payload):
        return None
    copied = json.loads(text)
    # json.dumps turns non-string keys into strings silently: a round trip must be equal.
    return copied if copied == payload else None


def _deeper_than_allowed(payload: Any) -> bool:
    level, depth = [payload], 1
    while level:
        if depth > MAX_DEPTH:
            return True
        level = [
            item
            for container in level
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, dict | list | tuple)
        ]
        depth += 1
    return False


def _is_flat_json(payload: dict[Any, Any]) -> bool:
    # A round trip through json costs ~2.5 us; this loop ~0.2 us for a typical payload.
    texts = []  # every key and string value, checked at once: storable if each one is
    for key, value in payload.items():
        if type(key) is not str:
            return False
        texts.append(key)
        kind = type(value)
        if kind is str:
            texts.append(value)
        elif kind not in _JSON_SCALARS and not (kind is float and math.isfinite(value)):
            return False
    return storable_text("".join(texts))
