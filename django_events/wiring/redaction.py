"""Masking the payload keys an event declares in ``redact``, for display."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MASK = "•••"


def redact(data: Any, paths: Iterable[str]) -> Any:
    """Return a copy of ``data`` with each dotted path masked (lists are walked item by item).

    ``redact: [email, customer.phone]`` masks ``data["email"]`` and
    ``data["customer"]["phone"]``; ``data`` itself is never changed.
    """
    result = data
    for path in paths:
        result = _mask(result, path.split("."))
    return result


def _mask(value: Any, keys: list[str]) -> Any:
    if isinstance(value, list):
        return [_mask(item, keys) for item in value]
    if not isinstance(value, dict) or keys[0] not in value:
        return value
    head, rest = keys[0], keys[1:]
    return {**value, head: _mask(value[head], rest) if rest else MASK}


def redact_text(text: str, data: Any, paths: Iterable[str]) -> str:
    """Return ``text`` with the ``repr`` of each value at a redacted path masked.

    For messages built from the payload, such as schema errors (``'ada@example.com' is not
    of type 'integer'``): the value under each path, and each value nested in it, is replaced.
    """
    values: list[str] = []
    for path in paths:
        _collect(data, path.split("."), values)
    # Longest first: a dict's repr holds its values' reprs.
    for value in sorted(set(values), key=len, reverse=True):
        text = text.replace(value, repr(MASK))
    return text


def _collect(value: Any, keys: list[str], out: list[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _collect(item, keys, out)
    elif isinstance(value, dict) and keys[0] in value:
        if keys[1:]:
            _collect(value[keys[0]], keys[1:], out)
        else:
            _reprs(value[keys[0]], out)


def _reprs(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, bool):
        return  # None, True, False are no secret, and masking them would garble the text
    out.append(repr(value))
    children = list(value.values()) if isinstance(value, dict) else value
    if isinstance(children, list):
        for child in children:
            _reprs(child, out)


def mask_values(data: Any) -> Any:
    """Return a copy of ``data`` with every value masked: keys and list lengths stay.

    For a payload whose ``redact`` list is unknown (its event is no longer declared).
    """
    if isinstance(data, dict):
        return {key: mask_values(value) for key, value in data.items()}
    if isinstance(data, list):
        return [mask_values(item) for item in data]
    return MASK
