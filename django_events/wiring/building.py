"""Building the registry: read settings, manifests and ``@event`` classes; compile them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, date
from difflib import get_close_matches
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

from django.apps import apps
from django.conf import settings
from django.utils.module_loading import import_string
from jsonschema import SchemaError

from django_events.conf import DEFAULTS, conf
from django_events.wiring import typed
from django_events.wiring.compiled import CompiledEvent, Registry, Subscription
from django_events.wiring.declarations import (
    ENDPOINT_PREFIX,
    SOURCE_AUTH_KINDS,
    EventDeclaration,
    Origin,
    Problem,
    RetryPolicy,
    SourceDeclaration,
    SubscriptionDeclaration,
)
from django_events.wiring.filters import (
    OPERATORS,
    FilterError,
    comparisons,
    compile_filter,
)
from django_events.wiring.manifest import Manifest, load_manifest, parse_settings
from django_events.wiring.validation import PayloadValidator

SETTINGS_ORIGIN = Origin("settings", "settings.DJANGO_EVENTS")


def manifest_paths() -> list[Path]:
    """Explicit manifests, then each installed app's ``events.yaml`` (with AUTODISCOVER)."""
    paths = list(conf.MANIFESTS)
    if conf.AUTODISCOVER:
        for app_config in apps.get_app_configs():
            candidate = Path(app_config.path) / "events.yaml"
            if candidate.is_file():
                paths.append(candidate)
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def build_registry() -> Registry:
    """Read every source and compile the registry, collecting problems instead of raising.

    A manifest with a schema error (E103) declares nothing; the checks read ``checked``, a
    registry with its declarations that match the schema, to report their problems too.
    """
    paths = manifest_paths()
    manifests = [load_manifest(path) for path in paths]
    manifests.append(parse_settings(conf.EVENTS, conf.SUBSCRIPTIONS))
    used = [m if not m.rejected else Manifest(problems=m.problems) for m in manifests]
    registry = _compile(paths, used)
    if any(m.rejected for m in manifests):
        registry.checked = _compile(paths, manifests)
    return registry


def _compile(paths: list[Path], manifests: list[Manifest]) -> Registry:
    registry = Registry(clock=UTC if settings.USE_TZ else None)
    registry.sources.extend(str(path) for path in paths)
    problems = registry.problems
    problems.extend(settings_problems())
    event_decls = [d for m in manifests for d in m.events]
    event_decls += [d for c in typed.declared_event_types() if (d := typed.declaration_of(c))]
    for manifest in manifests:
        problems.extend(manifest.problems)
    left_out = _compile_events(registry, event_decls)
    for manifest in manifests:  # declared, but left out for a schema error
        left_out.update(dict.fromkeys(manifest.left_out, "E103"))
    _compile_subscriptions(registry, [s for m in manifests for s in m.subscriptions], left_out)
    _compile_sources(registry, [s for m in manifests for s in m.sources])
    registry.interceptors = _load_interceptors(problems)
    return registry


def settings_problems() -> list[Problem]:
    """Check the shape of ``DJANGO_EVENTS`` itself (against its JSON Schema)."""
    return [
        _problem("W001", p.message, _known_key_hint(p.key), SETTINGS_ORIGIN)
        if p.unknown
        else _problem("E001", p.message, p.hint, SETTINGS_ORIGIN)
        for p in conf.problems
    ]


def _known_key_hint(key: object) -> str:
    """The known key an unknown one is most likely a typo of (``MANIFEST``), or all of them."""
    by_upper = {known.upper(): known for known in DEFAULTS}
    close = get_close_matches(str(key).upper(), by_upper, n=1)
    if close:
        return f"Did you mean {by_upper[close[0]]!r}?"
    return f"Known keys: {', '.join(sorted(DEFAULTS))}."


