"""events_lock and events_compat: the lock file, and every classification both ways."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_events.wiring.contracts import (
    BREAKS_BOTH,
    BREAKS_CONSUMERS,
    BREAKS_PRODUCERS,
    BY_HAND,
    COMPATIBLE,
    QUEUE_CHANGED,
    REMOVED,
)
from tests.conftest import wiring

ROOT = Path(__file__).resolve().parent.parent
RECORD = "tests.app.handlers.record"
OTHER = "tests.app.handlers.record_other"
UP = "tests.app.upcasters.split_total"
BASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id"],
    "properties": {
        "order_id": {"type": "integer"},
        "total": {"type": "number", "minimum": 0},
        "status": {"enum": ["new", "paid"]},
        "note": {"type": ["string", "null"], "maxLength": 100},
    },
}


def schema(**changes: Any) -> dict[str, Any]:
    """BASE_SCHEMA with top-level keys replaced, ``properties`` merged (None removes one)."""
    result = json.loads(json.dumps(BASE_SCHEMA))
    for key, value in changes.items():
        if key == "properties":
            for name, sub in value.items():
                if sub is None:
                    result["properties"].pop(name)
                else:
                    result["properties"][name] = sub
        elif value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def event(body: dict[str, Any] | None = None, **declaration: Any) -> dict[str, Any]:
    return {"o.placed": {"schema": body or BASE_SCHEMA, **declaration}}


SUB = {"event": "o.placed", "handler": RECORD, "mode": "async", "queue": "billing", "name": "s"}


def compat(
    tmp_path: Path,
    old: dict[str, Any],
    new: dict[str, Any],
    old_subs: tuple[dict[str, Any], ...] = (SUB,),
    new_subs: tuple[dict[str, Any], ...] = (SUB,),
) -> tuple[int, dict[str, Any]]:
    """Lock ``old``, declare ``new``: events_compat's exit status and JSON report."""
    lock = tmp_path / "events.lock.json"
    with wiring(*old_subs, EVENTS=old, MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    out = StringIO()
    with wiring(*new_subs, EVENTS=new, MANIFESTS=[]):
        try:
            call_command("events_compat", "--against", str(lock), "--format", "json", stdout=out)
        except CommandError as exc:
            code = exc.returncode
        else:
            code = 0
    return code, json.loads(out.getvalue())


def kinds(report: dict[str, Any]) -> list[str]:
    return [c["kind"] for c in report["changes"]]


# (id, old events, new events, old subscriptions, new subscriptions, kind expected, exit)
Case = tuple[
    str,
    dict[str, Any],
    dict[str, Any],
    tuple[dict[str, Any], ...],
    tuple[dict[str, Any], ...],
    str,
    int,
]
CASES: list[Case] = [
    # Each classification: a change that must pass, then one that must fail.
    (
        "optional property added",
        event(),
        event(schema(properties={"x": {}})),
        (SUB,),
        (SUB,),
        COMPATIBLE,
        0,
    ),
    (
        "property removed",
        event(),
        event(schema(properties={"note": None})),
        (SUB,),
        (SUB,),
        BREAKS_CONSUMERS,
        1,
    ),
    (
        "description changed",
        event(),
        event(schema(description="now documented")),
        (SUB,),
        (SUB,),
        COMPATIBLE,
        0,
    ),
    (
        "property renamed",
        event(),
        event(schema(properties={"note": None, "comment": BASE_SCHEMA["properties"]["note"]})),
        (SUB,),
        (SUB,),
        BREAKS_CONSUMERS,
        1,
    ),
    (
        "type widened to null",
        event(schema(properties={"order_id": {"type": "integer"}})),
        event(schema(properties={"order_id": {"type": "number"}})),
        (SUB,),
        (SUB,),
        BREAKS_CONSUMERS,
        1,
    ),
    (
        "type narrowed",
        event(),
        event(schema(properties={"note": {"type": "string", "maxLength": 100}})),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "enum value added",
        event(),
        event(schema(properties={"status": {"enum": ["new", "paid", "void"]}})),
        (SUB,),
        (SUB,),
        COMPATIBLE,
        0,
    ),
    (
        "enum value removed",
        event(),
        event(schema(properties={"status": {"enum": ["new"]}})),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "required property dropped from required",
        event(),
        event(schema(required=[])),
        (SUB,),
        (SUB,),
        BREAKS_CONSUMERS,
        1,
    ),
    (
        "new required property",
        event(),
        event(schema(required=["order_id", "total"])),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "additionalProperties opened",
        event(schema(additionalProperties=False)),
        event(),
        (SUB,),
        (SUB,),
        COMPATIBLE,
        0,
    ),
    (
        "additionalProperties closed",
        event(),
        event(schema(additionalProperties=False)),
        (SUB,),
        (SUB,),
        BREAKS_PRODUCERS,
        1,
    ),
    (
        "bound loosened",
        event(),
        event(schema(properties={"note": {"type": ["string", "null"], "maxLength": 200}})),
        (SUB,),
        (SUB,),
        COMPATIBLE,
        0,
    ),
    (
        "bound tightened",
        event(),
        event(schema(properties={"total": {"type": "number", "minimum": 1}})),
        (SUB,),
        (SUB,),
        BREAKS_PRODUCERS,
        1,
    ),
    ("event added", event(), {**event(), "o.shipped": {}}, (SUB,), (SUB,), COMPATIBLE, 0),
    ("event removed", {**event(), "o.shipped": {}}, event(), (SUB,), (SUB,), REMOVED, 1),
    ("subscription added", event(), event(), (SUB,), (SUB, {**SUB, "name": "t"}), COMPATIBLE, 0),
    ("subscription removed", event(), event(), (SUB, {**SUB, "name": "t"}), (SUB,), REMOVED, 1),
    ("handler changed", event(), event(), (SUB,), ({**SUB, "handler": OTHER},), COMPATIBLE, 0),
    ("queue changed", event(), event(), (SUB,), ({**SUB, "queue": "invoices"},), QUEUE_CHANGED, 1),
    (
        "oneOf unchanged, its description changed",
        event(schema(oneOf=[{"required": ["total"]}])),
        event(schema(oneOf=[{"required": ["total"]}], description="d")),
        (SUB,),
        (SUB,),
        COMPATIBLE,
        0,
    ),
    (
        "oneOf changed",
        event(schema(oneOf=[{"required": ["total"]}])),
        event(schema(oneOf=[{"required": ["note"]}])),
        (SUB,),
        (SUB,),
        BY_HAND,
        1,
    ),
    (
        "$ref target changed",
        event(
            schema(
                properties={"total": {"$ref": "#/$defs/m"}}, **{"$defs": {"m": {"type": "number"}}}
            )
        ),
        event(
            schema(
                properties={"total": {"$ref": "#/$defs/m"}}, **{"$defs": {"m": {"type": "integer"}}}
            )
        ),
        (SUB,),
        (SUB,),
        BY_HAND,
        1,
    ),
    (
        "new optional property added as required",
        event(),
        event(schema(properties={"x": {"type": "string"}}, required=["order_id", "x"])),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "mode sync -> inline",
        event(),
        event(),
        ({**SUB, "mode": "sync"},),
        ({**SUB, "mode": "inline"},),
        COMPATIBLE,
        0,
    ),
    ("mode sync -> async", event(), event(), ({**SUB, "mode": "sync"},), (SUB,), QUEUE_CHANGED, 1),
    (
        "items narrowed",
        event(schema(properties={"tags": {"type": "array", "items": {"type": "string"}}})),
        event(schema(properties={"tags": {"type": "array", "items": {"type": "integer"}}})),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "items made unique",
        event(schema(properties={"tags": {"type": "array"}})),
        event(schema(properties={"tags": {"type": "array", "uniqueItems": True}})),
        (SUB,),
        (SUB,),
        BREAKS_PRODUCERS,
        1,
    ),
    (
        "any value typed",
        event(schema(properties={"total": True})),
        event(schema(properties={"total": {"type": "number"}})),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "typed value made any",
        event(schema(properties={"total": {"type": "number"}})),
        event(schema(properties={"total": {}})),
        (SUB,),
        (SUB,),
        BREAKS_CONSUMERS,
        1,
    ),
    (
        "values restricted",
        event(schema(properties={"status": {"type": "string"}})),
        event(schema(properties={"status": {"type": "string", "const": "new"}})),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "values no longer restricted",
        event(),
        event(schema(properties={"status": {"type": "string"}})),
        (SUB,),
        (SUB,),
        BREAKS_CONSUMERS,
        1,
    ),
    (
        "additionalProperties schema narrowed",
        event(schema(additionalProperties={"type": ["string", "integer"]})),
        event(schema(additionalProperties={"type": "string"})),
        (SUB,),
        (SUB,),
        BREAKS_BOTH,
        1,
    ),
    (
        "a never-valid property allowed",
        event(schema(properties={"legacy": False})),
        event(schema(properties={"legacy": {"type": "string"}})),
        (SUB,),
        (SUB,),
        BY_HAND,
        1,
    ),
    (
        "if/then added",
        event(),
        event(schema(**{"if": {"required": ["total"]}, "then": {"required": ["status"]}})),
        (SUB,),
        (SUB,),
        BY_HAND,
        1,
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "old_subs", "new_subs", "kind", "exit_code"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_change_is_classified_and_fails_only_when_breaking(
    tmp_path: Path,
    old: dict[str, Any],
    new: dict[str, Any],
    old_subs: tuple[dict[str, Any], ...],
    new_subs: tuple[dict[str, Any], ...],
    kind: str,
    exit_code: int,
) -> None:
    code, report = compat(tmp_path, old, new, old_subs, new_subs)

    assert kind in kinds(report), report
    assert code == exit_code, report
    assert report["ok"] is (exit_code == 0)


def test_no_change_is_no_change(tmp_path: Path) -> None:
    code, report = compat(tmp_path, event(), event())

    assert (code, report["changes"]) == (0, [])


def test_messages_name_what_a_value_may_now_be(tmp_path: Path) -> None:
    old = schema(properties={"total": True, "status": {"type": "string"}})
    new = schema(
        properties={"total": {"type": "number"}, "status": {"type": "string", "enum": ["new"]}}
    )
    _, narrowed = compat(tmp_path, event(old), event(new))
    _, widened = compat(tmp_path, event(new), event(old))

    assert [(c["path"], c["message"]) for c in narrowed["changes"]] == [
        ("$.properties.status", 'values restricted to ["new"]'),
        ("$.properties.total", 'type narrowed (any -> "number"): any type no longer valid'),
    ]
    assert [(c["path"], c["message"]) for c in widened["changes"]] == [
        ("$.properties.status", 'values no longer restricted to ["new"]'),
        ("$.properties.total", 'type widened ("number" -> any): consumers may get any type'),
    ]


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        (
            "integer",
            "string",
            'type changed ("integer" -> "string"): integer no longer valid, '
            "consumers may get string",
        ),
        (
            ["integer", "null"],
            ["string", "null"],
            'type changed (["integer", "null"] -> ["string", "null"]): integer no longer '
            "valid, consumers may get string",
        ),
    ],
)
def test_a_type_changed_is_one_change_breaking_both(
    tmp_path: Path, before: Any, after: Any, message: str
) -> None:
    code, report = compat(
        tmp_path,
        event(schema(properties={"order_id": {"type": before}})),
        event(schema(properties={"order_id": {"type": after}})),
    )

    assert code == 1
    assert [(c["kind"], c["path"], c["message"]) for c in report["changes"]] == [
        (BREAKS_BOTH, "$.properties.order_id", message)
    ]


def test_a_required_property_removed_is_one_change(tmp_path: Path) -> None:
    code, report = compat(
        tmp_path, event(), event(schema(properties={"order_id": None}, required=[]))
    )

    assert code == 1
    assert [(c["kind"], c["message"]) for c in report["changes"]] == [
        (BREAKS_CONSUMERS, "property 'order_id' removed")
    ]


def test_compat_refuses_a_broken_configuration(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    with (
        wiring({"event": "nope", "handler": RECORD}, EVENTS=event(), MANIFESTS=[]),
        pytest.raises(CommandError, match=r"The configuration is broken \(events_check\):\n.*E105"),
    ):
        call_command("events_compat", "--against", str(lock), stdout=StringIO())


def test_lock_names_a_file_it_cannot_write(tmp_path: Path) -> None:
    target = tmp_path / "missing-folder" / "events.lock.json"
    with (
        wiring(SUB, EVENTS=event(), MANIFESTS=[]),
        pytest.raises(CommandError, match=f"^Cannot write {target}: "),
    ):
        call_command("events_lock", "--output", str(target), stdout=StringIO())
    assert not target.parent.exists()


def test_a_lock_file_schema_that_is_not_a_schema_is_left_to_a_person(tmp_path: Path) -> None:
    """A lock file edited by hand (or of another tool): compared, not trusted."""
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    data = json.loads(lock.read_text())
    data["events"]["o.placed"]["schema"]["properties"]["total"] = ["number"]
    lock.write_text(json.dumps(data))
    out = StringIO()

    with wiring(SUB, EVENTS=event(), MANIFESTS=[]), pytest.raises(CommandError):
        call_command("events_compat", "--against", str(lock), "--format", "json", stdout=out)

    [change] = json.loads(out.getvalue())["changes"]
    assert (change["kind"], change["path"], change["message"]) == (
        BY_HAND,
        "$.properties.total",
        "the schema is not an object or a boolean",
    )


def test_a_rename_is_reported_as_one(tmp_path: Path) -> None:
    note = BASE_SCHEMA["properties"]["note"]
    _, report = compat(tmp_path, event(), event(schema(properties={"note": None, "remark": note})))

    removed = [c for c in report["changes"] if c["kind"] == BREAKS_CONSUMERS]
    assert [c["message"] for c in removed] == ["property 'note' removed (renamed to 'remark'?)"]
    assert removed[0]["path"] == "$.properties.note"


def test_nested_properties_are_compared(tmp_path: Path) -> None:
    inner = {"type": "object", "properties": {"city": {"type": "string"}}}
    narrowed = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}}
    code, report = compat(
        tmp_path,
        event(schema(properties={"address": inner})),
        event(schema(properties={"address": narrowed})),
    )

    assert code == 1
    assert [(c["kind"], c["path"]) for c in report["changes"]] == [
        (BREAKS_PRODUCERS, "$.properties.address.properties.city")
    ]


