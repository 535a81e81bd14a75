"""Redaction: masking payload keys for display, and in messages built from the payload."""

from __future__ import annotations

import logging
import uuid
from io import StringIO

import pytest
from django.core.management import call_command

from django_events import publish
from django_events.delivery.recording import delivery, save_deliveries
from django_events.delivery.worker import process_message
from django_events.models import Delivery, EventRecord
from django_events.wiring.redaction import MASK, redact, redact_text
from tests.ops import drain

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
    message["event"]["payload"]["card"]["number"] = int(CARD)  # the schema changed since

    with caplog.at_level(logging.DEBUG):
        outcome = process_message(message, retries=0, manage_connections=False)

    assert outcome.status == "failed"
    row = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
    assert f"$.card.number: {MASK!r} is not of type 'string'" in row.last_error
    assert CARD not in row.last_error and CARD not in caplog.text