def _compile_events(registry: Registry, declarations: list[EventDeclaration]) -> dict[str, str]:
    """Compile the events into ``registry``; the names of those left out for an error, with
    the error's code."""
    seen: dict[str, EventDeclaration] = {}
    left_out: dict[str, str] = {}
    for declaration in declarations:
        if declaration.name in seen:
            first = seen[declaration.name].origin
            registry.problems.append(
                _problem(
                    "E106",
                    f"Event {declaration.name!r} is declared twice (also at {first})",
                    "Keep one declaration; names are global.",
                    declaration.origin,
                )
            )
            continue
        seen[declaration.name] = declaration
        declaration = _with_type(declaration, registry.problems)
        registry.problems.extend(_upcast_problems(declaration))
        schema = declaration.schema if declaration.schema is not None else {"type": "object"}
        try:
            validator = PayloadValidator(schema)
        except SchemaError as exc:
            where = "schema" + exc.json_path.removeprefix("$")  # e.g. schema.properties.id.type
            registry.problems.append(
                _problem(
                    "E104",
                    f"Event {declaration.name!r} has an invalid payload schema at {where}: "
                    f"{exc.message}",
                    "The schema must be valid JSON Schema (2020-12).",
                    declaration.origin,
                )
            )
            left_out[declaration.name] = "E104"
            continue
        registry.problems.extend(_redact_problems(declaration, schema))
        registry.events[declaration.name] = CompiledEvent(declaration, validator)
    return left_out


def _redact_problems(declaration: EventDeclaration, schema: object) -> list[Problem]:
    """Each ``redact`` path is declared by the schema (where it lists its properties): a
    misspelt one masks nothing, and the value meant is shown.

    A warning: an open object may carry keys it does not declare. Not for pydantic types,
    whose schema speaks of aliases where the payload (``redact`` goes by it) has names.
    """
    if _is_pydantic(declaration):
        return []
    problems = []
    for path in declaration.redact:
        declared, _, close = declared_path(schema, path, lists="each")
        if declared is not False:
            continue
        fix = "Name a property the schema declares (dots for nesting): a"
        problems.append(
            _problem(
                "W112",
                f"Event {declaration.name!r}: redact path {path!r} is not declared by its schema",
                (f"Did you mean {close!r}? A" if close else fix)
                + " misspelt path masks nothing, and the value it meant is shown.",
                declaration.origin,
            )
        )
    return problems


def _upcast_problems(declaration: EventDeclaration) -> list[Problem]:
    """Each upcaster upgrades a version older than the declared one."""
    version = declaration.version
    if version == 1:
        hint = "Version 1 has no older version to upcast: bump 'version', or remove the key."
    else:
        older = "1" if version == 2 else f"1 to {version - 1}"
        hint = f"Key upcasters by the version they upgrade from ({older})."
    return [
        _problem(
            "E130",
            f"Event {declaration.name!r} is version {version}: "
            f"upcast key {key!r} is not an older version",
            hint,
            declaration.origin,
        )
        for key in sorted(declaration.upcast)
        if not 1 <= key < version
    ]


def _with_type(declaration: EventDeclaration, problems: list[Problem]) -> EventDeclaration:
    """Resolve a manifest's ``type:`` dotted path into a class and a derived schema."""
    if declaration.type is not None or declaration.type_path is None:
        return declaration

    try:
        cls = import_string(declaration.type_path)
        schema = typed.schema_for(cls)
    except (ImportError, TypeError) as exc:
        problems.append(
            _problem(
                "E109",
                f"Event {declaration.name!r}: type {declaration.type_path!r} is unusable: {exc}",
                "Point 'type' at a dataclass or a pydantic model.",
                declaration.origin,
            )
        )
        return declaration
    return replace(declaration, type=cls, schema=schema)