def test_a_breaking_change_with_a_version_bump_and_an_upcaster_passes(tmp_path: Path) -> None:
    v2 = schema(properties={"total": None, "amount": {"type": "integer"}})
    code, report = compat(tmp_path, event(), event(v2, version=2, upcast={1: UP}))

    assert code == 0, report
    breaking = [c for c in report["changes"] if c["breaking"]]
    assert breaking and all(c["covered"] and not c["fails"] for c in breaking)


def test_a_version_bump_with_an_upcaster_does_not_cover_a_change_to_check_by_hand(
    tmp_path: Path,
) -> None:
    """docs/evolving.md: only a reviewer accepts "check by hand" (the tool cannot judge it)."""
    v2 = schema(properties={"note": {"type": "string", "pattern": "^[a-z]+$"}})
    code, report = compat(tmp_path, event(), event(v2, version=2, upcast={1: UP}))

    assert code == 1, report
    by_hand = [c for c in report["changes"] if c["kind"] == BY_HAND]
    assert [(c["covered"], c["fails"]) for c in by_hand] == [(False, True)]


@pytest.mark.parametrize(
    ("old_upcast", "new_upcast", "kind", "message", "exit_code"),
    [
        ({}, {1: UP}, COMPATIBLE, f"upcaster v1 -> v2 added: {UP!r}", 0),
        (
            {1: UP},
            {1: "tests.app.upcasters.add_channel"},
            COMPATIBLE,
            f"upcaster v1 -> v2 {UP!r} -> 'tests.app.upcasters.add_channel'",
            0,
        ),
        (
            {1: UP},
            {},
            REMOVED,
            f"upcaster v1 -> v2 removed (was {UP!r}): stored and in-flight events of "
            "version 1 reach the handlers as they are",
            1,
        ),
    ],
    ids=["added", "changed", "removed"],
)
def test_an_upcaster_change_is_listed(
    tmp_path: Path,
    old_upcast: dict[int, str],
    new_upcast: dict[int, str],
    kind: str,
    message: str,
    exit_code: int,
) -> None:
    """A lock stale only in its upcasters: events_compat (W130's hint) says what changed."""
    code, report = compat(
        tmp_path, event(version=2, upcast=old_upcast), event(version=2, upcast=new_upcast)
    )

    assert [(c["kind"], c["path"], c["message"]) for c in report["changes"]] == [
        (kind, "$", message)
    ]
    assert code == exit_code


