"""Broadcast with two real `celery worker` processes: each runs the broadcast subscription
once per event, while a normal subscription runs once in total (RabbitMQ, Redis, and the
filesystem transport)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from django.db import connection, transaction

from django_events import publish
from django_events.models import Delivery
from django_events.wiring.compiled import exchange_name
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import WorkerProcess, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


# The filesystem transport (the embedded default) only in the PostgreSQL pass: test time.
@pytest.fixture(params=["amqp", "redis", pytest.param("filesystem", marks=pytest.mark.postgresql)])
def two_workers(request, django_db_setup, django_db_blocker, tmp_path) -> Iterator[str]:
    kind = request.param
    brokers.require_server(brokers.URLS[kind], kind)
    queue = f"bc-{kind}-{uuid.uuid4().hex[:8]}"
    workers = [
        WorkerProcess(
            kind,
            queue,
            connection.settings_dict["NAME"],
            tmp_path / f"{name}.log",
            extra_env={
                "DJANGO_EVENTS_TEST_MANIFEST": "broadcast.yaml",
                "DJANGO_EVENTS_TEST_WORKER": name,
                "DJANGO_EVENTS_FS_BROKER": str(brokers.FS_FOLDER),
            },
            node=f"{queue}-{name}",
        )
        for name in ("w1", "w2")
    ]
    try:
        # Both bind their broadcast queues at once: on the filesystem transport, the same
        # exchange table file (kombu's own transport made one of them exit at start).
        for worker in workers:
            worker.launch()
        for worker in workers:
            worker.wait_ready()
        with brokers.delivery_wiring(kind, queue, "broadcast.yaml"):
            yield queue
    finally:
        for worker in workers:  # the test waited for every delivery: nothing is running
            worker.stop(wait=False, cold=True)
        for worker in workers:
            worker.stop()
        _clean_up(kind, queue)


def _clean_up(kind: str, queue: str) -> None:
    with getattr(brokers, kind).connection_for_write() as conn:
        channel = conn.default_channel
        channel.queue_delete(queue)
        for exchange in (queue, exchange_name(queue)):
            channel.exchange_delete(exchange)


def test_each_worker_runs_a_broadcast_once_and_a_normal_subscription_runs_once(
    two_workers: str,
) -> None:
    ids = []
    for key in ("a", "b", "c"):
        with transaction.atomic():
            ids.append(publish("bc.changed", {"key": key}).id)

    def copies() -> Counter[tuple[str, str]]:
        runs = HandlerRun.objects.filter(handler="record_worker", event_id__in=ids)
        return Counter((str(r.event_id), r.payload["worker"]) for r in runs)

    wait_for(lambda: len(copies()) == 6, what="a copy of each event on each worker")
    wait_for(
        lambda: HandlerRun.objects.filter(handler="record", event_id__in=ids).count() >= 3,
        what="the normal subscription",
    )
    time.sleep(0.5)  # give a duplicate the time to show up

    assert copies() == Counter({(str(i), w): 1 for i in ids for w in ("w1", "w2")})
    normal = HandlerRun.objects.filter(handler="record", event_id__in=ids)
    assert sorted(str(r.event_id) for r in normal) == sorted(map(str, ids))  # once in total
    statuses = Delivery.objects.filter(event_id__in=ids).values_list("subscription", "status")
    assert Counter(statuses) == Counter(
        {("bc-everywhere", "succeeded"): 3, ("bc-once", "succeeded"): 3}
    )
