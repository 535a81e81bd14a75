"""``@event``: dataclasses and pydantic models as event declarations."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import json
import re
import types
import typing
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django_events.exceptions import PayloadProblem
from django_events.wiring.declarations import EventDeclaration, Origin
from django_events.wiring.redaction import MASK, redacted_paths, under

T = TypeVar("T", bound=type)

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# Classes decorated with @event, in declaration order. Code declares events the way it
# registers admin classes; the registry reads this list when it is (re)built.
_declared: list[type] = []

ATTRIBUTE = "__django_event__"

_generation = 0


def generation() -> int:
    """Count of ``@event`` declarations so far: a registry built before a new one is stale."""
    return _generation


def event(
    name: str,
    *,
    description: str = "",
    durable: bool = True,
    redact: tuple[str, ...] = (),
    record: str | None = None,
    version: int = 1,
    upcast: dict[int, str] | None = None,
) -> Callable[[T], T]:
    """Declare a dataclass or pydantic model as the event ``name``.

    ``version`` and ``upcast`` (old version -> dotted path of ``f(payload) -> payload``)
    evolve its contract (docs/evolving.md).
    """
    if not NAME_RE.match(name):
        raise ValueError(f"Event name {name!r} must match [A-Za-z0-9_.-]+")
    if isinstance(version, bool) or version < 1:
        raise ValueError(f"@event({name!r}): version must be an integer >= 1, not {version!r}")

    def decorate(cls: T) -> T:
        if not (dataclasses.is_dataclass(cls) or is_pydantic(cls)):
            raise TypeError(f"@event({name!r}) needs a dataclass or a pydantic model, not {cls!r}")
        declaration = EventDeclaration(
            name=name,
            origin=Origin(f"@event {cls.__module__}.{cls.__qualname__}"),
            description=description or (cls.__doc__ or "").strip().split("\n")[0],
            schema=schema_for(cls),
            type_path=f"{cls.__module__}.{cls.__qualname__}",
            type=cls,
            durable=durable,
            redact=tuple(redact),
            record=record,
            version=version,
            upcast=dict(upcast or {}),
        )
        setattr(cls, ATTRIBUTE, declaration)
        # Re-importing a module (autoreload, tests) replaces the class instead of duplicating it.
        _declared[:] = [c for c in _declared if _qualified(c) != _qualified(cls)]
        _declared.append(cls)
        global _generation
        _generation += 1  # the registry is rebuilt on its next use
        return cls

    return decorate


def declared_event_types() -> list[type]:
    """Return the classes decorated with ``@event`` so far."""
    return list(_declared)


def declaration_of(cls: type) -> EventDeclaration | None:
    """Return the declaration attached by ``@event``, if any."""
    value = cls.__dict__.get(ATTRIBUTE)
    return value if isinstance(value, EventDeclaration) else None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_pydantic(cls: type) -> bool:
    return callable(getattr(cls, "model_json_schema", None)) and hasattr(cls, "model_validate")


def schema_for(cls: type) -> dict[str, Any]:
    """Derive the payload JSON Schema of a dataclass or pydantic model."""
    if is_pydantic(cls):
        schema: dict[str, Any] = cls.model_json_schema()  # type: ignore[attr-defined]
        return schema
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        what = _qualified(cls) if hasattr(cls, "__qualname__") else repr(cls)
        raise TypeError(f"{what} is not a dataclass or a pydantic model")
    return _dataclass_schema(cls)


def to_data(instance: Any) -> dict[str, Any]:
    """Turn a typed payload into its JSON form (a pydantic model's fields by name, computed
    ones included: what `redact`, `when` and stored records go by)."""
    if is_pydantic(type(instance)):
        data: dict[str, Any] = instance.model_dump(mode="json")
        return data
    return typing.cast(dict[str, Any], _jsonable(dataclasses.asdict(instance)))


def from_data(cls: type, data: dict[str, Any]) -> Any:
    """Build the typed payload handlers receive from its JSON form (raises ValueError or
    TypeError for data the class refuses: `problems_of` says where)."""
    if is_pydantic(cls):
        # Computed fields are computed again (a model with extra="forbid" refuses them);
        # fields are read by name as well as by alias (the JSON form has the names); JSON
        # mode, so that a strict model takes a datetime's ISO text.
        computed = cls.model_computed_fields  # type: ignore[attr-defined]
        given = {key: value for key, value in data.items() if key not in computed}
        return cls.model_validate_json(json.dumps(given), by_name=True)  # type: ignore[attr-defined]
    return _build(cls, data)


def problems_of(error: Exception) -> list[tuple[str, str]]:
    """(JSON path, message) of each problem ``from_data`` raised ``error`` for."""
    errors = getattr(error, "errors", None)
    if not callable(errors):  # a dataclass's constructor or __post_init__
        return [("$", f"{type(error).__name__}: {error}")]
    return [
        ("".join(["$", *(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])]), e["msg"])
        for e in errors()
    ]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):  # keys as JSON writes them: dict[int, str] has "1", not 1
        return {
            k if isinstance(k, str) else str(_jsonable(k)): _jsonable(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    return value


_SIMPLE: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    Any: {},
    datetime.datetime: {"type": "string", "format": "date-time"},
    datetime.date: {"type": "string", "format": "date"},
    datetime.time: {"type": "string", "format": "time"},
    uuid.UUID: {"type": "string", "format": "uuid"},
    decimal.Decimal: {"type": "string"},
}


def _dataclass_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        properties[f.name] = _type_schema(hints[f.name])
        given = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.init and not given:  # an init=False field is set by the class itself
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _type_schema(tp: Any) -> dict[str, Any]:
    if tp in _SIMPLE:
        return dict(_SIMPLE[tp])
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass_schema(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: fixed items
        items = [_type_schema(a) for a in args]
        return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        item = _type_schema(args[0]) if args else {}
        return {"type": "array", "items": item}
    if origin is dict or tp is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if args else {}}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    raise TypeError(f"Cannot derive a JSON Schema for {tp!r}; use a pydantic model instead")


# The inverse of _jsonable for the types _SIMPLE describes as strings.
_PARSERS: dict[Any, Callable[[str], Any]] = {
    datetime.datetime: datetime.datetime.fromisoformat,
    datetime.date: datetime.date.fromisoformat,
    datetime.time: datetime.time.fromisoformat,
    uuid.UUID: uuid.UUID,
    decimal.Decimal: decimal.Decimal,
}


# What a string of each parsed type must be, for the messages of `unparsed`.
_EXPECTED: dict[Any, str] = {
    datetime.datetime: "an ISO 8601 date and time",
    datetime.date: "an ISO 8601 date (YYYY-MM-DD)",
    datetime.time: "an ISO 8601 time",
    uuid.UUID: "a UUID",
    decimal.Decimal: "a decimal number",
}


def unparsed(cls: type, data: dict[str, Any], redact: Iterable[str] = ()) -> list[PayloadProblem]:
    """Report each string of a dataclass's JSON form ``data`` that does not parse as its
    field's declared type (``datetime``, ``date``, ``time``, ``UUID``, ``Decimal``).

    The schema says "a string" (its ``format`` is not asserted) and a dataclass does not
    check its fields, so ``publish()`` asks this: a handler must get the declared type.
    A message does not quote the value at (or inside) a ``redact`` path.
    """
    check = _checker(cls) if dataclasses.is_dataclass(cls) else None  # pydantic checks its own
    if check is None:  # no field of those types: nothing to walk
        return []
    found: list[_Unparsed] = []
    check(data, (), found)
    if not found:
        return []
    from django_events.wiring.manifest import format_path  # yaml and jsonschema: not at import

    paths = redacted_paths(redact)
    return [PayloadProblem(format_path(u.path), u.message(paths)) for u in found]


_Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class _Unparsed:
    path: _Path  # a dict key's is its dict's
    text: str
    what: str  # what it is not
    key: bool = False

    def message(self, redacted: list[tuple[str, ...]]) -> str:
        shown = MASK if under(self.path, redacted) else self.text
        return f"{'key ' if self.key else ''}{shown!r} is not {self.what}"


_Check = Callable[[Any, _Path, list[_Unparsed]], None]


@functools.cache  # built once per type: publish() walks only the fields that need it
def _checker(tp: Any) -> _Check | None:
    """What checks the JSON form of a ``tp`` value as `_build` reads it; None if nothing."""
    if tp in _PARSERS:
        return functools.partial(_check_text, _PARSERS[tp], _EXPECTED[tp])
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if "__pydantic_validator__" in tp.__dict__:
            return None  # a pydantic dataclass: pydantic checks its fields, more leniently
        hints = typing.get_type_hints(tp)
        # Not the init=False fields: the class computes them (_build leaves them out).
        fields = [f.name for f in dataclasses.fields(tp) if f.init]
        checks = [(name, c) for name in fields if (c := _checker(hints[name])) is not None]
        return functools.partial(_check_fields, tuple(checks)) if checks else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        # Several options: _build keeps the JSON form as it is.
        return _checker(options[0]) if len(options) == 1 else None
    if origin is dict and len(args) == 2:
        keys, values = _checker(args[0]), _checker(args[1])
        return functools.partial(_check_dict, keys, values) if keys or values else None
    if origin is tuple and args and args[-1] is not Ellipsis:
        items = tuple(_checker(a) for a in args)
        return functools.partial(_check_fixed, items) if any(items) else None
    if origin in (list, tuple, set, frozenset) and args:
        item = _checker(args[0])
        return functools.partial(_check_items, item) if item else None
    return None


def _check_text(
    parse: Callable[[str], Any], what: str, value: Any, path: _Path, found: list[_Unparsed]
) -> None:
    if isinstance(value, str):
        try:
            parse(value)
        except (ValueError, ArithmeticError):  # decimal.InvalidOperation: an ArithmeticError
            found.append(_Unparsed(path, value, what))


def _check_fields(
    checks: tuple[tuple[str, _Check], ...], value: Any, path: _Path, found: list[_Unparsed]
) -> None:
    if isinstance(value, dict):
        for name, check in checks:
            if name in value:
                check(value[name], (*path, name), found)


def _check_dict(
    keys: _Check | None, values: _Check | None, value: Any, path: _Path, found: list[_Unparsed]
) -> None:
    if not isinstance(value, dict):
        return
    for name, item in value.items():
        if keys is not None:
            wrong: list[_Unparsed] = []
            keys(name, path, wrong)
            found.extend(dataclasses.replace(u, key=True) for u in wrong)
        if values is not None:
            values(item, (*path, name), found)


def _check_fixed(
    items: tuple[_Check | None, ...], value: Any, path: _Path, found: list[_Unparsed]
) -> None:
    if isinstance(value, list) and len(value) == len(items):
        for index, (check, item) in enumerate(zip(items, value, strict=True)):
            if check is not None:
                check(item, (*path, index), found)


def _check_items(item: _Check, value: Any, path: _Path, found: list[_Unparsed]) -> None:
    if isinstance(value, list):
        for index, element in enumerate(value):
            item(element, (*path, index), found)


def _build(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}  # the others are computed
        return tp(**{k: _build(hints[k], v) for k, v in value.items() if k in names})
    parse = _PARSERS.get(tp)
    if parse is not None and isinstance(value, str):
        try:
            return parse(value)
        except (ValueError, ArithmeticError):  # the schema let it through: keep the string
            return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _build(options[0], value) if value is not None and len(options) == 1 else value
    if not isinstance(value, list):
        if origin is dict and len(args) == 2 and isinstance(value, dict):
            return {_key(args[0], k): _build(args[1], v) for k, v in value.items()}
        return value
    if origin is tuple and args and args[-1] is not Ellipsis and len(args) == len(value):
        return tuple(_build(a, v) for a, v in zip(args, value, strict=True))
    if origin in (list, tuple, set, frozenset) or tp in (tuple, set, frozenset):
        container = origin or tp
        return container(_build(args[0], v) for v in value) if args else container(value)
    return value


def _key(tp: Any, key: str) -> Any:
    """A dict key of type ``tp`` from its JSON text (``_jsonable`` wrote it with str())."""
    if tp is int:
        try:
            return int(key)
        except ValueError:  # the schema let it through: keep the text
            return key
    return _build(tp, key)
