"""The contract of the wiring: a lock file, and the changes between two of them.

``lock_data`` is what ``events_lock`` writes (events with their version and schema,
subscriptions, queues); ``compare`` classifies every difference between an older lock and a
newer one (``events_compat``). Who a change breaks:

- consumers: whoever reads the event, i.e. handlers fed stored or in-flight payloads of the
  old contract, and other services written against it;
- producers: code (or other services) publishing payloads of the old shape.

A keyword this module cannot judge (``$ref``, ``oneOf``, ``if``/``then``...) is reported as
"check by hand", never as compatible.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from django_events.wiring.compiled import Registry
from django_events.wiring.manifest import JsonPath, format_path

LOCK_FORMAT = 1

COMPATIBLE = "compatible"
BREAKS_CONSUMERS = "breaking for consumers"
BREAKS_PRODUCERS = "breaking for producers"
BREAKS_BOTH = "breaking for consumers and producers"
BY_HAND = "check by hand"
REMOVED = "removed"
QUEUE_CHANGED = "queue changed"
# What a version bump with an upcaster covers; the other kinds only a reviewer accepts.
COVERABLE = frozenset({BREAKS_CONSUMERS, BREAKS_PRODUCERS, BREAKS_BOTH})

# Keywords that describe without constraining: a change to them is compatible.
ANNOTATIONS = frozenset(
    {"title", "description", "examples", "default", "$comment", "deprecated", "$schema", "$id"}
)
# Bounds: (keyword, the direction that tightens it).
LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
# Keywords compared here; any other keyword that differs is left to a human.
JUDGED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "enum",
        "const",
        "items",
        "uniqueItems",
        *LOWER_BOUNDS,
        *UPPER_BOUNDS,
    }
    | ANNOTATIONS
)
_INTEGER_IN_NUMBER = {"integer": "number"}


@dataclass(frozen=True)
class Change:
    """One difference between the locked contract and the declared one."""

    kind: str  # one of the constants above
    subject: str  # "event orders.placed", "subscription audit", ...
    path: str  # JSON path in the event's schema, "$" for the event itself
    message: str
    covered: bool = False  # by a version bump with an upcaster

    @property
    def breaking(self) -> bool:
        return self.kind != COMPATIBLE

    @property
    def fails(self) -> bool:
        return self.breaking and not self.covered

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "breaking": self.breaking, "fails": self.fails}

    def __str__(self) -> str:
        where = "" if self.path == "$" else f" {self.path}"
        note = " (covered: version bumped, with an upcaster)" if self.covered else ""
        return f"{self.kind.upper()}: {self.subject}{where}: {self.message}{note}"


def lock_data(registry: Registry) -> dict[str, Any]:
    """The catalogue as the lock file holds it: plain JSON, independent of declaration order."""
    events = {}
    for name, compiled in registry.events.items():
        declaration = compiled.declaration
        events[name] = {
            "version": declaration.version,
            "schema": compiled.validator.schema,
            "upcast": {str(k): v for k, v in sorted(declaration.upcast.items())},
        }
    subscriptions = {
        name: {
            "event": s.declaration.event,
            "handler": s.declaration.handler,
            "mode": s.mode,
            "queue": s.queue if s.is_queued else None,
        }
        for name, s in registry.subscriptions.items()
    }
    data = {
        "format": LOCK_FORMAT,
        "events": events,
        "subscriptions": subscriptions,
        "queues": registry.queues(),
    }
    # A JSON round trip: tuples become lists, so a lock read back compares equal.
    loaded: dict[str, Any] = json.loads(json.dumps(data))
    return loaded


def read_lock(path: Path) -> dict[str, Any]:
    """Read a lock file (``ValueError`` naming the file when it is not one)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("events"), dict):
        raise ValueError(f"{path}: not an events lock file (no 'events' object)")
    if data.get("format") != LOCK_FORMAT:
        raise ValueError(f"{path}: lock format {data.get('format')!r}, expected {LOCK_FORMAT}")
    return data


