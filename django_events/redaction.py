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
