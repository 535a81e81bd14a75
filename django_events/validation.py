"""Payload validators, compiled once per event.

``jsonschema`` is the reference: it checks the schemas and writes the error messages. When
``jsonschema-rs`` is installed it answers the hot-path question "is this payload valid?";
on a "no", ``jsonschema`` produces the errors (and has the last word).
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

from .exceptions import PayloadProblem
from .manifest import format_path

try:
    import jsonschema_rs
except ImportError:  # the optional "fast" extra is not installed
    jsonschema_rs = None


class PayloadValidator:
    """Validates payloads against one JSON Schema (draft 2020-12)."""

    def __init__(self, schema: dict[str, Any] | bool) -> None:
        Draft202012Validator.check_schema(schema)  # raises jsonschema.SchemaError
        self.schema = schema
        self._reference = Draft202012Validator(schema)
        self._fast = _compile_fast(schema)

    def problems(self, payload: Any) -> list[PayloadProblem]:
        """Return every schema violation in ``payload`` (empty when it is valid)."""
        if self._fast is not None and self._fast.is_valid(payload):
            return []
        errors = sorted(self._reference.iter_errors(payload), key=lambda e: list(map(str, e.path)))
        return [PayloadProblem(format_path(e.absolute_path), e.message) for e in errors]


def _compile_fast(schema: dict[str, Any] | bool) -> Any:
    if jsonschema_rs is None:
        return None
    try:
        return jsonschema_rs.validator_for(schema)
    except (ValueError, jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError):
        # A schema that jsonschema accepts but jsonschema-rs does not: use the reference.
        return None


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON")


def json_problems(payload: Any) -> list[PayloadProblem]:
    """Report values that cannot travel as JSON (the record and the message are JSON)."""
    try:
        json.dumps(payload, default=_refuse, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return [PayloadProblem("$", f"not JSON-serializable: {exc}")]
    return []