def dump_lock(data: dict[str, Any]) -> str:
    """The lock file's text: sorted keys, two-space indent, one trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every change from the ``old`` lock to the ``new`` one, classified."""
    changes: list[Change] = []
    old_events, new_events = old.get("events", {}), new.get("events", {})
    for name in sorted(old_events.keys() | new_events.keys()):
        subject = f"event {name}"
        if name not in new_events:
            changes.append(Change(REMOVED, subject, "$", "the event is no longer declared"))
            continue
        if name not in old_events:
            changes.append(Change(COMPATIBLE, subject, "$", "new event"))
            continue
        changes.extend(_event_changes(subject, old_events[name], new_events[name]))
    old_subs, new_subs = old.get("subscriptions", {}), new.get("subscriptions", {})
    for name in sorted(old_subs.keys() | new_subs.keys()):
        subject = f"subscription {name}"
        if name not in new_subs:
            changes.append(Change(REMOVED, subject, "$", "the subscription is no longer declared"))
            continue
        if name not in old_subs:
            changes.append(Change(COMPATIBLE, subject, "$", "new subscription"))
            continue
        before, after = old_subs[name], new_subs[name]
        if before.get("queue") != after.get("queue"):
            changes.append(
                Change(
                    QUEUE_CHANGED,
                    subject,
                    "$",
                    f"queue {before.get('queue')!r} -> {after.get('queue')!r}: messages "
                    "already in the old queue need a worker there until it drains",
                )
            )
        for key in ("event", "handler"):
            if before.get(key) != after.get(key):
                message = f"{key} {before.get(key)!r} -> {after.get(key)!r}"
                changes.append(Change(COMPATIBLE, subject, "$", message))
        if before.get("mode") != after.get("mode"):
            # To or from async: messages in flight meet a worker without the subscription.
            kind = (
                QUEUE_CHANGED if "async" in (before.get("mode"), after.get("mode")) else COMPATIBLE
            )
            message = f"mode {before.get('mode')!r} -> {after.get('mode')!r}"
            changes.append(Change(kind, subject, "$", message))
    return changes


def _event_changes(subject: str, before: dict[str, Any], after: dict[str, Any]) -> list[Change]:
    old_version, new_version = int(before.get("version", 1)), int(after.get("version", 1))
    changes: list[Change] = []
    if new_version < old_version:
        changes.append(
            Change(
                BREAKS_BOTH,
                subject,
                "$",
                f"version went down ({old_version} -> {new_version}): stored events of "
                f"version {old_version} wait for a newer worker forever",
            )
        )
    elif new_version > old_version:
        changes.append(Change(COMPATIBLE, subject, "$", f"version {old_version} -> {new_version}"))
    schema_changes = list(_schema_changes(before.get("schema", True), after.get("schema", True)))
    upcast = after.get("upcast") or {}
    covered = new_version > old_version and any(
        str(step) in upcast for step in range(old_version, new_version)
    )
    changes.extend(_upcaster_changes(subject, before.get("upcast") or {}, upcast))
    for kind, path, message in schema_changes:
        changes.append(
            Change(kind, subject, format_path(path), message, covered and kind in COVERABLE)
        )
    return changes


def _upcaster_changes(
    subject: str, before: dict[str, str], after: dict[str, str]
) -> Iterator[Change]:
    """Upcasters added, pointed elsewhere (compatible, as a handler changed) or removed."""
    for step in sorted(before.keys() | after.keys(), key=int):
        old, new = before.get(step), after.get(step)
        label = f"upcaster v{step} -> v{int(step) + 1}"
        if old is None:
            yield Change(COMPATIBLE, subject, "$", f"{label} added: {new!r}")
        elif new is None:
            message = (
                f"{label} removed (was {old!r}): stored and in-flight events of version "
                f"{step} reach the handlers as they are"
            )
            yield Change(REMOVED, subject, "$", message)
        elif old != new:
            yield Change(COMPATIBLE, subject, "$", f"{label} {old!r} -> {new!r}")


Found = tuple[str, JsonPath, str]  # kind, path in the schema, message


def _schema_changes(old: Any, new: Any, path: JsonPath = ()) -> Iterator[Found]:
    """The differences between two schema nodes, each classified."""
    if old == new:
        return
    old, new = _as_object(old), _as_object(new)
    if old is None or new is None:
        yield BY_HAND, path, "the schema is not an object or a boolean"
        return
    unjudged = sorted(
        k for k in old.keys() | new.keys() if k not in JUDGED and old.get(k) != new.get(k)
    )
    if unjudged or any(k in old or k in new for k in ("$ref",)):
        keys = ", ".join(unjudged) or "$ref"
        yield BY_HAND, path, f"changes under {keys}: not judged automatically"
        return
    yield from _type_changes(old, new, path)
    yield from _property_changes(old, new, path)
    yield from _enum_changes(old, new, path)
    yield from _bound_changes(old, new, path)
    if "items" in old or "items" in new:
        yield from _schema_changes(old.get("items", True), new.get("items", True), (*path, "items"))
    if not old.get("uniqueItems") and new.get("uniqueItems"):
        yield BREAKS_PRODUCERS, path, "items must now be unique"
    for key in sorted(ANNOTATIONS):
        if old.get(key) != new.get(key):
            yield COMPATIBLE, path, f"{key} changed"


def _as_object(node: Any) -> dict[str, Any] | None:
    if node is True:
        return {}
    if node is False:
        return {"not": {}}
    return node if isinstance(node, dict) else None


def _types(node: dict[str, Any]) -> set[str] | None:
    value = node.get("type")
    if value is None:
        return None  # any type
    return {value} if isinstance(value, str) else set(value)


