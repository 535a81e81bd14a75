"""End to end: a signed HTTP call -> publish() -> Redis -> a real `celery worker` -> handler."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client, override_settings

from django_events.models import Delivery, EventRecord
from tests import brokers
from tests.app.models import HandlerRun
from tests.inbound import SECRET, inbound_wiring, post_signed
from tests.worker import WorkerProcess, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


def test_a_signed_call_is_handled_by_a_real_worker(tmp_path: Path) -> None:
    brokers.require_server(brokers.REDIS_URL, "Redis")
    queue = f"inbound-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        "redis",
        queue,
        connection.settings_dict["NAME"],
        tmp_path / "worker.log",
        extra_env={"DJANGO_EVENTS_TEST_MANIFEST": "inbound.yaml"},
    )
    try:
        with (
            worker,
            inbound_wiring(CELERY_APP="tests.brokers.redis", DEFAULT_QUEUE=queue),
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
    finally:
        with brokers.redis.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)

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
