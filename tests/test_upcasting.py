"""Versions and upcasters on declarations, and the upcasting chain itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.core import checks

from django_events import event
from django_events.exceptions import NewerVersion, UpcastError
from django_events.wiring import typed
from django_events.wiring.registry import get_registry
from tests.conftest import wiring

U = "tests.app.upcasters"
V3_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "amount", "currency", "channel"],
    "properties": {
        "order_id": {"type": "integer"},
        "amount": {"type": "integer"},
        "currency": {"type": "string"},
        "channel": {"enum": ["web", "shop"]},
    },
    "additionalProperties": False,
}
V3 = {
    "o.placed": {
        "schema": V3_SCHEMA,
        "version": 3,
        "upcast": {1: f"{U}.split_total", 2: f"{U}.add_channel"},
    }
}


def compiled(events: dict[str, Any]) -> Any:
    return get_registry().event(next(iter(events)))


def test_a_v1_payload_is_upcast_to_v3_step_by_step() -> None:
    with wiring(EVENTS=V3):
        target = compiled(V3)
        assert target.version == 3
        assert target.upgrade({"order_id": 1, "total": 9.5}, 1) == {
            "order_id": 1,
            "amount": 950,
            "currency": "EUR",
            "channel": "web",
        }
        v2 = {"order_id": 1, "amount": 5, "currency": "USD"}
        assert target.upgrade(v2, 2) == {**v2, "channel": "web"}
        # Each version's chain is resolved once and kept: v1's is not v2's.
        assert target.upgrade({"order_id": 2, "total": 1}, 1)["amount"] == 100


def test_a_current_payload_is_returned_as_is() -> None:
    payload = {"order_id": 1}
    with wiring(EVENTS=V3):
        assert compiled(V3).upgrade(payload, 3) is payload


def test_a_version_without_an_upcaster_passes_unchanged() -> None:
    events = {"o.placed": {"version": 3, "upcast": {2: f"{U}.add_channel"}}}
    with wiring(EVENTS=events):
        assert compiled(events).upgrade({"a": 1}, 1) == {"a": 1, "channel": "web"}


def test_a_newer_version_is_refused_with_both_versions() -> None:
    with wiring(EVENTS=V3), pytest.raises(NewerVersion) as caught:
        compiled(V3).upgrade({}, 4)
    assert (caught.value.version, caught.value.known) == (4, 3)
    # The fact only: what a process does about it is its own to say (once).
    assert str(caught.value) == "Event 'o.placed' is version 4; this process knows up to version 3"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("explode", "raised RuntimeError: upcaster exploded on purpose"),
        ("not_a_dict", "returned list, not a payload dict"),
        ("drop_everything", "returned an invalid payload: $: 'order_id' is a required property"),
        ("nope", "does not import"),
        ("not_callable", "does not import: 'tests.app.upcasters.not_callable' is not callable"),
    ],
)
def test_a_failing_step_is_named(path: str, reason: str) -> None:
    events = {"o.placed": {**V3["o.placed"], "upcast": {1: f"{U}.split_total", 2: f"{U}.{path}"}}}
    with wiring(EVENTS=events), pytest.raises(UpcastError) as caught:
        compiled(events).upgrade({"order_id": 1, "total": 1}, 1)

    assert caught.value.step == 2
    assert str(caught.value).startswith(f"Upcaster v2 -> v3 of event 'o.placed' ({U}.{path}) ")
    assert reason in str(caught.value)


def test_a_payload_that_is_not_json_after_a_step_is_refused() -> None:
    events = {"o.placed": {"version": 2, "upcast": {1: "builtins.dict"}}}
    with wiring(EVENTS=events), pytest.raises(UpcastError, match="not JSON"):
        compiled(events).upgrade({"x": {1, 2}}, 1)


def test_the_chain_is_checked_once_against_its_last_step() -> None:
    # Step 1 lets a set through; step 2 passes it on: the chain's result is what is checked.
    events = {"o.placed": {"version": 3, "upcast": {1: "builtins.dict", 2: f"{U}.add_channel"}}}
    with wiring(EVENTS=events), pytest.raises(UpcastError) as caught:
        compiled(events).upgrade({"x": {1, 2}}, 1)
    assert caught.value.step == 2
    assert str(caught.value).endswith(
        "returned a payload that is not JSON: $.x: set {1, 2} is not JSON-serializable"
    )


def test_manifest_declares_version_and_upcast(tmp_path: Path) -> None:
    manifest = tmp_path / "events.yaml"
    manifest.write_text(
        f"version: 1\nevents:\n  o.placed:\n    version: 2\n    upcast:\n      1: {U}.split_total\n"
    )
    with wiring(MANIFESTS=[manifest]):
        declaration = get_registry().event("o.placed").declaration
    assert (declaration.version, declaration.upcast) == (2, {1: f"{U}.split_total"})


def test_version_defaults_to_1() -> None:
    with wiring(EVENTS={"o.placed": {}}):
        assert get_registry().event("o.placed").version == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"version": 0}, "$.events['o.placed'].version: 0 is less than the minimum of 1"),
        ({"version": 2, "upcast": {"one": f"{U}.x"}}, "'one' does not match"),
    ],
)
def test_bad_version_or_upcast_key_is_E103(body: dict[str, Any], message: str) -> None:
    with wiring(EVENTS={"o.placed": body}):
        problems = get_registry().problems
    assert [p.id for p in problems] == ["django_events.E103"]
    assert message in problems[0].message


@pytest.mark.parametrize(
    ("upcast", "message"),
    [
        ({2: f"{U}.x"}, "Event 'o.placed' is version 2: upcast key 2 is not an older version"),
        ({1.5: f"{U}.x"}, "Event 'o.placed': upcast key 1.5 is not a version number"),
        ({True: f"{U}.x"}, "Event 'o.placed': upcast key True is not a version number"),
    ],
)
def test_upcast_key_that_is_not_an_older_version_is_E130(
    upcast: dict[Any, str], message: str
) -> None:
    with wiring(EVENTS={"o.placed": {"version": 2, "upcast": upcast}}):
        problems = get_registry().problems
    assert [(p.id, p.message) for p in problems] == [("django_events.E130", message)]


@pytest.mark.parametrize(
    ("version", "key", "hint"),
    [
        (1, 1, "Version 1 has no older version to upcast: bump 'version', or remove the key."),
        (2, 3, "Key upcasters by the version they upgrade from (1)."),
        (4, 0, "Key upcasters by the version they upgrade from (1 to 3)."),
    ],
)
def test_an_upcast_key_out_of_range_is_one_E130_with_the_range_there_is(
    version: int, key: int, hint: str
) -> None:
    # The upcaster does not import either: no delivery ever runs it, so no E131 besides.
    events = {"o.placed": {"version": version, "upcast": {key: "tests.app.nope.x"}}}
    with wiring(EVENTS=events):
        # No database: Django 6.1 hands every alias to the database checks otherwise.
        reported = [m for m in checks.run_checks(databases=[]) if m.id.startswith("django_events.")]
    assert [(m.id, m.hint) for m in reported] == [("django_events.E130", hint)]


def test_typed_event_declares_version_and_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())  # for this test only

    @event("typed.versioned", version=3, upcast={2: f"{U}.add_channel"})
    @dataclass
    class Versioned:
        order_id: int
        channel: str = "shop"

    registry_event = get_registry().event("typed.versioned")
    assert registry_event.version == 3
    assert registry_event.upgrade({"order_id": 1}, 2) == {"order_id": 1, "channel": "web"}


@pytest.mark.parametrize("version", [0, -1, True])
def test_typed_event_refuses_a_bad_version(version: int) -> None:
    with pytest.raises(ValueError, match="version must be an integer >= 1"):
        event("typed.bad", version=version)
