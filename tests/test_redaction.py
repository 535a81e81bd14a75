"""Redaction: masking payload keys for display, and in messages built from the payload."""

from __future__ import annotations

import datetime
import json
import logging
import math
import pickle
import uuid
from io import StringIO
from typing import Any

import pytest
from celery.utils.serialization import get_pickleable_exception
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from django_events import Event, InvalidPayload, publish
from django_events.delivery.failure_logs import masked_for_celery
from django_events.delivery.messages import build_message, event_body
from django_events.delivery.recording import delivery, save_deliveries
from django_events.delivery.sealing import open_event, seal_event
from django_events.delivery.worker import process_message
from django_events.models import Delivery, EventRecord
from django_events.wiring.redaction import MASK, redact, redact_text
from tests.ops import drain, shop_wiring

CARD = "4111111111111111"


def test_redact_masks_dotted_paths_through_lists_and_leaves_the_data_alone() -> None:
    data = {"email": "a@b.c", "lines": [{"card": {"number": "1"}}, {"card": None}], "n": 1}

    masked = redact(data, ["email", "lines.card.number", "missing.key"])

    assert masked == {"email": MASK, "lines": [{"card": {"number": MASK}}, {"card": None}], "n": 1}
    assert data["email"] == "a@b.c" and data["lines"][0]["card"]["number"] == "1"


def test_redact_text_masks_each_redacted_value_and_what_it_holds() -> None:
    data = {"customer": {"phone": "555-0100", "vip": True}, "card": {"number": 4111}, "id": 7}
    text = f"{data!r} is not valid; 4111 is not of type 'string'; '555-0100' is too short"

    masked = redact_text(text, data, ["customer", "card.number"])

    assert "555-0100" not in masked and "4111" not in masked
    assert f"'card': {{'number': {MASK!r}}}" in masked and "'id': 7" in masked
    assert f"{MASK!r} is not of type 'string'" in masked


def test_redact_text_reaches_into_lists() -> None:
    data = {"lines": [{"card": CARD}, {"card": "4222222222222222"}, "gift"]}
    text = f"Card {CARD} declined; then '4222222222222222' too"

    assert redact_text(text, data, ["lines.card"]) == f"Card {MASK!r} declined; then {MASK!r} too"


def test_redact_text_masks_values_as_json_writes_them() -> None:
    """A webhook receiver's answer may echo the body it was sent, which JSON escaped."""
    data = {"card": "José Müller-Straße 12", "note": 'say "hi" \\ bye', "lines": [{"n": 1}]}
    echoed = json.dumps({"error": "invalid", "got": data})

    masked = redact_text(echoed, data, ["card", "note", "lines"])

    assert "Jos\\u00e9" not in masked and 'hi\\"' not in masked and '"n": 1' not in masked
    assert masked.count(repr(MASK)) == 3, masked
    assert redact_text(json.dumps(data, ensure_ascii=False), data, ["card"]).count("José") == 0


def test_redact_text_without_redacted_values_is_the_text() -> None:
    assert redact_text("x: 1 is not a string", {"x": 1}, []) == "x: 1 is not a string"
    assert redact_text("True is not a string", {"flag": True}, ["flag"]) == "True is not a string"


def _stale_event() -> EventRecord:
    """A stored shop.paid whose card number no longer fits the schema (a string now)."""
    return EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.paid",
        payload={"order_id": 1, "email": "ada@example.com", "card": {"number": int(CARD)}},
        correlation_id=uuid.uuid4(),
        status="dispatched",
    )


@pytest.mark.django_db
def test_a_retry_of_a_stale_payload_records_the_schema_error_redacted(queue, caplog) -> None:
    record = _stale_event()
    save_deliveries("default", [delivery(record.pk, "shop-audit", "sync", "failed", 1, "Boom")])

    with caplog.at_level(logging.DEBUG):
        call_command("events_retry", "--subscription", "shop-audit", stdout=StringIO())

    row = Delivery.objects.get(event_id=record.pk, subscription="shop-audit")
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.last_error == (
        f"Payload no longer valid for 'shop.paid': $.card.number: {MASK!r} is not of type 'string'"
    )
    assert CARD not in caplog.text


