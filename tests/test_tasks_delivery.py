"""``via: tasks``: async deliveries through Django's Tasks framework, with the database
backend (django-tasks-db) and its ``db_worker`` as a real process."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from django.db import connection, transaction
from django_tasks_db.models import DBTaskResult

from django_events import publish
from django_events.models import Delivery, EventRecord
from tests.app.models import HandlerRun
from tests.brokers import delivery_wiring
from tests.worker import wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent


def other_connection_counts(event_id: uuid.UUID) -> tuple[int, int]:
    """(event records, task rows) for ``event_id`` as a second database connection sees them."""
    records, tasks = EventRecord._meta.db_table, DBTaskResult._meta.db_table
    like = f"%{event_id}%"
    queries = (
        f"SELECT COUNT(*) FROM {records} WHERE id = %s",
        f"SELECT COUNT(*) FROM {tasks} WHERE args_kwargs LIKE %s",
    )
    if connection.vendor == "sqlite":
        with sqlite3.connect(connection.settings_dict["NAME"], timeout=1) as other:
            return tuple(  # type: ignore[return-value]
                other.execute(q.replace("%s", "?"), (p,)).fetchone()[0]
                for q, p in zip(queries, (event_id.hex, like), strict=True)
            )
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params) as other:
        return tuple(  # type: ignore[return-value]
            other.execute(q.replace(" LIKE", "::text LIKE"), (p,)).fetchone()[0]
            for q, p in zip(queries, (event_id, like), strict=True)
        )


@pytest.fixture
def tasks_wiring() -> Iterator[str]:
    queue = f"tk-{uuid.uuid4().hex[:8]}"
    with delivery_wiring("filesystem", queue, "tasks.yaml"):
        yield queue


def test_task_row_is_written_in_the_publishers_transaction(tasks_wiring: str) -> None:
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        lost = publish("tk.placed", {"order_id": 1})
        assert DBTaskResult.objects.filter(queue_name=tasks_wiring).count() == 2  # in here
        assert other_connection_counts(lost.id) == (0, 0)
        raise Rollback
    assert other_connection_counts(lost.id) == (0, 0)
    assert not DBTaskResult.objects.filter(queue_name=tasks_wiring).exists()

    with transaction.atomic():
        kept = publish("tk.placed", {"order_id": 2})
        assert other_connection_counts(kept.id) == (0, 0)
    assert other_connection_counts(kept.id) == (1, 2)  # one record, one task a subscription
    tasks = DBTaskResult.objects.filter(queue_name=tasks_wiring)
    assert sorted(t.args_kwargs["args"][0]["subscription"] for t in tasks) == [
        "tk-async",
        "tk-record",
    ]
    assert {t.task_path for t in tasks} == {"django_events.delivery.tasks_backend.deliver"}
    assert EventRecord.objects.get(pk=kept.id).status == "dispatched"  # no relay needed


# db_worker as a real process.


class DbWorker:
    def __init__(self, queue: str, log: Path) -> None:
        self.queue, self.log = queue, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DJANGO_EVENTS_WORKER_DB_NAME": connection.settings_dict["NAME"],
            "DJANGO_EVENTS_TEST_MANIFEST": "tasks.yaml",
            "DJANGO_EVENTS_TEST_QUEUE": self.queue,
            "PYTHONPATH": str(ROOT),
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "django",
                    "db_worker",
                    "--queue-name",
                    self.queue,
                    "--interval",
                    "0.1",
                    "--no-startup-delay",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def db_worker(tasks_wiring: str, tmp_path: Path) -> Iterator[DbWorker]:
    worker = DbWorker(tasks_wiring, tmp_path / "db_worker.log")
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def runs(handler: str, ids: list[uuid.UUID]) -> list[HandlerRun]:
    return list(HandlerRun.objects.filter(handler=handler, event_id__in=ids).order_by("pk"))


def test_db_worker_handles_committed_events_once_and_rolled_back_never(
    db_worker: DbWorker,
) -> None:
    class Rollback(Exception):
        pass

    ids = []
    for order_id in range(5):
        with transaction.atomic():
            ids.append(publish("tk.placed", {"order_id": order_id}).id)
    with pytest.raises(Rollback), transaction.atomic():
        lost = publish("tk.placed", {"order_id": 99}).id
        raise Rollback

    wait_for(
        lambda: len(runs("record", ids)) >= 5 and len(runs("record_async", ids)) >= 5,
        timeout=60,
        what="10 deliveries through db_worker",
    )
    time.sleep(1.0)  # a duplicate would show up
    assert sorted(r.event_id for r in runs("record", ids)) == sorted(ids)
    assert sorted(r.event_id for r in runs("record_async", ids)) == sorted(ids)
    assert {r.pid for r in runs("record", ids)} != {os.getpid()}
    deliveries = Delivery.objects.filter(event_id__in=ids)
    assert set(deliveries.values_list("status", "attempts", "mode")) == {("succeeded", 1, "async")}
    assert deliveries.count() == 10
    assert runs("record", [lost]) == [] and not Delivery.objects.filter(event_id=lost).exists()


def test_db_worker_retries_a_failing_handler_with_backoff_then_fails_it(
    db_worker: DbWorker,
) -> None:
    event_id = publish("tk.placed", {"order_id": 7, "fail": True}).id
    delivery = wait_for(
        lambda: Delivery.objects.filter(
            event_id=event_id, subscription="tk-fails", status="failed"
        ).first(),
        timeout=60,
        what="the failed delivery",
    )
    attempts = runs("always_fails", [event_id])
    assert len(attempts) == 3 == delivery.attempts
    gaps = [(b.created_at - a.created_at).total_seconds() for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9  # run_after: 0.5 s, then 1 s
    assert delivery.last_error == "RuntimeError: boom for 7"
    time.sleep(1.5)
    assert len(runs("always_fails", [event_id])) == 3  # no fourth attempt