def _compile_subscriptions(
    registry: Registry, declarations: list[SubscriptionDeclaration], left_out: dict[str, str]
) -> None:
    problems = registry.problems
    default_retry = conf.DEFAULT_RETRY
    by_mode: dict[str, dict[str, list[Subscription]]] = {n: {} for n in registry.events}
    for declaration in declarations:
        if declaration.name in registry.subscriptions:
            other = registry.subscriptions[declaration.name].declaration.origin
            problems.append(
                _problem(
                    "E107",
                    f"Subscription {declaration.name!r} is declared twice (also at {other})",
                    "Give one of them a distinct 'name'.",
                    declaration.origin,
                )
            )
            continue
        if declaration.name.startswith(ENDPOINT_PREFIX):
            problems.append(
                _problem(
                    "E323",
                    f"Subscription {declaration.name!r}: names starting {ENDPOINT_PREFIX!r} "
                    "belong to webhook endpoints",
                    "Give it another 'name'.",
                    declaration.origin,
                )
            )
            continue
        targets = _matching_events(declaration, registry.events)
        if not targets and declaration.event in left_out:
            code = left_out[declaration.event]
            problems.append(
                _problem(
                    "E105",
                    f"Subscription {declaration.name!r} subscribes to event "
                    f"{declaration.event!r}, which is left out for its own error ({code})",
                    "Fix that event's "
                    + ("schema" if code == "E104" else "declaration")
                    + ": this error then goes away.",
                    declaration.origin,
                )
            )
            continue
        # A pattern that matches only events left out for their own errors (E103, E104)
        # matches declared events: their errors say what is wrong, not W101.
        if not targets and not _matching_events(declaration, left_out):
            code, what = (
                ("W101", "pattern matches no declared event")
                if declaration.is_pattern
                else ("E105", "subscribes to an undeclared event")
            )
            problems.append(
                _problem(
                    code,
                    f"Subscription {declaration.name!r} {what}: {declaration.event!r}",
                    "Declare the event in a manifest, in settings or with @event.",
                    declaration.origin,
                )
            )
            if not declaration.is_pattern:
                continue
        try:
            accepts = compile_filter(declaration.when) if declaration.when is not None else None
        except FilterError as exc:
            problems.append(
                _problem(
                    "E108",
                    f"Subscription {declaration.name!r}: {exc}",
                    "See the filter reference in the docs.",
                    declaration.origin,
                )
            )
            continue
        if declaration.when is not None:
            matched = [registry.events[n] for n in targets]
            problems.extend(_object_comparisons(declaration, matched))
            problems.extend(_when_field_problems(declaration, matched))
        if declaration.mode not in ("async", "webhook"):
            async_only = ("queue", "retry", "timeout", "give_up_after")
            ignored = [k for k in async_only if getattr(declaration, k)]
            ignored += ["broadcast"] if declaration.broadcast else []
            if ignored:
                keys = " and ".join(filter(None, (", ".join(ignored[:-1]), ignored[-1])))
                apply, them = ("applies", "it") if len(ignored) == 1 else ("apply", "them")
                problems.append(
                    _problem(
                        "W102",
                        f"Subscription {declaration.name!r} is {declaration.mode}: "
                        f"{keys} only {apply} to async subscriptions",
                        f"Remove {them} or use mode: async.",
                        declaration.origin,
                    )
                )
        if declaration.mode == "async" and declaration.broadcast:
            problems.extend(_broadcast_problems(declaration))
        if declaration.ordering_key is not None:
            problems.extend(_ordering_problems(declaration, [registry.events[n] for n in targets]))
        # Both are schema-checked (no other keys); an invalid DEFAULT_RETRY reads as the default.
        retry = RetryPolicy(**{**default_retry, **(declaration.retry or {})})
        queue = declaration.queue or conf.DEFAULT_QUEUE
        subscription = Subscription(declaration, retry, accepts, queue)
        subscription.via = declaration.via or conf.DELIVERY
        registry.subscriptions[declaration.name] = subscription
        for name in targets:
            by_mode[name].setdefault(declaration.mode, []).append(subscription)
    for name, compiled in registry.events.items():
        modes = by_mode[name]
        compiled.inline = tuple(modes.get("inline", ()))
        compiled.sync = tuple(modes.get("sync", ()))
        # A webhook is sent by the worker: it travels as an async delivery does.
        queued = (*modes.get("async", ()), *modes.get("webhook", ()))
        compiled.async_ = tuple(s for s in queued if s.via != "tasks")
        compiled.tasks = tuple(s for s in queued if s.via == "tasks")


# Options of a source that mean something only for some kinds of auth (ignored elsewhere).
SOURCE_OPTIONS_FOR: dict[str, tuple[str, ...]] = {"tolerance": ("stripe", "hmac")}