@pytest.mark.django_db
def test_the_worker_records_and_logs_a_stale_payload_redacted(
    queue, caplog, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        event = publish("shop.paid", {"order_id": 2, "card": {"number": CARD}})
    [message] = [m for m in drain(queue) if m["subscription"] == "shop-receipt"]
    assert CARD not in json.dumps(message)  # sealed (delivery/sealing.py)
    # Opened, as a message from before sealing: workers take both.
    message["event"] = open_event(message["event"])
    message["event"]["payload"]["card"]["number"] = int(CARD)  # the schema changed since

    with caplog.at_level(logging.DEBUG):
        outcome = process_message(message, retries=0, manage_connections=False)

    assert outcome.status == "failed"
    row = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
    assert f"$.card.number: {MASK!r} is not of type 'string'" in row.last_error
    assert CARD not in row.last_error and CARD not in caplog.text


# A redacted value (pin) that another problem's message holds (10, 1000).
VAULT = {
    "vault.opened": {
        "schema": {
            "type": "object",
            "properties": {
                "pin": {"type": "string"},
                "qty": {"type": "integer", "minimum": 1000},
                "card": {"type": "object", "properties": {"number": {"type": "string"}}},
            },
            "not": {"required": ["forbidden"]},
        },
        "redact": ["pin", "card"],
    }
}
VAULT_ERROR = (
    "Payload no longer valid for 'vault.opened': "
    f"$.pin: {MASK!r} is not of type 'string'; $.qty: 10 is less than the minimum of 1000"
)


def vault_wiring(queue: str, mode: str = "async", **declared: Any):
    subscription = {
        "name": "vault-audit",
        "event": "vault.opened",
        "handler": "tests.app.handlers.record",
        "mode": mode,
    }
    events = {"vault.opened": {**VAULT["vault.opened"], **declared}}
    return shop_wiring(queue, EVENTS=events, SUBSCRIPTIONS=[subscription])


# Version 2 of vault.opened, whose upcaster passes a v1 payload on as it is.
UPCAST = {"version": 2, "upcast": {1: "builtins.dict"}}
UPCAST_ERROR = (
    "Upcaster v1 -> v2 of event 'vault.opened' (builtins.dict) returned an invalid payload: "
    f"$.pin: {MASK!r} is not of type 'string'; $.qty: 10 is less than the minimum of 1000"
)


def _failed_vault_delivery() -> EventRecord:
    """A stored v1 vault.opened that the schema refuses, its sync delivery failed."""
    record = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="vault.opened",
        payload={"pin": 1000, "qty": 10},
        correlation_id=uuid.uuid4(),
        status="dispatched",
        version=1,
    )
    save_deliveries("default", [delivery(record.pk, "vault-audit", "sync", "failed", 1, "Boom")])
    return record


@pytest.mark.django_db
def test_publish_refuses_a_payload_with_problems_masked_by_path(queue) -> None:
    payload = {"pin": 1, "qty": 10, "card": {"number": CARD}, "forbidden": 1}
    with vault_wiring(queue), pytest.raises(InvalidPayload) as caught:
        publish("vault.opened", payload)

    masked_payload = {**payload, "pin": MASK, "card": MASK}
    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("$", f"{masked_payload!r} should not be valid under {{'required': ['forbidden']}}"),
        ("$.pin", f"{MASK!r} is not of type 'string'"),
        ("$.qty", "10 is less than the minimum of 1000"),
    ]
    assert CARD not in str(caught.value)


@pytest.mark.django_db
def test_messages_that_do_not_quote_the_value_are_masked_too(queue) -> None:
    checkout = {
        "checkout.paid": {
            "schema": {
                "type": "object",
                "properties": {
                    "lines": {
                        "type": "array",
                        "contains": {"required": ["card"]},
                        "maxContains": 1,
                    },
                    "card": {
                        "type": "object",
                        "required": ["number"],
                        "additionalProperties": False,
                        "properties": {"number": {"type": "string"}},
                    },
                },
            },
            "redact": ["card", "lines.card"],
        }
    }
    payload = {"lines": [{"card": CARD}, {"card": "4222222222222222"}], "card": {"cvv": "123"}}

    with shop_wiring(queue, EVENTS=checkout), pytest.raises(InvalidPayload) as caught:
        publish("checkout.paid", payload)

    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("$.card", "'number' is a required property"),  # names the schema's key only
        ("$.card", f"{MASK!r} does not satisfy 'additionalProperties'"),  # 'cvv' unsaid
        ("$.lines", f"[{{'card': {MASK!r}}}, {{'card': {MASK!r}}}] does not satisfy 'maxContains'"),
    ]
    assert CARD not in str(caught.value) and "cvv" not in str(caught.value)