def _type_changes(old: dict[str, Any], new: dict[str, Any], path: JsonPath) -> Iterator[Found]:
    before, after = _types(old), _types(new)
    if before == after:
        return

    def accepts(types: set[str] | None, kind: str) -> bool:
        return types is None or kind in types or (_INTEGER_IN_NUMBER.get(kind, "") in types)

    lost = sorted(t for t in (before or {"any"}) if t != "any" and not accepts(after, t))
    if before is None and after is not None:
        lost = ["any type"]
    gained = sorted(t for t in (after or {"any"}) if t != "any" and not accepts(before, t))
    if after is None and before is not None:
        gained = ["any type"]
    shown = f"{_show(old.get('type'))} -> {_show(new.get('type'))}"
    no_longer = f"{', '.join(lost)} no longer valid"
    may_get = f"consumers may get {', '.join(gained)}"
    # One change, classified by what it does to whom: a type that both loses and gains
    # (integer -> string) breaks what narrowing breaks, and more.
    if lost and gained:
        yield BREAKS_BOTH, path, f"type changed ({shown}): {no_longer}, {may_get}"
    elif lost:
        yield BREAKS_BOTH, path, f"type narrowed ({shown}): {no_longer}"
    elif gained:
        yield BREAKS_CONSUMERS, path, f"type widened ({shown}): {may_get}"


def _show(value: Any) -> str:
    return "any" if value is None else json.dumps(value)


def _property_changes(old: dict[str, Any], new: dict[str, Any], path: JsonPath) -> Iterator[Found]:
    before, after = old.get("properties", {}), new.get("properties", {})
    old_required, new_required = set(old.get("required", ())), set(new.get("required", ()))
    removed = sorted(before.keys() - after.keys())
    added = sorted(after.keys() - before.keys())
    for name in removed:
        renamed = [a for a in added if after[a] == before[name]]
        hint = f" (renamed to {renamed[0]!r}?)" if len(renamed) == 1 else ""
        yield BREAKS_CONSUMERS, (*path, "properties", name), f"property {name!r} removed{hint}"
    for name in sorted(new_required - old_required):
        if name in before or name not in after:
            why = "stored events and old producers may lack it"
        else:
            why = "a new property, required: stored events and old producers lack it"
        yield BREAKS_BOTH, (*path, "properties", name), f"property {name!r} newly required ({why})"
    for name in sorted(old_required - new_required):
        if name in after:
            yield (
                BREAKS_CONSUMERS,
                (*path, "properties", name),
                (f"property {name!r} no longer required: consumers may not get it"),
            )
    for name in added:
        if name not in new_required:
            yield COMPATIBLE, (*path, "properties", name), f"optional property {name!r} added"
    for name in sorted(before.keys() & after.keys()):
        yield from _schema_changes(before[name], after[name], (*path, "properties", name))
    old_extra, new_extra = (
        old.get("additionalProperties", True),
        new.get("additionalProperties", True),
    )
    if old_extra != new_extra:
        if new_extra is False:
            yield BREAKS_PRODUCERS, path, "additionalProperties closed: unknown keys now refused"
        elif old_extra is False and new_extra is True:
            yield COMPATIBLE, path, "additionalProperties opened"
        else:
            yield from _schema_changes(old_extra, new_extra, (*path, "additionalProperties"))


def _enum_changes(old: dict[str, Any], new: dict[str, Any], path: JsonPath) -> Iterator[Found]:
    before = old["enum"] if "enum" in old else [old["const"]] if "const" in old else None
    after = new["enum"] if "enum" in new else [new["const"]] if "const" in new else None
    if before == after:
        return
    if after is not None and before is None:
        yield BREAKS_BOTH, path, f"values restricted to {json.dumps(after)}"
        return
    if after is None:
        yield BREAKS_CONSUMERS, path, f"values no longer restricted to {json.dumps(before)}"
        return
    assert before is not None
    for value in before:
        if value not in after:
            yield BREAKS_BOTH, path, f"enum value {json.dumps(value)} removed"
    for value in after:
        if value not in before:
            yield COMPATIBLE, path, f"enum value {json.dumps(value)} added"


def _bound_changes(old: dict[str, Any], new: dict[str, Any], path: JsonPath) -> Iterator[Found]:
    for keywords, sign in ((LOWER_BOUNDS, 1), (UPPER_BOUNDS, -1)):
        for key in keywords:
            before, after = old.get(key), new.get(key)
            if before == after:
                continue
            if after is not None and (before is None or sign * (after - before) > 0):
                yield BREAKS_PRODUCERS, path, f"{key} tightened ({before} -> {after})"
            else:
                yield COMPATIBLE, path, f"{key} loosened ({before} -> {after})"
