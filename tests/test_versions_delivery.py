"""Event versions through real `celery worker` processes: replay after an upcaster lands,
a rolling deploy (two workers of different releases on one queue), failing upcasters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings

from django_events import publish
from django_events.models import Delivery, EventRecord
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import WorkerProcess, fresh_queue, wait_for, worker_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

KIND = "filesystem"
V1_PLACED = {
    "schema": {
        "type": "object",
        "required": ["order_id", "total"],
        "properties": {"order_id": {"type": "integer"}, "total": {"type": "number"}},
    }
}


def worker(queue: str, manifest: str, folder: Path, node: str) -> WorkerProcess:
    """A worker of the release whose manifest is ``manifest`` (besides base.yaml)."""
    return worker_for(KIND, queue, folder, manifest=manifest, node=f"{queue}-{node}")


@pytest.fixture
def queue() -> Iterator[str]:
    with fresh_queue(KIND, "ver") as name:
        yield name


@pytest.fixture
def v2_worker(queue: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    with worker(queue, "versions_v2.yaml", tmp_path, "v2") as process:
        yield process


def runs(event_ids: list[uuid.UUID]) -> list[HandlerRun]:
    return list(HandlerRun.objects.filter(handler="record", event_id__in=event_ids))


def test_stored_v1_events_replay_through_a_worker_after_the_v2_upcaster_lands(
    queue: str, v2_worker: WorkerProcess
) -> None:
    # Release 1 stored these (no async subscription then: records only).
    release_1 = {**settings.DJANGO_EVENTS, "MANIFESTS": [], "EVENTS": {"ver.placed": V1_PLACED}}
    with override_settings(DJANGO_EVENTS=release_1):
        ids = [publish("ver.placed", {"order_id": n, "total": n + 0.5}).id for n in range(3)]
    assert set(EventRecord.objects.filter(pk__in=ids).values_list("version", flat=True)) == {1}

    with brokers.delivery_wiring(KIND, queue, "versions_v2.yaml"):
        call_command("events_replay", "ver-record", "--event", "ver.placed")
        wait_for(lambda: len(runs(ids)) == 3, 60, "the replayed events to be handled")
        # The handler's own row commits before the worker writes the delivery's outcome.
        wait_for(
            lambda: not Delivery.objects.filter(event_id__in=ids, status="pending").exists(),
            30,
            "the replayed deliveries' outcomes",
        )

    seen = {run.event_id: run.payload for run in runs(ids)}
    assert [seen[i] for i in ids] == [
        {"order_id": n, "amount": n * 100 + 50, "currency": "EUR"} for n in range(3)
    ]
    stored = EventRecord.objects.get(pk=ids[0])
    assert (stored.version, stored.payload) == (1, {"order_id": 0, "total": 0.5})  # untouched
    assert set(Delivery.objects.filter(event_id__in=ids).values_list("status", "attempts")) == {
        ("succeeded", 1)
    }


def test_v1_messages_in_flight_are_upcast_by_a_v2_worker(
    queue: str, v2_worker: WorkerProcess
) -> None:
    with brokers.delivery_wiring(KIND, queue, "versions_v1.yaml"):
        event = publish("ver.placed", {"order_id": 7, "total": 1.25})
    wait_for(lambda: len(runs([event.id])) == 1, 60, "the v1 message to be handled")

    assert runs([event.id])[0].payload == {"order_id": 7, "amount": 125, "currency": "EUR"}


@pytest.mark.parametrize(
    ("name", "error"),
    [
        (
            "ver.exploding",
            "Upcaster v1 -> v2 of event 'ver.exploding' (tests.app.upcasters.explode) raised "
            "RuntimeError: upcaster exploded on purpose",
        ),
        (
            "ver.invalid",
            "Upcaster v1 -> v2 of event 'ver.invalid' (tests.app.upcasters.drop_everything) "
            "returned an invalid payload: $: 'order_id' is a required property",
        ),
    ],
)
def test_a_failing_upcaster_is_a_failed_delivery_naming_the_step(
    queue: str, v2_worker: WorkerProcess, name: str, error: str
) -> None:
    with brokers.delivery_wiring(KIND, queue, "versions_v1.yaml"):
        event = publish(name, {"order_id": 1})

    def failed() -> Delivery | None:
        return Delivery.objects.filter(event_id=event.id, status="failed").first()

    wait_for(lambda: failed() is not None, 60, "the failed delivery")
    row = failed()
    assert row is not None
    # A poison message: no retry. The handler never ran: no run counted (as sync records it).
    assert (row.last_error, row.attempts) == (error, 0)
    assert runs([event.id]) == []
    assert error in v2_worker.log()


def test_rolling_deploy_newer_events_wait_for_a_newer_worker_and_are_not_lost(
    queue: str, tmp_path: Path
) -> None:
    old = worker(queue, "versions_v1.yaml", tmp_path, "v1")
    new = worker(queue, "versions_v2.yaml", tmp_path, "v2")
    with old:
        # The first host of the new release publishes while only old workers consume.
        with brokers.delivery_wiring(KIND, queue, "versions_v2.yaml"):
            ids = [
                publish("ver.placed", {"order_id": n, "amount": n, "currency": "EUR"}).id
                for n in range(3)
            ]

        def waiting() -> int:
            return Delivery.objects.filter(
                event_id__in=ids, status="pending", last_error__startswith="Waiting for a newer"
            ).count()

        wait_for(lambda: waiting() == 3, 60, "the old worker to put the events on hold")
        row = Delivery.objects.filter(event_id=ids[0]).get()
        assert row.attempts == 0
        assert row.last_error == (
            "Waiting for a newer worker: Event 'ver.placed' is version 2; this process knows "
            "up to version 1"
        )
        assert "Waiting for a newer worker" in old.log()
        assert runs(ids) == []
        with new:  # the new release's worker joins the queue
            wait_for(lambda: len(runs(ids)) == 3, 90, "the new worker to handle them")
    assert sorted(run.payload["order_id"] for run in runs(ids)) == [0, 1, 2]
    assert set(Delivery.objects.filter(event_id__in=ids).values_list("status", "attempts")) == {
        ("succeeded", 1)
    }  # waiting counted no attempt