@pytest.mark.django_db
def test_values_that_cannot_travel_as_json_are_masked_by_path(queue) -> None:
    payload = {"card": {"number": "x", "expiry": datetime.date(2031, 1, 1)}, "ratio": math.nan}
    with vault_wiring(queue), pytest.raises(InvalidPayload) as caught:
        publish("vault.opened", payload)

    assert [str(p) for p in caught.value.problems] == [
        f"$.card.expiry: date {MASK!r} is not JSON-serializable",
        "$.ratio: nan is not a JSON number",
    ]


@pytest.mark.django_db
def test_the_worker_records_a_stale_payload_masked_by_path_not_garbled(
    queue, django_capture_on_commit_callbacks
) -> None:
    with vault_wiring(queue):
        with django_capture_on_commit_callbacks(execute=True):
            event = publish("vault.opened", {"pin": "1000", "qty": 1200})
        [message] = drain(queue)
        message["event"] = open_event(message["event"])
        message["event"]["payload"].update(pin=1000, qty=10)  # the schema changed since

        outcome = process_message(message, retries=0, manage_connections=False)

    assert outcome.status == "failed"
    row = Delivery.objects.get(event_id=event.id, subscription="vault-audit")
    assert row.last_error == VAULT_ERROR


@pytest.mark.django_db
def test_the_worker_records_an_invalid_upcast_masked_by_path_naming_the_upcaster(
    queue, django_capture_on_commit_callbacks
) -> None:
    with vault_wiring(queue, **UPCAST):
        with django_capture_on_commit_callbacks(execute=True):
            event = publish("vault.opened", {"pin": "1000", "qty": 1200})
        [message] = drain(queue)
        message["event"] = open_event(message["event"])
        message["event"].update(version=1, payload={"pin": 1000, "qty": 10})  # sent by v1

        outcome = process_message(message, retries=0, manage_connections=False)

    assert outcome.status == "failed"
    row = Delivery.objects.get(event_id=event.id, subscription="vault-audit")
    assert row.last_error == UPCAST_ERROR


@pytest.mark.django_db
def test_a_retry_records_an_invalid_upcast_masked_by_path_naming_the_upcaster(queue) -> None:
    record = _failed_vault_delivery()

    with vault_wiring(queue, mode="sync", **UPCAST):
        call_command("events_retry", "--subscription", "vault-audit", stdout=StringIO())

    row = Delivery.objects.get(event_id=record.pk, subscription="vault-audit")
    assert row.last_error == UPCAST_ERROR


@pytest.mark.django_db
def test_a_retry_records_a_stale_payload_masked_by_path_not_garbled(queue, admin_client) -> None:
    record = _failed_vault_delivery()

    with vault_wiring(queue, mode="sync"):
        call_command("events_retry", "--subscription", "vault-audit", stdout=StringIO())
        row = Delivery.objects.get(event_id=record.pk, subscription="vault-audit")
        assert row.last_error == VAULT_ERROR
        page = admin_client.get(reverse("admin:django_events_failure_change", args=[row.pk]))

    assert escape(VAULT_ERROR) in page.content.decode()  # the admin leaves it as recorded


def test_redact_text_masks_whole_tokens_only() -> None:
    data = {"pin": 1000, "code": "abc", "email": "ada@example.com", "n": 42}
    text = (
        "pin 1000 refused after 10000 tries (1000.5, 2.1000, x1000); code 'abc' abcd; "
        "mail ada@example.com."
    )

    masked = redact_text(text, data, ["pin", "code", "email", "n"])

    assert masked == (
        f"pin {MASK!r} refused after 10000 tries (1000.5, 2.1000, x1000); code {MASK!r} abcd; "
        f"mail {MASK!r}."
    )


