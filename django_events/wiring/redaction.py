"""Masking the payload keys an event declares in ``redact``, for display."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsonschema import ValidationError

    from django_events.exceptions import PayloadProblem

MASK = "•••"
# The start of the error recorded for a stored payload that no longer fits its schema: its
# problems are masked by path when written (a handler's error starts with its exception type).
STALE_PAYLOAD = "Payload no longer valid for "
# In free text, shorter values are not masked: one or two characters occur by chance in any
# message (line numbers, limits, counts) and masking them garbles it, while such a value
# has at most a few hundred possibilities, so masking protects next to nothing.
MIN_MASKED_LENGTH = 3
# Validators whose messages quote the schema or the keys, never a value.
_SCHEMA_ONLY = frozenset({"required", "dependentRequired", "const"})
_KEYS_ONLY = _SCHEMA_ONLY | {"additionalProperties", "unevaluatedProperties"}


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


def stale_payload_error(name: str, problems: Sequence[PayloadProblem]) -> str:
    """The recorded error of a stored payload that fails its schema (problems masked by path)."""
    return f"{STALE_PAYLOAD}{name!r}: " + "; ".join(map(str, problems))


def redacted_paths(paths: Iterable[str]) -> list[tuple[str, ...]]:
    """The dotted ``redact`` paths as key tuples, for `error_message` and `under`."""
    return [tuple(path.split(".")) for path in paths]


def under(where: Sequence[str | int], paths: Sequence[tuple[str, ...]]) -> bool:
    """Whether the value at JSON path ``where`` is, or is inside, a redacted value."""
    keys = _keys(where)
    return any(keys[: len(path)] == path for path in paths)


def _keys(where: Sequence[str | int]) -> tuple[str, ...]:
    # List indexes drop out: a redacted path reaches into each item of a list.
    return tuple(key for key in where if isinstance(key, str))


def error_message(error: ValidationError, paths: Sequence[tuple[str, ...]]) -> str:
    """``error.message`` without the redacted values it quotes, found by the error's path.

    At (or inside) a redacted path the message loses the value: ``'•••' is not of type
    'string'``. Above one, the value it quotes is shown redacted. Elsewhere it is unchanged,
    so ``10 is less than the minimum of 1`` stays whole whatever the redacted values are.
    """
    message: str = error.message
    if not paths:
        return message
    keys = _keys(list(error.absolute_path))
    instance_text = repr(error.instance)
    if under(keys, paths):
        if error.validator in _SCHEMA_ONLY:
            return message
        if message.startswith(instance_text):  # most jsonschema messages: "<value> is ..."
            return repr(MASK) + message[len(instance_text) :]
        return f"{MASK!r} does not satisfy {error.validator!r}"
    inner = [path[len(keys) :] for path in paths if path[: len(keys)] == keys]
    if not inner or error.validator in _KEYS_ONLY:
        return message
    shown = repr(_redact_shaped(error.instance, inner))
    if instance_text in message:
        return message.replace(instance_text, shown)
    return f"{shown} does not satisfy {error.validator!r}"


def _redact_shaped(value: Any, paths: Sequence[tuple[str, ...]]) -> Any:
    """``value`` with the redacted ``paths`` below it masked, and any value that is not an
    object where one of them expects one: the redacted value itself, sent in another shape
    (a card number where ``card: {number}`` goes) is what a schema error then quotes."""
    if isinstance(value, list):
        return [_redact_shaped(item, paths) for item in value]
    if value is None or isinstance(value, bool):  # nothing to hide, as in `redact_text`
        return value
    if not isinstance(value, dict):
        return MASK
    masked = dict(value)
    for key in {path[0] for path in paths}:
        if key in masked:
            below = [path[1:] for path in paths if path[0] == key]
            masked[key] = MASK if () in below else _redact_shaped(masked[key], below)
    return masked


def redact_text(text: str, data: Any, paths: Iterable[str]) -> str:
    """Return ``text`` with each value at a redacted path masked where it appears whole.

    For free text that quotes the payload with no path to go by, such as a handler's error
    or traceback (schema errors are masked by path: `error_message`). The value under each
    path, and each value nested in it, is masked where it stands as a whole token: as its
    ``repr``, as JSON writes it (a webhook receiver's answer may echo the body) or, for a
    string, its bare text; never inside a longer number or word. Scalars
    shorter than `MIN_MASKED_LENGTH` characters are left (see there), as are None and booleans.
    """
    values: set[str] = set()
    for path in paths:
        _collect(data, path.split("."), values)
    return _mask_tokens(text, values)


def mask_values_in_text(text: str, data: Any) -> str:
    """Return ``text`` with every value of ``data`` masked where it appears whole.

    The free-text counterpart of `mask_values`, for a payload whose ``redact`` list is
    unknown: each value is masked as `redact_text` masks a redacted one.
    """
    values: set[str] = set()
    _texts(data, values)
    return _mask_tokens(text, values)


def _mask_tokens(text: str, values: set[str]) -> str:
    if not values:
        return text
    # Longest first: a dict's repr holds its values' reprs, a string's repr its text.
    alternatives = "|".join(map(re.escape, sorted(values, key=len, reverse=True)))
    # Not inside a word or a number (a digit then "." then the value is a decimal's end).
    token = re.compile(rf"(?<!\w)(?<!\d\.)(?:{alternatives})(?!\w)(?!\.\d)")
    masked = repr(MASK)
    return token.sub(lambda _: masked, text)


def _collect(value: Any, keys: list[str], out: set[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _collect(item, keys, out)
    elif isinstance(value, dict) and keys[0] in value:
        if keys[1:]:
            _collect(value[keys[0]], keys[1:], out)
        else:
            _texts(value[keys[0]], out)


def _texts(value: Any, out: set[str]) -> None:
    if value is None or isinstance(value, bool):
        return  # None, True, False are no secret, and masking them would garble the text
    if isinstance(value, dict | list):
        out.update((repr(value), json.dumps(value, default=str)))
        for child in value.values() if isinstance(value, dict) else value:
            _texts(child, out)
    elif len(str(value)) >= MIN_MASKED_LENGTH:
        out.add(repr(value))
        if isinstance(value, str):
            out.add(value)
            # Inside JSON quotes: non-ASCII as \uXXXX (or not), quotes and backslashes escaped.
            out.update(json.dumps(value, ensure_ascii=ascii)[1:-1] for ascii in (True, False))


def mask_values(data: Any) -> Any:
    """Return a copy of ``data`` with every value masked: keys and list lengths stay.

    For a payload whose ``redact`` list is unknown (its event is no longer declared).
    """
    if isinstance(data, dict):
        return {key: mask_values(value) for key, value in data.items()}
    if isinstance(data, list):
        return [mask_values(item) for item in data]
    return MASK
