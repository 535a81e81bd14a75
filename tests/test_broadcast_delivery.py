"""Broadcast with two real `celery worker` processes: each runs the broadcast subscription
once per event, while a normal subscription runs once in total; a copy one worker does not
run, or whose run asks for a retry, is not sent to every worker again (RabbitMQ, Redis, and
the filesystem transport)."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import transaction

from django_events import publish
from django_events.models import Delivery
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import fresh_queue, wait_for, wait_idle, worker_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


@contextmanager
def broadcast_workers(kind: str, folder: Path, manifests: dict[str, str]) -> Iterator[str]:
    """Workers named as ``manifests``' keys, each of the release its manifest declares, on a
    queue of their own (its name yielded) whose broadcasts they consume; the test process
    publishes as broadcast.yaml declares."""
    with fresh_queue(kind, f"bc-{kind}") as queue:
        workers = [
            worker_for(
                kind,
                queue,
                folder,
                manifest=manifest,
                node=f"{queue}-{name}",
                env={"DJANGO_EVENTS_TEST_WORKER": name},
            )
            for name, manifest in manifests.items()
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


@pytest.fixture(params=brokers.worker_kinds("filesystem", "amqp", "redis"))
def two_workers(request, django_db_setup, django_db_blocker, tmp_path) -> Iterator[str]:
    with broadcast_workers(
        request.param, tmp_path, {"w1": "broadcast.yaml", "w2": "broadcast.yaml"}
    ) as queue:
        yield queue


def copies_of(event_id: uuid.UUID) -> Counter[str]:
    """How many times each worker ran the broadcast handler for the event."""
    runs = HandlerRun.objects.filter(handler="record_worker", event_id=event_id)
    return Counter(run.payload["worker"] for run in runs)


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


@pytest.mark.parametrize("kind", brokers.worker_kinds("filesystem", "amqp", "redis"))
def test_a_broadcast_copy_too_new_for_one_worker_is_not_sent_to_every_worker_again(
    kind: str, tmp_path: Path
) -> None:
    # A rolling deploy: w1 is of the release before (bc.versioned v1), the event is v2. The
    # copy w1 cannot run is not sent again: a retry would go through the fanout exchange, to
    # every worker, and w2 would run the event once more at each of w1's waits.
    with broadcast_workers(kind, tmp_path, {"w1": "broadcast_v1.yaml", "w2": "broadcast.yaml"}):
        with transaction.atomic():
            event = publish("bc.versioned", {"n": 1})

        def failed() -> Delivery | None:
            return Delivery.objects.filter(event_id=event.id, status="failed").first()

        # Before w1's copy could come round again: each worker ran it at most once.
        wait_for(
            lambda: failed() is not None or copies_of(event.id)["w2"] > 1,
            60,
            "w1 to drop its copy",
        )
        wait_for(lambda: copies_of(event.id)["w2"], 30, "w2 to run its copy")
        assert copies_of(event.id) == Counter({"w2": 1})
        wait_idle()  # both workers: a copy sent again would have run by now
        assert copies_of(event.id) == Counter({"w2": 1})
        row = failed()
        assert row is not None and row.attempts == 0  # w1 ran nothing
        assert re.fullmatch(
            r"on \S+ pid \d+: Not run on this worker: Event 'bc.versioned' is version 2; this "
            r"process knows up to version 1\. A broadcast copy is not sent again \(it would "
            r"reach every worker\)",
            row.last_error,
        ), row.last_error


@pytest.mark.parametrize("kind", brokers.worker_kinds("filesystem", "amqp"))
def test_a_broadcast_copy_whose_handler_asks_for_a_retry_is_not_retried(
    kind: str, tmp_path: Path
) -> None:
    with broadcast_workers(kind, tmp_path, {"w1": "broadcast.yaml", "w2": "broadcast.yaml"}):
        with transaction.atomic():
            event = publish("bc.retrying", {"retry_on": "w1"})
        wait_for(lambda: len(copies_of(event.id)) == 2, 60, "a copy on each worker")
        wait_for(
            lambda: Delivery.objects.filter(event_id=event.id, status="failed").exists(),
            30,
            "w1's failure",
        )
        wait_idle()
        assert copies_of(event.id) == Counter({"w1": 1, "w2": 1})
        row = Delivery.objects.get(event_id=event.id)
        assert row.last_error.endswith(
            "RetryLater: retry in 0.2s (not retried: a broadcast copy is never retried)"
        ), row.last_error