def _compile_sources(registry: Registry, declarations: list[SourceDeclaration]) -> None:
    for declaration in declarations:
        name, origin = declaration.name, declaration.origin
        if name in registry.inbound_sources:
            first = registry.inbound_sources[name].origin
            registry.problems.append(
                _problem(
                    "E314",
                    f"Source {name!r} is declared twice (also at {first})",
                    "Keep one declaration; source names are global.",
                    origin,
                )
            )
            continue
        if declaration.auth not in SOURCE_AUTH_KINDS:
            registry.problems.append(
                _problem(
                    "E310",
                    f"Source {name!r}: unknown auth {declaration.auth!r}",
                    f"Use one of: {', '.join(SOURCE_AUTH_KINDS)}.",
                    origin,
                )
            )
            continue
        registry.problems.extend(
            _problem(
                "E311",
                f"Source {name!r} maps {kind!r} to an undeclared event: {event!r}",
                "Declare the event in a manifest, in settings or with @event.",
                origin,
            )
            for kind, event in sorted(declaration.events.items())
            if event not in registry.events
        )
        ignored = [
            option
            for option, kinds in SOURCE_OPTIONS_FOR.items()
            if option in declaration.options and declaration.auth not in kinds
        ]
        if ignored:
            registry.problems.append(
                _problem(
                    "W310",
                    f"Source {name!r}: {', '.join(ignored)} has no effect with auth: "
                    f"{declaration.auth}",
                    "Remove it, or change 'auth'.",
                    origin,
                )
            )
        registry.inbound_sources[name] = declaration


def _broadcast_problems(declaration: SubscriptionDeclaration) -> list[Problem]:
    problems = []
    if declaration.idempotent:
        problems.append(
            _problem(
                "E111",
                f"Subscription {declaration.name!r} is broadcast and idempotent: "
                "idempotent allows one successful run per event, broadcast one per worker",
                "Remove one of them.",
                declaration.origin,
            )
        )
    if declaration.retry:
        problems.append(
            _problem(
                "W110",
                f"Subscription {declaration.name!r} is broadcast: its retry policy is ignored "
                "(a copy that fails is recorded, not retried)",
                "Remove retry, or make the handler retry what it needs itself.",
                declaration.origin,
            )
        )
    return problems


# Modes whose deliveries a worker runs, one message each: those an ordering gate can hold
# (a webhook is sent by the worker: the same claim / finish / release around its POST).
ORDERED_MODES = ("async", "webhook")


def _ordering_problems(
    declaration: SubscriptionDeclaration, events: list[CompiledEvent]
) -> list[Problem]:
    """``ordering_key``: a worker-run, non-broadcast subscription, a path every event has."""
    name, path = declaration.name, declaration.ordering_key
    assert path is not None
    if declaration.mode not in ORDERED_MODES:
        return [
            _problem(
                "E160",
                f"Subscription {name!r} is {declaration.mode}: ordering_key needs mode async "
                "or webhook",
                "Use mode: async, or remove ordering_key (sync handlers already run in order "
                "per process).",
                declaration.origin,
            )
        ]
    if declaration.broadcast:
        return [
            _problem(
                "E161",
                f"Subscription {name!r} is broadcast: ordering_key cannot order its copies",
                "Remove broadcast or ordering_key.",
                declaration.origin,
            )
        ]
    problems = []
    for compiled in events:
        found = schema_path(compiled.declaration.schema, path)
        if found is None:
            problems.append(
                _problem(
                    "E162",
                    f"Subscription {name!r}: ordering_key {path!r} is not in the schema "
                    f"of event {compiled.name!r}",
                    "Name a property the event's schema declares (dots for nesting).",
                    declaration.origin,
                )
            )
        elif not found:
            problems.append(
                _problem(
                    "W160",
                    f"Subscription {name!r}: ordering_key {path!r} is optional in event "
                    f"{compiled.name!r}; events without it share one key",
                    "Make the property required, or accept that those events run in one line.",
                    declaration.origin,
                )
            )
    return problems


