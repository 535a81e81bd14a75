"""End to end: a signed HTTP call -> publish() -> Redis -> a real `celery worker` -> handler."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.test import Client, override_settings

from django_events.models import Delivery, EventRecord
from tests.app.models import HandlerRun
from tests.inbound import SECRET, inbound_wiring, post_signed
from tests.worker import start_worker, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


def test_a_signed_call_is_handled_by_a_real_worker(tmp_path: Path) -> None:
    with (
        start_worker("redis", tmp_path, prefix="inbound", manifest="inbound.yaml") as worker,
        inbound_wiring(CELERY_APP="tests.brokers.redis", DEFAULT_QUEUE=worker.queue),
        override_settings(TEST_HOOK_SECRET=SECRET),
    ):
        response = post_signed(Client(), "hooks.paid", {"payment_id": "pay_w", "amount": 9})
        assert response.status_code == 202, response.content
        event_id = response.json()["id"]

        run = wait_for(
            lambda: HandlerRun.objects.filter(event_id=event_id).first(),
            what="the worker's run of hooks-paid-record",
        )
        delivery = wait_for(
            lambda: Delivery.objects.filter(event_id=event_id, status="succeeded").first(),
            what="the succeeded delivery",
        )

    assert run.payload == {"payment_id": "pay_w", "amount": 9}
    assert run.pid != os.getpid()  # the worker ran it, not this process
    assert (delivery.subscription, delivery.mode, delivery.attempts) == (
        "hooks-paid-record",
        "async",
        1,
    )
    record = EventRecord.objects.get(pk=event_id)
    assert record.status == "dispatched"
    assert record.headers == {"source": "payments", "caller": "hmac:TEST_HOOK_SECRET"}
