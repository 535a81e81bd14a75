"""Broadcast with two real `celery worker` processes: each runs the broadcast subscription
once per event, while a normal subscription runs once in total (RabbitMQ, Redis, and the
filesystem transport)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from django.db import transaction

from django_events import publish
from django_events.models import Delivery
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import fresh_queue, wait_for, wait_idle, worker_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


@pytest.fixture(params=brokers.worker_kinds("filesystem", "amqp", "redis"))
def two_workers(request, django_db_setup, django_db_blocker, tmp_path) -> Iterator[str]:
    kind = request.param
    with fresh_queue(kind, f"bc-{kind}") as queue:
        workers = [
            worker_for(
                kind,
                queue,
                tmp_path,
                manifest="broadcast.yaml",
                node=f"{queue}-{name}",
                env={"DJANGO_EVENTS_TEST_WORKER": name},
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
    wait_idle()  # both workers: a duplicate would have run by now

    assert copies() == Counter({(str(i), w): 1 for i in ids for w in ("w1", "w2")})
    normal = HandlerRun.objects.filter(handler="record", event_id__in=ids)
    assert sorted(str(r.event_id) for r in normal) == sorted(map(str, ids))  # once in total
    statuses = Delivery.objects.filter(event_id__in=ids).values_list("subscription", "status")
    assert Counter(statuses) == Counter(
        {("bc-everywhere", "succeeded"): 3, ("bc-once", "succeeded"): 3}
    )
