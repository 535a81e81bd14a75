"""Sealed payloads (django_events.delivery.sealing): what monitors see, what workers open."""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from django.db import transaction
from django.test import override_settings

from django_events import publish
from django_events.delivery.sealing import Unsealable, open_event, seal, seal_event, unseal
from django_events.delivery.worker import process_message
from django_events.models import Delivery
from django_events.wiring.redaction import MASK
from tests.app.models import HandlerRun
from tests.ops import drain, shop_wiring

CARD = "4111111111111111"
DATA = {"order_id": 7, "email": "ada@example.com", "card": {"number": CARD}}
PATHS = ("email", "card.number")


def test_a_sealed_payload_is_masked_and_opens_for_its_event_only() -> None:
    event_id = str(uuid.uuid4())

    masked, token = seal(DATA, PATHS, event_id)

    assert masked == {"order_id": 7, "email": MASK, "card": {"number": MASK}}
    assert token is not None and CARD not in token and "ada" not in token
    assert unseal(token, event_id) == DATA
    with pytest.raises(Unsealable, match="neither SECRET_KEY nor SECRET_KEY_FALLBACKS"):
        unseal(token, str(uuid.uuid4()))  # moved to another event
    with pytest.raises(Unsealable, match="not base64"):
        unseal("not base64!", event_id)


def test_nothing_to_mask_means_nothing_sealed() -> None:
    message = {"id": str(uuid.uuid4()), "payload": {"order_id": 1}}

    assert seal_event(message, PATHS) is message
    assert seal_event(message, ()) is message
    assert open_event(message) is message


def test_keys_rotate_with_secret_key_fallbacks() -> None:
    event_id = str(uuid.uuid4())
    with override_settings(SECRET_KEY="old-" * 16):
        _, token = seal(DATA, PATHS, event_id)
    assert token is not None

    with override_settings(SECRET_KEY="new-" * 16, SECRET_KEY_FALLBACKS=["old-" * 16]):
        assert unseal(token, event_id) == DATA
    with override_settings(SECRET_KEY="new-" * 16), pytest.raises(Unsealable):
        unseal(token, event_id)


@pytest.mark.django_db(transaction=True)
def test_the_worker_opens_a_sealed_message_and_runs_the_handler(caplog) -> None:
    with shop_wiring():
        with transaction.atomic():
            event = publish("shop.paid", {"order_id": 2, "total": 1500, "card": {"number": CARD}})
        [message] = [m for m in drain("big-orders") if m["event"]["id"] == str(event.id)]
        assert CARD not in json.dumps(message)
        assert message["event"]["payload"]["card"]["number"] == MASK
        with caplog.at_level(logging.DEBUG):
            outcome = process_message(message, retries=0, manage_connections=False)

    assert outcome.status == "succeeded"
    # The handler got the real payload.
    [run] = HandlerRun.objects.filter(event_id=event.id, handler="record_other")
    assert run.payload == {"order_id": 2, "total": 1500, "card": {"number": CARD}}
    assert CARD not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_message_sealed_with_another_key_is_a_recorded_failure() -> None:
    queue = f"seal-{uuid.uuid4().hex[:8]}"
    with shop_wiring(queue):
        with override_settings(SECRET_KEY="another-" * 8), transaction.atomic():
            event = publish("shop.paid", {"order_id": 3, "card": {"number": CARD}})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-receipt"]
        outcome = process_message(message, retries=0, manage_connections=False)

    assert outcome.status == "failed"
    row = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
    assert row.status == "failed"
    assert "Cannot open the event's payload" in row.last_error
    assert "SECRET_KEY_FALLBACKS" in row.last_error


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("sealed", "reason"),
    [(5, "sealed is int, not a string"), ("not base64!", "the sealed payload is not base64")],
)
def test_a_tampered_sealed_message_is_a_recorded_failure(sealed: object, reason: str) -> None:
    queue = f"seal-{uuid.uuid4().hex[:8]}"
    with shop_wiring(queue):
        with transaction.atomic():
            event = publish("shop.paid", {"order_id": 4, "card": {"number": CARD}})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-receipt"]
        message["event"]["sealed"] = sealed
        outcome = process_message(message, retries=0, manage_connections=False)

    assert outcome.status == "failed"
    row = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
    assert row.status == "failed"
    assert reason in row.last_error
    assert not HandlerRun.objects.filter(event_id=event.id, handler="fails_first_time").exists()