def _object_comparisons(
    declaration: SubscriptionDeclaration, events: list[CompiledEvent]
) -> list[Problem]:
    """A ``when`` key compared with an object where the event's schema says the value is no
    object: never true, most likely an operator misspelt (``{gtee: 1000}``). Under a ``not``,
    the filter then always matches."""
    assert declaration.when is not None
    problems = []
    for path, op, value, negated in comparisons(declaration.when):
        if op is not None or not isinstance(value, Mapping):
            continue  # an operator, or a plain value that is no object: W114's
        outcome = "it always matches" if negated else "it never matches"
        for compiled in events:
            types = _declared_types_at(compiled.declaration, path)
            if types is None or "object" in types:
                continue  # not declared (W113's), or nothing told: it may be an object
            shown = " or ".join(types)
            if _is_pydantic(compiled.declaration):
                shown += " (in the JSON form of an instance)"
            problems.append(
                _problem(
                    "W108",
                    f"Subscription {declaration.name!r}: {_where(path, None, negated)} "
                    f"compares with the object {json.dumps(value, default=str)}, but event "
                    f"{compiled.name!r} declares {path!r} as {shown}: {outcome}",
                    f"A misspelt operator? They are {', '.join(OPERATORS)}; a mapping with "
                    "none of them is a plain value.",
                    declaration.origin,
                )
            )
    return problems


def _declared_types_at(declaration: EventDeclaration, path: str) -> list[str] | None:
    """The JSON types the schema of what ``when`` sees declares at ``path``, found as the
    filter finds it (``items.0.sku``, ``patternProperties``); None if it tells none."""
    schema = _filtered_schema(declaration)
    found = declared_path(schema, path, lists="index")
    return _declared_types(schema, found.schema) if found.declared else None


def _when_field_problems(
    declaration: SubscriptionDeclaration, events: list[CompiledEvent]
) -> list[Problem]:
    """A ``when`` field no event's schema declares (W113), or compared with a value of a type
    its schema rules out (W114). For a pattern, only where no event it matches could match:
    a filter may pick the events that have the field, or whose type suits the value."""
    assert declaration.when is not None
    schemas = {c.name: _filtered_schema(c.declaration) for c in events}
    by_path: dict[str, list[tuple[str | None, Any, bool]]] = {}
    for path, op, expected, negated in comparisons(declaration.when):
        by_path.setdefault(path, []).append((op, expected, negated))
    problems: list[Problem] = []
    for path, compared in by_path.items():
        found = [(c, declared_path(schemas[c.name], path, lists="index")) for c in events]
        missing = [(c, d.close) for c, d in found if d.declared is False]
        # Not where an event declares the field or tells nothing of it (no schema): it may be there.
        if missing and len(missing) == len(found):
            problems.append(_undeclared_field(declaration, path, compared, missing))
        for op, expected, negated in compared:
            problems += _type_problems(declaration, schemas, path, op, expected, negated, found)
    return problems


def _filtered_schema(declaration: EventDeclaration) -> object:
    """The schema of what ``when`` sees: the payload's JSON form. For a pydantic type, that of
    an instance (``model_dump(mode="json")``: fields by name, or by alias where the model has
    ``serialize_by_alias``, computed ones included, a ``Decimal`` as a string), not the schema
    it validates input with (aliases, numbers)."""
    tp = declaration.type
    if tp is None or not typed.is_pydantic(tp):
        return declaration.schema
    from pydantic.errors import PydanticUserError  # only here: pydantic is an optional extra

    # As typed.to_data dumps it: model_dump() follows the model's serialize_by_alias (2.11+).
    by_alias = bool(tp.model_config.get("serialize_by_alias", False))  # type: ignore[attr-defined]
    try:
        schema: object = tp.model_json_schema(mode="serialization", by_alias=by_alias)  # type: ignore[attr-defined]
    except PydanticUserError:  # a type with no JSON Schema in serialization mode: as declared
        return declaration.schema
    return schema


def _is_pydantic(declaration: EventDeclaration) -> bool:
    return declaration.type is not None and typed.is_pydantic(declaration.type)


