"""``async def`` handlers: awaited to completion in sync and async modes, failures retried."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from django.db import transaction

from django_events import publish
from django_events.delivery.execution import run_coroutine_function
from django_events.models import Delivery
from tests import brokers
from tests.app.models import HandlerRun
from tests.conftest import wiring
from tests.test_checks import django_check
from tests.worker import start_worker, wait_for, wait_idle

PLACED = "orders.placed"


def _sync(handler: str, name: str = "sub", mode: str = "sync") -> dict[str, str]:
    return {"name": name, "event": PLACED, "handler": f"tests.app.handlers.{handler}", "mode": mode}


def runs(handler: str, event_id: object) -> list[HandlerRun]:
    return list(HandlerRun.objects.filter(handler=handler, event_id=event_id).order_by("pk"))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("handler", "recorded_as"),
    [
        ("record_async", "record_async"),
        ("AsyncClassHandler", "async_class"),
        ("returns_coroutine", "returns_coroutine"),
    ],
)
def test_sync_mode_awaits_an_async_handler_before_recording_success(
    handler: str, recorded_as: str
) -> None:
    with wiring(_sync(handler)):
        with transaction.atomic():
            event = publish(PLACED, {"order_id": 1, "total": 5})
            assert runs(recorded_as, event.id) == []  # after commit, not before
        [run] = runs(recorded_as, event.id)
    assert run.payload["current"] == str(event.id)  # current_event() inside the coroutine
    assert run.pid == os.getpid()
    assert Delivery.objects.get(event_id=event.id).status == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_sync_mode_async_handler_failure_is_a_failed_delivery() -> None:
    with wiring(_sync("fails_async")):
        event = publish(PLACED, {"order_id": 4, "total": 5})
    delivery = Delivery.objects.get(event_id=event.id)
    assert (delivery.status, delivery.last_error) == ("failed", "RuntimeError: async boom for 4")
    assert "fails_async" in delivery.traceback
    assert len(runs("fails_async", event.id)) == 1  # the body ran up to the raise


@pytest.mark.django_db(transaction=True)
def test_async_handlers_outside_an_event_loop_share_one_loop() -> None:
    with wiring(_sync("record_async")):
        first = publish(PLACED, {"order_id": 1, "total": 5})
        second = publish(PLACED, {"order_id": 2, "total": 5})
    loops = {runs("record_async", e.id)[0].payload["loop"] for e in (first, second)}
    assert len(loops) == 1


def test_async_handler_orm_calls_come_back_to_the_calling_thread() -> None:
    """Thread-sensitive sync_to_async inside the handler runs on the caller's thread (its
    connection and transaction), not on asgiref's shared executor thread."""
    import threading

    from asgiref.sync import sync_to_async

    async def where() -> int:
        return await sync_to_async(threading.get_ident)()

    assert run_coroutine_function(where) == threading.get_ident()


def test_a_coroutine_error_propagates_to_the_caller() -> None:
    async def boom() -> None:
        await asyncio.sleep(0)
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        run_coroutine_function(boom)


@pytest.mark.django_db
def test_inline_async_handler_is_a_check_error() -> None:
    with wiring(
        _sync("record_async", "inline-async", "inline"),
        _sync("AsyncClassHandler", "inline-async-class", "inline"),
        _sync("record_async", "sync-async", "sync"),
    ):
        reported = [r for r in django_check() if r[0] == "django_events.E120"]
    assert sorted(r[2].split("'")[1] for r in reported) == ["inline-async", "inline-async-class"]


# A real worker process: the async mode.


@pytest.fixture(scope="module")
def async_worker(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("worker-async-handlers")
    with start_worker("filesystem", folder, prefix="ah", manifest="async_handlers.yaml") as worker:
        yield worker.queue


@pytest.fixture
def async_wired(async_worker: str) -> Iterator[str]:
    with brokers.delivery_wiring("filesystem", async_worker, "async_handlers.yaml"):
        yield async_worker


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_worker_runs_async_handlers_once_each_on_one_loop_per_process(async_wired: str) -> None:
    ids = []
    for order_id in range(8):
        with transaction.atomic():
            ids.append(publish("ah.placed", {"order_id": order_id}).id)
    done = HandlerRun.objects.filter(event_id__in=ids)
    wait_for(lambda: done.count() >= 16, what="16 async handler runs")
    wait_idle()  # a duplicate would have run by now
    assert (
        sorted(done.values_list("handler", flat=True)) == ["async_class"] * 8 + ["record_async"] * 8
    )
    deliveries = Delivery.objects.filter(event_id__in=ids)
    assert set(deliveries.values_list("status", "attempts")) == {("succeeded", 1)}
    assert deliveries.count() == 16
    loops_by_pid: dict[int, set[int]] = {}
    for pid, payload in done.values_list("pid", "payload"):
        loops_by_pid.setdefault(pid, set()).add(payload["loop"])
    assert os.getpid() not in loops_by_pid
    assert all(len(loops) == 1 for loops in loops_by_pid.values()), loops_by_pid


@pytest.mark.servers
@pytest.mark.django_db(transaction=True)
def test_worker_retries_a_failing_async_handler_then_fails_it(async_wired: str) -> None:
    event = publish("ah.placed", {"order_id": 9, "fail": True})
    delivery = wait_for(
        lambda: Delivery.objects.filter(
            event_id=event.id, subscription="ah-fails", status="failed"
        ).first(),
        timeout=40,
        what="the failed async delivery",
    )
    attempts = runs("fails_async", event.id)
    assert len(attempts) == 3 == delivery.attempts
    gaps = [(b.created_at - a.created_at).total_seconds() for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.5  # backoff 0.3 s then 0.6 s
    assert delivery.last_error == "RuntimeError: async boom for 9"
