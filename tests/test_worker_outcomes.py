"""What a real worker says about its deliveries: at start, and when one fails for good."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import transaction

from django_events import publish
from django_events.models import Delivery
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import WorkerProcess, start_worker, wait_for, wait_idle, worker_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module", params=brokers.worker_kinds("filesystem", "redis"))
def worker(
    request, django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[WorkerProcess]:
    kind = request.param
    folder = tmp_path_factory.mktemp(f"outcomes-{kind}")
    with (
        start_worker(kind, folder, prefix=f"oc-{kind}", manifest="outcomes.yaml") as process,
        brokers.delivery_wiring(kind, process.queue, "outcomes.yaml"),
    ):
        yield process


def test_worker_start_names_a_handler_that_does_not_import(worker: WorkerProcess) -> None:
    log = worker.log()
    assert (
        "Subscription 'oc-missing' (queue '" in log
        and "Handler 'tests.app.no_such_module.handle' does not import" in log
    ), log[-3000:]
    assert (
        "Subscription 'oc-raises' (queue '" in log
        and "Handler 'tests.app.raises_on_import.handle' does not import: RuntimeError: this "
        "module needs a setting the worker lacks; its deliveries will fail without retry"
        in log
    ), log[-3000:]
    # Only the broken ones: the others import.
    assert "Subscription 'oc-record'" not in log and "Subscription 'oc-fails'" not in log


def test_a_handler_that_does_not_import_fails_at_once_without_retry(
    worker: WorkerProcess,
) -> None:
    with transaction.atomic():
        event = publish("oc.placed", {"order_id": 1})
    wait_for(
        lambda: HandlerRun.objects.filter(event_id=event.id, handler="record").exists(),
        what="the healthy subscription's run",
    )
    failed = wait_for(
        lambda: Delivery.objects.filter(
            event_id=event.id, subscription="oc-missing", status="failed"
        ).first(),
        what="the failed delivery of oc-missing",
    )
    wait_idle(worker)  # a retry would have run by now
    failed.refresh_from_db()
    # The handler never ran: `Delivery.attempts` counts its runs (DESIGN 3.7), so 0, and a
    # retry once the module is deployed gets all of max_attempts.
    assert failed.attempts == 0
    assert failed.last_error.startswith("HandlerImportError: Handler ")
    assert "tests.app.no_such_module.handle" in failed.last_error
    assert "HandlerImportError" in failed.traceback


def test_a_failed_delivery_is_not_logged_as_a_succeeded_task(worker: WorkerProcess) -> None:
    with transaction.atomic():
        event = publish("oc.placed", {"order_id": 2})
    wait_for(
        lambda: Delivery.objects.filter(
            event_id=event.id, subscription="oc-fails", status="failed"
        ).exists(),
        what="the final failure of oc-fails",
    )
    wait_for(
        lambda: (
            "Delivery failed for good after 1 attempt(s): RuntimeError: boom for 2" in worker.log()
        ),
        what="the worker's own outcome line",
    )
    wait_idle(worker)  # each task's own line logged
    log = worker.log()
    # Celery's own line for every task of this worker: none says succeeded with a status.
    assert not re.search(r"succeeded in [\d.]+s: '(failed|rejected|succeeded)'", log), log[-3000:]
    assert re.search(r"Task django_events\.deliver\[[0-9a-f-]+\] ignored", log), log[-3000:]
    assert Delivery.objects.get(event_id=event.id, subscription="oc-fails").attempts == 1


@pytest.mark.django_db(transaction=True)
def test_a_worker_started_without_q_warns_that_no_delivery_reaches_it(tmp_path: Path) -> None:
    # The classic mistake: `celery -A proj worker` consumes Celery's default queue only.
    worker = worker_for(
        "filesystem", "celery", tmp_path, env={"DJANGO_EVENTS_TEST_QUEUE": "oc-elsewhere"}
    )
    worker.start()
    try:
        wait_for(lambda: "ready." in worker.log(), what="the worker's start")
    finally:
        worker.stop()
    assert (
        "This worker consumes only Celery's default queue 'celery', none of the queues of "
        "django_events (oc-elsewhere): unless another worker consumes them, their deliveries "
        'wait (-Q "$(python manage.py events_queues --via celery)")'
    ) in worker.log()
    # A worker that consumes the subscriptions' queue says nothing of the kind.
    served = worker_for("filesystem", "celery", tmp_path / "served")
    served.start()
    try:
        wait_for(lambda: "ready." in served.log(), what="the second worker's start")
    finally:
        served.stop()
    assert "consumes only Celery's default queue" not in served.log()