def _missing_outcome(op: str | None, expected: Any, negated: bool) -> str:
    """What a comparison does with a field absent from the payload (filters.OPERATORS), as
    the filter sees it: under a ``not``, the other way."""
    always = op in ("ne", "not_in") or (op == "exists" and expected is False)
    return "always" if always != negated else "never"


def _where(path: str, op: str | None, negated: bool) -> str:
    """``when.total.gte``, or ``when.not.total.gte`` for a comparison under a ``not``."""
    return "when." + ("not." if negated else "") + path + (f".{op}" if op else "")


def _undeclared_field(
    declaration: SubscriptionDeclaration,
    path: str,
    compared: list[tuple[str | None, Any, bool]],
    missing: list[tuple[CompiledEvent, str | None]],
) -> Problem:
    names = ", ".join(sorted(repr(c.name) for c, _ in missing))
    close = missing[0][1] if len(missing) == 1 else None
    outcomes: dict[str, dict[str, None]] = {"always": {}, "never": {}}
    for op, expected, negated in compared:
        where = _where(path, op, negated)
        where += f": {json.dumps(expected)}" if op == "exists" else ""
        outcomes[_missing_outcome(op, expected, negated)][where] = None
    if outcomes["always"] or any(negated for _, _, negated in compared):
        # Name each comparison: under a `not`, what it does is not what the filter does.
        said = [f"{', '.join(w)} {does} match" for does, w in outcomes.items() if w]
        outcome = f" makes {' and '.join(said)}."
    else:
        outcome = " never matches."
    fix = "Fix the field (dots for nesting), or declare it in the schema."
    return _problem(
        "W113",
        f"Subscription {declaration.name!r}: when field {path!r} is not declared "
        f"by the schema of event{'s' if len(missing) > 1 else ''} {names}",
        (f"Did you mean {close!r}?" if close else fix)
        + " A field that is never in the payload"
        + outcome,
        declaration.origin,
    )


# Operators whose value is compared with the payload's value as it is (``in``: each item).
_TYPED_OPERATORS = (None, "eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains")
_ORDERED = ("gt", "gte", "lt", "lte")


def _type_problems(
    declaration: SubscriptionDeclaration,
    schemas: dict[str, object],
    path: str,
    op: str | None,
    expected: Any,
    negated: bool,
    found: list[tuple[CompiledEvent, Declared]],
) -> list[Problem]:
    """W114 for each value of a comparison that no matched event's declared type admits (an
    event without the field admits none: ``W113``'s; one whose schema tells nothing, all).
    Under a ``not``, what the filter then does is the other way round (an item of ``in`` that
    never matches still never does: the others decide)."""
    if op not in _TYPED_OPERATORS or (op is None and isinstance(expected, dict)):
        return []  # exists; an object compared for equality is W108's
    values = list(expected) if op in ("in", "not_in") and isinstance(expected, list) else [expected]
    ruled_out: dict[int, list[tuple[CompiledEvent, str]]] = {i: [] for i in range(len(values))}
    for compiled, d in found:
        if d.declared is False:
            continue
        allowed = _allowed_types(schemas[compiled.name], d.schema, op) if d.declared else None
        if allowed is not None and _is_pydantic(compiled.declaration):
            # A dict published by name is filtered as given: its number is not a string.
            allowed = (allowed[0], f"{allowed[1]} (in the JSON form of an instance)")
        for i in list(ruled_out):
            if allowed is not None and not _json_types(values[i]) & allowed[0]:
                ruled_out[i].append((compiled, allowed[1]))
            else:
                del ruled_out[i]  # this event admits it: the filter may match
        if not ruled_out:
            return []
    if op in ("in", "not_in"):
        outcome = "that item never matches"
    else:
        outcome = "it always matches" if (op == "ne") != negated else "it never matches"
    where = _where(path, op, negated)
    problems = []
    for i, events in ruled_out.items():
        by_types: dict[str, list[str]] = {}
        for compiled, shown_types in events:
            by_types.setdefault(shown_types, []).append(repr(compiled.name))
        for shown_types, names in by_types.items():
            declare = (
                f"event {names[0]} declares"
                if len(names) == 1
                else f"events {', '.join(sorted(names))} declare"
            )
            problems.append(
                _problem(
                    "W114",
                    f"Subscription {declaration.name!r}: {where} compares with "
                    f"{_shown(values[i])}, but {declare} {path!r} as {shown_types}: {outcome}",
                    _type_hint(path, op, values[i], shown_types),
                    declaration.origin,
                )
            )
    return problems


