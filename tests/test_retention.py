"""The tasks Celery beat schedules, run by a real worker: ``django_events.prune`` applies
``RETENTION``; ``django_events.relay`` sends what the broker missed."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from django_events import publish
from django_events.delivery.recording import delivery, save_deliveries
from django_events.models import Delivery, EventRecord, IdempotencyKey
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import start_worker, wait_for, wait_idle

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


def _old(days: float, **fields: object) -> EventRecord:
    event = publish("orders.shipped", {"order_id": 1})
    EventRecord.objects.filter(pk=event.id).update(
        occurred_at=timezone.now() - timedelta(days=days), **fields
    )
    return EventRecord.objects.get(pk=event.id)


def _key(name: str, expired_days_ago: float) -> None:
    IdempotencyKey.objects.create(
        event_name="orders.shipped",
        key=name,
        event_id=uuid.uuid4(),
        expires_at=timezone.now() - timedelta(days=expired_days_ago),
    )


@pytest.mark.parametrize(
    ("retention", "left"),
    [
        (None, {"recent", "failed", "pending"}),  # the default: 30 days, failures kept
        ({"events": 50}, {"old", "recent", "failed", "pending"}),
        ({"events": None, "idempotency_keys": 0}, {"old", "recent", "failed", "pending"}),
    ],
)
def test_the_prune_task_on_a_worker_applies_retention(retention, left, tmp_path) -> None:
    records = {
        "old": _old(40, status="dispatched"),
        "recent": _old(20, status="dispatched"),
        "failed": _old(40, status="dispatched"),
        "pending": _old(40, status="pending"),
    }
    Delivery.objects.create(
        event_id=records["failed"].pk, subscription="s", mode="async", status="failed"
    )
    _key("expired", 2)
    _key("live", -1)
    env = {} if retention is None else {"DJANGO_EVENTS_TEST_RETENTION": json.dumps(retention)}
    with start_worker("filesystem", tmp_path, prefix="retention", env=env) as worker:
        brokers.filesystem.send_task("django_events.prune", queue=worker.queue)
        wait_for(
            lambda: not IdempotencyKey.objects.filter(key="expired").exists(),
            what="the prune task",
        )
    kept = {name for name, record in records.items() if _exists(record)}
    assert kept == left
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["live"]


def _exists(record: EventRecord) -> bool:
    return EventRecord.objects.filter(pk=record.pk).exists()


def test_the_relay_task_on_a_worker_sends_what_the_broker_missed(tmp_path) -> None:
    # The worker sends with its own app, as a deployed worker does.
    env = {"DJANGO_EVENTS_TEST_CELERY_APP": "tests.brokers.filesystem"}
    with start_worker("filesystem", tmp_path, prefix="relay", env=env) as worker:
        with (
            brokers.delivery_wiring("unreachable", worker.queue, "delivery.yaml"),
            transaction.atomic(),
        ):
            ids = [publish("it.placed", {"order_id": n}).id for n in range(5)]
        assert set(EventRecord.objects.values_list("status", flat=True)) == {"pending"}
        # A sync retry whose process died two hours ago in its handler (see
        # test_ops_commands: the relay records it failed, as events_relay does).
        save_deliveries("default", [delivery(ids[0], "it-sync", "sync", "running", 1)])
        Delivery.objects.filter(subscription="it-sync").update(
            updated_at=timezone.now() - timedelta(hours=2)
        )

        brokers.filesystem.send_task(
            "django_events.relay", kwargs={"min_age": 0, "batch_size": 2}, queue=worker.queue
        )

        # Three batches of two: the whole backlog in one run of the task.
        handled = HandlerRun.objects.filter(handler="record", event_id__in=ids)
        wait_for(lambda: handled.count() == 5, what="the relayed events")
        wait_idle(worker)
        assert handled.count() == 5  # each once
    assert set(EventRecord.objects.values_list("status", flat=True)) == {"dispatched"}
    interrupted = Delivery.objects.get(subscription="it-sync")
    assert (interrupted.status, interrupted.attempts) == ("failed", 2)
    assert interrupted.last_error.startswith("Interrupted: ")
