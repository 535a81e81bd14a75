"""SUCCESS_RECORDS = "batched" on a real `celery worker` (filesystem transport, RabbitMQ, Redis).

Success rows of first attempts reach the database after the handler, in batches; failures are
written as before; a worker shutting down writes what still waits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import transaction

from django_events import publish_many
from django_events.models import Delivery
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import WorkerProcess, fresh_queue, wait_for, worker_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


def batched_worker(kind: str, queue: str, folder: Path, interval: float) -> WorkerProcess:
    env = {
        "DJANGO_EVENTS_TEST_SUCCESS_RECORDS": "batched",
        "DJANGO_EVENTS_TEST_FLUSH_INTERVAL": str(interval),
    }
    return worker_for(kind, queue, folder, env=env)


@pytest.fixture(params=brokers.worker_kinds("filesystem", "amqp", "redis"))
def kind(request) -> str:
    return str(request.param)


@pytest.fixture
def queue(kind: str) -> Iterator[str]:
    with (
        fresh_queue(kind, f"batched-{kind}") as name,
        brokers.delivery_wiring(kind, name, "delivery.yaml"),
    ):
        yield name


def publish_orders(count: int, **extra: object) -> list[uuid.UUID]:
    with transaction.atomic():
        events = publish_many(
            [("it.placed", {"order_id": i, "total": 5.0, **extra}) for i in range(count)]
        )
    return [e.id for e in events]


def handled(ids: list[uuid.UUID]) -> int:
    return HandlerRun.objects.filter(handler="record", event_id__in=ids).count()


def deliveries(ids: list[uuid.UUID], subscription: str) -> set[tuple[str, str, int]]:
    rows = Delivery.objects.filter(event_id__in=ids, subscription=subscription)
    return {(str(r.event_id), r.status, r.attempts) for r in rows}


def test_success_rows_follow_the_handlers_and_failures_are_recorded_as_before(
    kind: str, queue: str, tmp_path: Path
) -> None:
    with batched_worker(kind, queue, tmp_path, interval=0.2):
        ids = publish_orders(30)
        failing = publish_orders(1, fail=True)

        wait_for(lambda: handled(ids) == 30, timeout=60, what="30 handler runs")
        wait_for(
            lambda: len(deliveries(ids, "it-record")) == 30, timeout=30, what="30 success rows"
        )
        wait_for(
            lambda: deliveries(failing, "it-fails") == {(str(failing[0]), "failed", 3)},
            timeout=60,
            what="the failing subscription's final failure",
        )

    assert deliveries(ids, "it-record") == {(str(i), "succeeded", 1) for i in ids}
    assert handled(ids) == 30  # each handler ran once: nothing was redelivered


def test_a_worker_shutting_down_writes_the_success_rows_still_waiting(
    kind: str, queue: str, tmp_path: Path
) -> None:
    worker = batched_worker(kind, queue, tmp_path, interval=3600)  # only the exit writes
    with worker:
        ids = publish_orders(12)
        wait_for(lambda: handled(ids) == 12, timeout=60, what="12 handler runs")
        assert deliveries(ids, "it-record") == set()  # handled, their rows still waiting

        worker.stop()  # warm shutdown: each pool process writes its rows as it exits

    assert worker.process is not None and worker.process.returncode == 0
    assert deliveries(ids, "it-record") == {(str(i), "succeeded", 1) for i in ids}
