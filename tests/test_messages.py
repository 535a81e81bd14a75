"""django_events.delivery.messages: the delivery message, built and read in one place."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from django_events.delivery.messages import (
    MESSAGE_VERSION,
    MalformedMessage,
    build_message,
    event_body,
    event_from_body,
    parse_message,
    summary_of,
)
from django_events.events import Event


def an_event(**changes: Any) -> Event[Any]:
    event_id = uuid.uuid4()
    fields: dict[str, Any] = {
        "id": event_id,
        "name": "orders.placed",
        "payload": {"order_id": 1, "note": "é"},
        "headers": {"tenant": "t1"},
        "occurred_at": datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5))),
        "correlation_id": event_id,
        "causation_id": None,
        "data": {"order_id": 1, "note": "é"},
        "version": 3,
    }
    fields.update(changes)
    return Event(**fields)


def over_the_wire(message: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(json.dumps(message))
    return decoded


def test_an_event_survives_the_trip_through_a_json_message() -> None:
    event = an_event(causation_id=uuid.uuid4())
    raw = over_the_wire(build_message(event_body(event), "sub", "default", 2, rerun=True))

    message = parse_message(raw)

    assert (message.subscription, message.alias, message.prior_attempts) == ("sub", "default", 2)
    assert message.rerun is True and message.version == MESSAGE_VERSION
    assert event_from_body(message.event) == event
    assert event_from_body(message.event).version == 3
    assert message.attempt(1) == 4


def test_a_message_without_rerun_or_version_keys_reads_with_their_defaults() -> None:
    body = event_body(an_event())
    del body["version"]
    message = parse_message({"subscription": "sub", "event": body})

    assert (message.rerun, message.prior_attempts, message.version) == (False, 0, 1)
    assert event_from_body(message.event).version == 1


def test_a_database_alias_is_kept_as_sent_and_a_missing_one_is_the_default() -> None:
    # The worker leaves a message for a database it lacks to a worker that has it
    # (test_worker): it is never read as another database's.
    message = parse_message(build_message(event_body(an_event()), "sub", "nope"))
    assert (message.alias, message.database_known) == ("nope", False)

    for missing in ({}, {"db": None}):
        raw = {"subscription": "sub", "event": event_body(an_event()), **missing}
        message = parse_message(raw)
        assert (message.alias, message.database_known) == ("default", True)


def test_another_format_version_parses_and_says_which() -> None:
    raw = {**build_message(event_body(an_event()), "sub", "default"), "v": 2}

    assert parse_message(raw).version == 2  # the worker records it as failed (test_delivery)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda m: m.update(v="1"), "v is str, not an integer"),
        (lambda m: m.update(subscription=["a"]), "subscription is not a string"),
        (lambda m: m.update(prior_attempts=10**12), "prior_attempts is not an integer"),
        (lambda m: m.update(rerun="yes"), "rerun is not a boolean"),
        (lambda m: m.update(db=["default"]), "db is not a database alias"),
        (lambda m: m.update(db=""), "db is not a database alias"),
        (lambda m: m.update(uncounted=-1), "uncounted is not an integer from 0"),
        (lambda m: m["event"].update(name=7), "event name is not a string"),
        (lambda m: m["event"].update(id="x"), "event id is not a UUID string"),
        (lambda m: m["event"].update(correlation_id=7), "event correlation_id is not a UUID"),
        (lambda m: m["event"].update(occurred_at="2026-02-30T10:00:00Z"), "not an aware ISO"),
        (lambda m: m["event"].update(occurred_at="2026-12-03T10:00:00"), "not an aware ISO 8601"),
        (lambda m: m["event"].update(headers={"a": 1}), "headers do not map strings"),
        (lambda m: m["event"].update(version=0), "event version is not an integer from 1"),
        (lambda m: m["event"].update(payload=[1]), "event payload is not an object"),
        (lambda m: m["event"].update(payload={"a": "\x00"}), "event payload cannot be stored"),
        (lambda m: m.pop("event"), "not a django_events delivery message"),
    ],
)
def test_a_malformed_message_is_refused_naming_what_is_wrong(change: Any, error: str) -> None:
    raw = over_the_wire(build_message(event_body(an_event()), "sub", "default"))
    change(raw)

    with pytest.raises(MalformedMessage, match=error):
        parse_message(raw)


def test_the_attempt_count_must_stay_a_count() -> None:
    message = parse_message({**build_message(event_body(an_event()), "s", "default", -1)})

    assert message.attempt(1) == 1  # a message that waited for a newer worker
    with pytest.raises(MalformedMessage, match="retries"):
        message.attempt(0)
    with pytest.raises(MalformedMessage, match="retries"):
        message.attempt(True)


def test_monitors_see_a_summary_never_the_payload() -> None:
    event = an_event()
    message = build_message(event_body(event), "sub", "default")

    assert summary_of(message) == f"('sub', '{event.id}')"
    assert "order_id" not in summary_of(message)
    assert summary_of("garbage") == "('None', 'None')"


def test_event_from_body_rejects_a_naive_time_it_cannot_parse() -> None:
    body = {**event_body(an_event()), "occurred_at": "not a time"}

    with pytest.raises(ValueError, match="bad occurred_at"):
        event_from_body(body)


def test_uncounted_runs_are_some_of_the_runs_before() -> None:
    body = event_body(an_event())
    message = parse_message(build_message(body, "s", "default", 1, uncounted=2))

    assert message.attempt(1) == 3  # its retry: two runs before, both uncounted
    with pytest.raises(MalformedMessage, match=r"uncounted \(2\) exceeds the runs before"):
        message.attempt(0)
    waited = parse_message(build_message(body, "s", "default", -1, uncounted=1))
    assert waited.attempt(2) == 2  # one wait for a newer worker, one uncounted run