def test_the_lock_check_names_an_upcaster_change(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(version=2, upcast={1: UP}), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    other = "tests.app.upcasters.add_channel"
    with wiring(SUB, EVENTS=event(version=2, upcast={1: other}), MANIFESTS=[], LOCK_FILE=str(lock)):
        assert w130() == [
            f"Lock file {str(lock)!r} is stale: 1 change(s) since it was written; first: "
            f"COMPATIBLE: event o.placed: upcaster v1 -> v2 {UP!r} -> {other!r}"
        ]


def test_the_lock_check_says_so_when_no_change_explains_the_difference(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
        data = json.loads(lock.read_text())
        lock.write_text(json.dumps({**data, "queues": ["edited"]}))

        assert w130() == [
            f"Lock file {str(lock)!r} is stale: it differs from what events_lock writes now"
        ]


def test_a_change_no_version_bump_covers_is_named_for_review(tmp_path: Path) -> None:
    """A removed subscription: the summary and the error do not say to bump a version."""
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    out = StringIO()
    with (
        wiring({**SUB, "name": "t"}, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)),
        pytest.raises(CommandError) as raised,
    ):
        call_command("events_compat", stdout=out)

    assert out.getvalue().splitlines()[-1] == (
        f"2 change(s) against {lock}, 0 breaking without a version bump and an upcaster, "
        "1 that only a review accepts (removed, queue changed, check by hand)."
    )
    assert str(raised.value) == (
        "1 change(s) that no version bump covers (removed, queue changed, check by hand): "
        "review them, then accept them with events_lock."
    )


def test_both_kinds_of_failing_change_are_named(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    with (
        wiring(
            {**SUB, "queue": "other"},
            EVENTS=event(schema(required=[])),
            MANIFESTS=[],
            LOCK_FILE=str(lock),
        ),
        pytest.raises(CommandError) as raised,
    ):
        call_command("events_compat", stdout=StringIO())

    assert str(raised.value) == (
        "1 breaking change(s): bump the event's version and add an upcaster "
        "(docs/evolving.md), or review and accept with events_lock; 1 change(s) that no "
        "version bump covers (removed, queue changed, check by hand): review them, then "
        "accept them with events_lock."
    )


def test_a_version_bump_without_an_upcaster_does_not_cover_a_breaking_change(
    tmp_path: Path,
) -> None:
    v2 = schema(properties={"total": None, "amount": {"type": "integer"}})
    code, report = compat(tmp_path, event(), event(v2, version=2))

    assert code == 1
    assert any(c["fails"] for c in report["changes"])


def test_an_upcaster_without_a_version_bump_does_not_cover_it(tmp_path: Path) -> None:
    code, _ = compat(
        tmp_path, event(version=2), event(schema(required=[]), version=2, upcast={1: UP})
    )

    assert code == 1


def test_a_version_going_down_fails(tmp_path: Path) -> None:
    code, report = compat(tmp_path, event(version=3), event(version=2))

    assert code == 1
    assert "version went down (3 -> 2)" in report["changes"][0]["message"]


def test_text_report_names_each_change_and_the_count(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    out = StringIO()
    with (
        wiring(SUB, EVENTS=event(schema(required=[])), MANIFESTS=[], LOCK_FILE=str(lock)),
        pytest.raises(CommandError, match="1 breaking change"),
    ):
        call_command("events_compat", stdout=out)

    assert out.getvalue().splitlines() == [
        "BREAKING FOR CONSUMERS: event o.placed $.properties.order_id: property 'order_id' no "
        "longer required: consumers may not get it",
        f"1 change(s) against {lock}, 1 breaking without a version bump and an upcaster.",
    ]


def test_lock_file_is_sorted_stable_and_ends_with_a_newline(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    subs = ({**SUB, "name": "z"}, {**SUB, "name": "a", "queue": "audit"})
    events = {"z.last": {}, **event(version=2, upcast={1: UP})}
    with wiring(*subs, EVENTS=events, MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
        first = lock.read_text()
        call_command("events_lock", stdout=StringIO())
    with wiring(*reversed(subs), EVENTS=dict(reversed(events.items())), MANIFESTS=[]):
        call_command("events_lock", "--output", str(tmp_path / "again.json"), stdout=StringIO())

    assert lock.read_text() == first == (tmp_path / "again.json").read_text()
    assert first.endswith("}\n") and not first.endswith("\n\n")
    data = json.loads(first)
    assert list(data["events"]) == ["o.placed", "z.last"]
    assert data["events"]["o.placed"]["version"] == 2
    assert data["events"]["o.placed"]["upcast"] == {"1": UP}
    assert data["events"]["o.placed"]["schema"] == BASE_SCHEMA
    assert data["subscriptions"]["a"] == {
        "event": "o.placed",
        "handler": RECORD,
        "mode": "async",
        "queue": "audit",
    }
    assert data["queues"] == ["audit", "billing"]


def test_lock_refuses_a_broken_configuration(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    with (
        wiring({"event": "nope", "handler": RECORD}, LOCK_FILE=str(lock)),
        pytest.raises(CommandError, match="E105"),
    ):
        call_command("events_lock", stdout=StringIO())
    assert not lock.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"events\.lock\.json:1: not JSON"),
        ("[]", "not an events lock file"),
        ('{"format": 9, "events": {}}', "lock format 9, expected 1"),
    ],
)
def test_compat_names_a_bad_lock_file(tmp_path: Path, text: str, message: str) -> None:
    lock = tmp_path / "events.lock.json"
    lock.write_text(text)
    with pytest.raises(CommandError, match=message):
        call_command("events_compat", "--against", str(lock), stdout=StringIO())


def test_compat_without_a_lock_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot be read"):
        call_command("events_compat", "--against", str(tmp_path / "nope.json"))


def test_compat_exits_1_from_the_command_line(tmp_path: Path) -> None:
    """What CI runs: manage.py events_compat, a non-zero status on a breaking change."""
    lock = tmp_path / "events.lock.json"
    with wiring({**SUB, "event": "orders.placed"}, LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    data = json.loads(lock.read_text())
    data["events"]["orders.placed"]["schema"]["properties"]["gone"] = {"type": "string"}
    lock.write_text(json.dumps(data))
    command = [sys.executable, "-m", "django", "events_compat", "--against", str(lock)]
    env = {"DJANGO_SETTINGS_MODULE": "tests.settings", "PATH": "/usr/bin:/bin"}

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 1, result.stderr
    assert "property 'gone' removed" in result.stdout
    assert "breaking change(s): bump the event" in result.stderr


def w130() -> list[str]:
    from django.core.checks import run_checks

    # No database: Django 6.1 hands every alias to the database checks a tag selects.
    checked = run_checks(tags=["django_events"], databases=[])
    return [m.msg for m in checked if m.id == "django_events.W130"]


def test_the_lock_check_is_quiet_while_the_lock_file_matches(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        assert w130() == []  # no lock file: nothing to compare
        call_command("events_lock", stdout=StringIO())
        assert w130() == []
    with wiring(SUB, EVENTS=event(schema(required=[])), MANIFESTS=[], LOCK_FILE=str(lock)):
        assert w130() == [
            f"Lock file {str(lock)!r} is stale: 1 change(s) since it was written; first: "
            "BREAKING FOR CONSUMERS: event o.placed $.properties.order_id: property 'order_id' "
            "no longer required: consumers may not get it"
        ]


def test_the_lock_check_names_a_lock_file_it_cannot_read(tmp_path: Path) -> None:
    lock = tmp_path / "events.lock.json"
    lock.write_text("{")
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        assert w130() == [
            f"Lock file {str(lock)!r} is stale: {lock}:1: not JSON: Expecting property name "
            "enclosed in double quotes"
        ]


def test_lock_and_compat_do_not_warn_first_that_the_lock_is_stale(tmp_path: Path) -> None:
    """W130 says "run events_compat, then events_lock": Django's system checks, run before a
    command, printed it just before events_compat listed the changes and events_lock
    rewrote the file."""
    lock = tmp_path / "events.lock.json"
    lock.write_text(json.dumps({"format": 1, "events": {}, "subscriptions": {}, "queues": []}))
    env = {"DJANGO_SETTINGS_MODULE": "tests.settings", "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = str(ROOT)  # run where the default LOCK_FILE is this one

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "django", *args]
        return subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    compared = run("events_compat")
    assert "new event" in compared.stdout
    assert "W130" not in compared.stderr
    locked = run("events_lock")
    assert (locked.returncode, locked.stderr) == (0, "")
    assert locked.stdout.startswith("Wrote events.lock.json (")


def test_lock_and_compat_refuse_an_unusable_upcaster(tmp_path: Path) -> None:
    """The lock would name an upcaster that cannot run, and a comparison count it."""
    lock = tmp_path / "events.lock.json"
    broken = event(version=2, upcast={1: "tests.app.upcasters.no_such_function"})
    with wiring(SUB, EVENTS=event(), MANIFESTS=[], LOCK_FILE=str(lock)):
        call_command("events_lock", stdout=StringIO())
    with wiring(SUB, EVENTS=broken, MANIFESTS=[], LOCK_FILE=str(lock)):
        with pytest.raises(CommandError, match=r"(?s)broken \(events_check\):\n.*E131"):
            call_command("events_compat", stdout=StringIO())
        written = lock.read_text()
        with pytest.raises(CommandError, match=r"(?s)Not locking .*\n.*E131"):
            call_command("events_lock", stdout=StringIO())
    assert lock.read_text() == written