def _allowed_types(root: object, declared: object, op: str | None) -> tuple[set[str], str] | None:
    """The JSON types a value compared by ``op`` may have, and how to show the declared ones;
    None if the schema tells nothing."""
    types = _declared_types(root, declared)
    shown_types = " or ".join(types or ())
    if op == "contains":  # an item of an array, or a part of a string
        items = declared.get("items") if isinstance(declared, dict) else None
        if types == ["array"] and isinstance(items, dict):
            types = _declared_types(root, _local_ref(root, items))
            shown_types = f"array of {' or '.join(types or ())}"
        elif types != ["string"]:
            return None
    if not types:
        return None
    allowed = set(types)
    if op in _ORDERED and "integer" in allowed:
        allowed.add("number")  # count >= 1.5 is a fine question about an integer
    return allowed, shown_types


def _type_hint(path: str, op: str | None, value: Any, shown_types: str) -> str:
    if op in _ORDERED and shown_types.startswith("string") and _json_types(value) & {"number"}:
        # Written as a string, the value would be compared as text: "999" > "1000".
        return (
            f"The payload holds {path!r} as a string (as a Decimal's JSON form): {op} compares "
            "strings as text, not as numbers. Compare in the handler, or add a number field."
        )
    return (
        'Write the value as the declared type: in YAML, 1000 is a number, "1000" a '
        "string, and an unquoted date is a date (quote it)."
    )


def _declared_types(root: object, schema: object) -> list[str] | None:
    """The JSON types a property's schema declares (``type``, or those of each branch of an
    ``anyOf``/``oneOf``: ``Decimal | None``), or None if it says none."""
    types = schema.get("type") if isinstance(schema, dict) else None
    types = [types] if isinstance(types, str) else types
    if isinstance(types, list) and types:
        return [str(t) for t in types]
    for keyword in ("anyOf", "oneOf"):
        branches = schema.get(keyword) if isinstance(schema, dict) else None
        if isinstance(branches, list) and branches:
            each = [_declared_types(root, _local_ref(root, b)) for b in branches]
            if all(each):
                return list(dict.fromkeys(t for branch in each if branch for t in branch))
    return None