def test_redact_text_leaves_short_scalars() -> None:
    text = "10 is less than the minimum of 1; line 42"
    assert redact_text(text, {"pin": 1, "n": 42, "c": "ab"}, ["pin", "n", "c"]) == text


def test_the_exception_celery_is_shown_for_a_retry_masks_the_redacted_values(settings) -> None:
    # orders.placed redacts `email` (base.yaml); orders.shipped redacts nothing.
    email = "carol@example.com"
    error = RuntimeError(f"cannot mail {email}")

    def message(name: str, *, sealed: bool = False) -> dict:
        event_id = uuid.uuid4()
        payload = {"order_id": 1, "email": email}
        event = Event(event_id, name, payload, {}, timezone.now(), event_id, None, payload)
        body = event_body(event)
        return build_message(seal_event(body, ["email"]) if sealed else body, "sub", "default")

    for sealed in (False, True):
        shown = masked_for_celery(message("orders.placed", sealed=sealed), error)
        assert repr(shown) == f"RuntimeError({f'cannot mail {MASK!r}'!r})", repr(shown)
        assert str(shown) == f"cannot mail {MASK!r}"
        # Celery keeps what pickles (else a wrapper with another name): this does, as is.
        assert repr(get_pickleable_exception(shown)) == repr(shown)
        assert repr(pickle.loads(pickle.dumps(shown))) == repr(shown)
    assert masked_for_celery(message("orders.shipped"), error) is error
    assert masked_for_celery(message("orders.placed"), None) is None
    # A payload this process cannot open (sealed under another key): no text is shown.
    sealed = message("orders.placed", sealed=True)
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "another key, not the sealer's", []
    unopened = masked_for_celery(sealed, error)
    assert "carol" not in repr(unopened) and repr(unopened).startswith("RuntimeError(")


def test_the_exception_celery_is_shown_is_masked_with_the_payload_the_handler_got() -> None:
    # v2 renames total (v1) to amount and redacts it: the handler's error quotes the upcast
    # value, which only the upcast payload holds.
    events = {
        "ver.placed": {
            "version": 2,
            "upcast": {1: "tests.app.upcasters.split_total"},
            "redact": ["amount"],
        },
        "ver.exploding": {
            "version": 2,
            "upcast": {1: "tests.app.upcasters.explode"},
            "redact": ["pin"],
        },
    }

    def message(name: str, payload: dict) -> dict:
        event_id = uuid.uuid4()
        event = Event(event_id, name, payload, {}, timezone.now(), event_id, None, payload, 1)
        return build_message(event_body(event), "sub", "default")

    with override_settings(DJANGO_EVENTS={**settings.DJANGO_EVENTS, "EVENTS": events}):
        upcast = masked_for_celery(
            message("ver.placed", {"order_id": 1, "total": 123.45}),
            ValueError("amount 12345 declined"),
        )
        # An upcaster that fails ran no handler; the payload as sent still masks.
        exploded = masked_for_celery(
            message("ver.exploding", {"pin": "2468"}), RuntimeError("pin 2468 refused")
        )
    assert str(upcast) == f"amount {MASK!r} declined"
    assert str(exploded) == f"pin {MASK!r} refused"
    error = RuntimeError("not a message of ours")
    assert masked_for_celery("not a message", error) is error


@pytest.mark.parametrize("card", [CARD, [CARD], int(CARD)], ids=["string", "list", "number"])
def test_a_redacted_value_sent_in_the_wrong_shape_is_not_quoted_by_the_schema_error(
    card: object, queue: str
) -> None:
    # redact: [card.number]; a client sends the number itself where the card object goes.
    with shop_wiring(queue), pytest.raises(InvalidPayload) as raised:
        publish("shop.paid", {"order_id": 1, "card": card})

    assert str(int(CARD)) not in str(raised.value)
    shown = f"[{MASK!r}]" if isinstance(card, list) else repr(MASK)
    assert f"$.card: {shown} is not of type 'object'" in str(raised.value)


def test_a_null_where_a_redacted_value_goes_is_quoted(queue: str) -> None:
    with shop_wiring(queue), pytest.raises(InvalidPayload) as raised:
        publish("shop.paid", {"order_id": 1, "card": None})

    assert "$.card: None is not of type 'object'" in str(raised.value)