def _json_types(value: Any) -> set[str]:
    """The JSON types ``value`` matches (1 is an integer and a number, 1.0 both too)."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number", "integer"} if value.is_integer() else {"number"}
    if isinstance(value, str):
        return {"string"}
    if isinstance(value, list | tuple):
        return {"array"}
    if isinstance(value, dict):
        return {"object"}
    return set()  # a YAML date or timestamp: no JSON value equals it


_KINDS = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))


def _shown(value: Any) -> str:
    """``value`` as the filter gives it, with its JSON type: ``"1000" (string)``."""
    if isinstance(value, date):
        return f"{value.isoformat()} (a YAML date)"
    kind = next((k for t, k in _KINDS if isinstance(value, t)), "null" if value is None else "")
    return f"{json.dumps(value, default=str)} ({kind or type(value).__name__})"


class Declared(NamedTuple):
    """Whether a schema declares a payload path: True, False (not among the properties a
    step's schema lists), or None (a step's schema lists none: nothing can be told)."""

    declared: bool | None
    schema: object = None  # declared: the path's own schema
    close: str | None = None  # not declared: the close path a misspelling may have meant


def declared_path(schema: object, path: str, *, lists: str) -> Declared:
    """Whether ``schema`` declares the payload path ``path`` (dots for nesting; ``$ref``s,
    ``patternProperties`` and the properties of ``allOf``/``anyOf``/``oneOf`` branches
    followed). ``lists``: how a path goes through an array: ``"each"`` reaches into each item
    (``redact``), ``"index"`` takes a number (``when``: ``items.0.sku``).
    """
    root, done = schema, []
    for step in path.split("."):
        schema = _local_ref(root, schema)
        if lists == "each":
            while isinstance(schema, dict) and isinstance(schema.get("items"), dict):
                schema = _local_ref(root, schema["items"])
        elif step.isdigit() and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
            schema = schema["items"]
            done.append(step)
            continue
        if not isinstance(schema, dict):
            return Declared(None)
        properties = _listed_properties(root, schema)
        patterns = schema.get("patternProperties")
        patterns = patterns if isinstance(patterns, dict) else {}
        if step in properties:
            schema = properties[step]
        elif matching := [p for p in patterns if _matches(p, step)]:
            schema = patterns[matching[0]]
        elif not properties and not patterns:
            return Declared(None)
        else:
            close = get_close_matches(step, properties, n=1)
            return Declared(False, close=".".join([*done, close[0]]) if close else None)
        done.append(step)
    return Declared(True, _local_ref(root, schema))


def _listed_properties(root: object, schema: dict[str, Any]) -> dict[str, Any]:
    """``properties``, with those of its ``allOf``/``anyOf``/``oneOf`` branches."""
    listed = dict(schema.get("properties") or {})
    for keyword in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(keyword) or ():
            branch = _local_ref(root, branch)
            if isinstance(branch, dict) and isinstance(branch.get("properties"), dict):
                listed = {**branch["properties"], **listed}
    return listed


def _matches(pattern: str, key: str) -> bool:
    try:
        return re.search(pattern, key) is not None
    except re.error:  # not Python's flavour of regex: as if it matched (nothing told)
        return True


def schema_path(schema: object, path: str) -> bool | None:
    """Whether ``schema`` declares ``path`` (its ``properties``, dots for nesting): None if
    not, False if some step is optional, True if it is required all the way."""
    root, required = schema, True
    for step in path.split("."):
        schema = _local_ref(root, schema)
        if not isinstance(schema, dict):
            return None
        properties = schema.get("properties")
        if not isinstance(properties, dict) or step not in properties:
            return None
        required = required and step in (schema.get("required") or ())
        schema = properties[step]
    return required


def _local_ref(root: object, schema: object) -> object:
    """Follow a ``{"$ref": "#/$defs/X"}`` (typed events' nested classes) within ``root``."""
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str) and ref.startswith("#/") and isinstance(root, dict):
        target: object = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return target
    return schema


def _matching_events(declaration: SubscriptionDeclaration, events: Iterable[str]) -> list[str]:
    if declaration.is_pattern:
        return [name for name in events if fnmatchcase(name, declaration.event)]
    return [declaration.event] if declaration.event in events else []


def _load_interceptors(problems: list[Problem]) -> list[Any]:
    interceptors = []
    for path in conf.PIPELINE:
        try:
            target = import_string(path)
        except ImportError as exc:
            problems.append(
                _problem(
                    "E002", f"PIPELINE entry {path!r} does not import: {exc}", None, SETTINGS_ORIGIN
                )
            )
            continue
        try:
            interceptor = target() if isinstance(target, type) else target
        except Exception as exc:  # noqa: BLE001 - reported as a check, the entry left out
            interceptor, reason = None, f"{type(exc).__name__}: {exc}"
        else:
            missing = [m for m in ("send", "handle") if not callable(getattr(interceptor, m, None))]
            reason = f"it has no {' or '.join(missing)} method" if missing else ""
        if interceptor is None or reason:
            problems.append(
                _problem(
                    "E110",
                    f"PIPELINE entry {path!r} is not an interceptor: {reason}",
                    "Give it send(event) and handle(event, subscription, call_next).",
                    SETTINGS_ORIGIN,
                )
            )
            continue
        interceptors.append(interceptor)
    return interceptors


def _problem(code: str, message: str, hint: str | None, origin: Origin | None) -> Problem:
    return Problem(f"django_events.{code}", message, hint, origin)
