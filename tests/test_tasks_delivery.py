"""``via: tasks``: async deliveries through Django's Tasks framework, with the database
backend (django-tasks-db) and its ``db_worker`` as a real process."""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import django
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import OperationalError, connection, connections, transaction
from django.test import Client, override_settings
from django_tasks_db.models import DBTaskResult

from django_events import publish
from django_events.models import Delivery, EventRecord
from django_events.operations.relay import relay_pending
from tests.app.models import HandlerRun
from tests.brokers import delivery_wiring
from tests.conftest import inserts_refused
from tests.test_admin import action
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


def test_django_6_runs_on_django_tasks_itself_not_the_backport() -> None:
    from django_events.delivery import tasks_backend

    package = "django.tasks" if django.VERSION >= (6,) else "django_tasks"
    assert type(tasks_backend.deliver).__module__.startswith(f"{package}.")
    assert type(tasks_backend.backend()).__mro__[1].__module__.startswith(f"{package}.")


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


def test_outside_a_transaction_a_record_is_written_with_its_task_rows_or_not_at_all(
    tasks_wiring: str,
) -> None:
    # The record says dispatched (its tasks go in with it): committed alone, before task rows
    # that then fail, its deliveries would be lost, nothing left pending for the relay.
    with inserts_refused(DBTaskResult._meta.db_table), pytest.raises(OperationalError):
        publish("tk.placed", {"order_id": 3})
    assert not EventRecord.objects.exists()
    event = publish("tk.placed", {"order_id": 4})
    assert other_connection_counts(event.id) == (1, 2)


# db_worker as a real process.


class DbWorker:
    def __init__(self, queue: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.queue, self.log, self.env = queue, log, env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.fault_dir = log.parent  # where hang_once leaves its marker

    def start(self) -> None:
        env = {
            **os.environ,
            **self.env,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DJANGO_EVENTS_WORKER_DB_NAME": connection.settings_dict["NAME"],
            "DJANGO_EVENTS_TEST_MANIFEST": "tasks.yaml",
            "DJANGO_EVENTS_TEST_QUEUE": self.queue,
            "DJANGO_EVENTS_FAULT_DIR": str(self.fault_dir),
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

    def kill(self) -> None:
        """SIGKILL, as a host going down or the OOM killer: no handler of its own runs."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

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


def test_batched_success_rows_of_a_db_worker_are_written_after_the_handlers_and_at_exit(
    tasks_wiring: str, tmp_path: Path
) -> None:
    # SUCCESS_RECORDS = "batched" on the tasks path, as on Celery's: first attempts' success
    # rows wait for the writer (here only the exit writes), failures are written at once.
    env = {
        "DJANGO_EVENTS_TEST_SUCCESS_RECORDS": "batched",
        "DJANGO_EVENTS_TEST_FLUSH_INTERVAL": "3600",
    }
    worker = DbWorker(tasks_wiring, tmp_path / "db_worker.log", env)
    worker.start()
    try:
        ids = [publish("tk.placed", {"order_id": order_id}).id for order_id in range(4)]
        failing = publish("tk.placed", {"order_id": 9, "fail": True}).id
        wait_for(
            lambda: len(runs("record", ids)) == 4 and len(runs("record_async", ids)) == 4,
            timeout=60,
            what="8 deliveries through db_worker",
        )
        failed = wait_for(
            lambda: Delivery.objects.filter(event_id=failing, status="failed").first(),
            timeout=60,
            what="the failed delivery, recorded at once",
        )
        assert failed.attempts == 3
        assert not Delivery.objects.filter(event_id__in=ids).exists()  # still waiting
    finally:
        worker.stop()  # SIGTERM: db_worker finishes, the process writes what waits as it exits

    assert worker.process is not None and worker.process.returncode == 0
    deliveries = Delivery.objects.filter(event_id__in=ids)
    assert set(deliveries.values_list("status", "attempts", "mode")) == {("succeeded", 1, "async")}
    assert deliveries.count() == 8
    assert len(runs("record", ids)) == 4  # each handler ran once


def failed_for_good(event_id: uuid.UUID, subscription: str) -> Delivery:
    failed: Delivery = wait_for(
        lambda: Delivery.objects.filter(
            event_id=event_id, subscription=subscription, status="failed"
        ).first(),
        timeout=60,
        what="the failed delivery",
    )
    return failed


def test_db_worker_retries_a_failing_handler_with_backoff_then_fails_it(
    db_worker: DbWorker,
) -> None:
    event_id = publish("tk.placed", {"order_id": 7, "fail": True}).id
    delivery = failed_for_good(event_id, "tk-fails")
    attempts = runs("always_fails", [event_id])
    assert len(attempts) == 3 == delivery.attempts
    gaps = [(b.created_at - a.created_at).total_seconds() for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9  # run_after: 0.5 s, then 1 s
    assert delivery.last_error == "RuntimeError: boom for 7"
    time.sleep(1.5)
    assert len(runs("always_fails", [event_id])) == 3  # no fourth attempt


def test_db_worker_leaves_retries_that_do_not_count_out_of_max_attempts(
    db_worker: DbWorker,
) -> None:
    payload = {"order_id": 8, "times": 3, "seconds": 0.1, "counts": False, "then_fail": True}
    event_id = publish("tk.later", payload).id

    delivery = failed_for_good(event_id, "tk-later")
    # Three uncounted runs, then max_attempts (2) runs that raise: five in all, as on Celery
    # (tests/test_failure_control_delivery.py).
    assert len(runs("retry_later", [event_id])) == 5 == delivery.attempts
    assert delivery.last_error == "RuntimeError: failed after 4 retries asked for"


def test_db_worker_holds_a_key_behind_its_failed_head_then_runs_it_in_order(
    db_worker: DbWorker,
) -> None:
    from django_events.operations.retrying import mark_resolved

    stuck, free = f"stuck-{uuid.uuid4().hex[:6]}", f"free-{uuid.uuid4().hex[:6]}"
    head = publish("tk.step", {"account": stuck, "n": 0, "fail": True}).id
    behind = [publish("tk.step", {"account": stuck, "n": n}).id for n in (1, 2, 3)]
    others = [publish("tk.step", {"account": free, "n": n}).id for n in range(3)]
    rows = Delivery.objects.filter(subscription="tk-ordered")

    wait_for(
        lambda: (
            rows.filter(event_id__in=others, status="succeeded").count() == 3
            and rows.filter(event_id=head, status="failed").exists()
            and rows.filter(event_id__in=behind, status="held").count() == 3
        ),
        timeout=60,
        what="the free key done, the stuck one held behind its failed head",
    )
    assert runs("ordered_step", behind) == []

    assert mark_resolved(rows.filter(event_id=head)) == 1  # handed on through the task backend

    wait_for(
        lambda: rows.filter(event_id__in=behind, status="succeeded").count() == 3,
        timeout=60,
        what="the held deliveries",
    )
    for ids in (behind, others):
        ran = runs("ordered_step", ids)
        assert [r.payload["n"] for r in ran] == sorted(r.payload["n"] for r in ran)  # in order
        assert len(ran) == len(ids)  # each once


def task_of(event_id: uuid.UUID) -> DBTaskResult:
    return DBTaskResult.objects.get(args_kwargs__args__0__event__id=str(event_id))


def relay(*options: str) -> str:
    return run_command("events_relay", "--min-age", "0", *options)


def test_a_killed_db_workers_task_is_requeued_by_the_relay_and_runs_once(
    db_worker: DbWorker, tmp_path: Path
) -> None:
    event = publish("tk.slow", {"order_id": 3, "hang": 60})
    marker = db_worker.fault_dir / f"{event.id}-hang_once"
    wait_for(marker.exists, timeout=30, what="the handler to start")
    db_worker.kill()  # mid-handler: the idempotent handler's write rolls back
    assert task_of(event.id).status == "RUNNING"

    second = DbWorker(db_worker.queue, tmp_path / "second.log")
    second.start()
    try:
        time.sleep(3.0)
        # django-tasks-db never runs a task left RUNNING again...
        assert task_of(event.id).status == "RUNNING" and runs("hang_once", [event.id]) == []
        # ...nor does the relay before --requeue-running-after (default one hour).
        assert "Requeued" not in relay()
        assert task_of(event.id).status == "RUNNING"

        assert "Requeued 1 task(s) left running" in relay("--requeue-running-after", "1")
        delivery = wait_for(
            lambda: Delivery.objects.filter(event_id=event.id, status="succeeded").first(),
            timeout=30,
            what="the requeued delivery",
        )
    finally:
        second.stop()
    assert len(runs("hang_once", [event.id])) == 1
    assert delivery.attempts == 1  # a lost worker is not a retry
    task = task_of(event.id)
    assert task.status == "SUCCESSFUL" and len(task.worker_ids) == 2
    assert "Requeued" not in relay("--requeue-running-after", "1")  # nothing left running


def test_a_db_worker_stopped_by_a_second_signal_mid_handler_records_the_delivery_failed(
    db_worker: DbWorker, tmp_path: Path
) -> None:
    # SIGTERM, then SIGTERM again ("press Ctrl+C again to force"): db_worker raises SystemExit
    # in the handler and marks the task failed, which it never runs again. Without a row the
    # delivery was lost; recorded failed, it is retried.
    event = publish("tk.slow", {"order_id": 4, "hang": 60})
    marker = db_worker.fault_dir / f"{event.id}-hang_once"
    wait_for(marker.exists, timeout=30, what="the handler to start")
    assert db_worker.process is not None
    db_worker.process.send_signal(signal.SIGTERM)  # warm: waits for the task
    time.sleep(0.5)
    db_worker.process.send_signal(signal.SIGTERM)  # the second one stops the task
    db_worker.process.wait(20)
    assert task_of(event.id).status == "FAILED"
    row = Delivery.objects.get(event_id=event.id, subscription="tk-slow")
    assert (row.status, row.attempts, row.last_error) == (
        "failed",
        1,
        "Interrupted: the worker was stopped (SystemExit) while the handler ran. Retry it.",
    )
    second = DbWorker(db_worker.queue, tmp_path / "second.log")
    second.start()
    try:
        assert "1 re-enqueued" in run_command("events_retry", "--subscription", "tk-slow")
        wait_for(
            lambda: Delivery.objects.filter(event_id=event.id, status="succeeded").exists(),
            timeout=30,
            what="the retried delivery",
        )
    finally:
        second.stop()
    assert len(runs("hang_once", [event.id])) == 1  # the stopped run's write rolled back


# Retry, replay and the admin's "Retry selected" re-enqueue tasks for db_worker.


def failed_first_time(event_id: uuid.UUID) -> Delivery:
    failure = wait_for(
        lambda: Delivery.objects.filter(event_id=event_id, status="failed").first(),
        timeout=30,
        what="the first, failed, run",
    )
    assert (failure.subscription, failure.attempts) == ("tk-flaky", 1)  # max_attempts: 1
    return failure


def succeeded(event_id: uuid.UUID, subscription: str, attempts: int) -> Delivery:
    return wait_for(
        lambda: Delivery.objects.filter(
            event_id=event_id, subscription=subscription, status="succeeded", attempts=attempts
        ).first(),
        timeout=30,
        what=f"{subscription}'s run number {attempts}",
    )


def test_events_retry_reenqueues_a_failed_task_delivery(db_worker: DbWorker) -> None:
    event_id = publish("tk.paid", {"order_id": 11}).id
    failed_first_time(event_id)

    out = run_command("events_retry", "--subscription", "tk-flaky")

    assert "1 re-enqueued for a worker; 0 ran and succeeded" in out
    succeeded(event_id, "tk-flaky", 2)
    assert len(runs("fails_first_time", [event_id])) == 2
    [first, again] = DBTaskResult.objects.filter(queue_name=db_worker.queue).order_by("enqueued_at")
    assert first.args_kwargs["args"][0]["prior_attempts"] == 0
    assert again.args_kwargs["args"][0]["prior_attempts"] == 1


def test_events_replay_reenqueues_stored_events_to_a_task_subscription(
    db_worker: DbWorker,
) -> None:
    ids = [publish("tk.placed", {"order_id": n}).id for n in (21, 22)]
    for event_id in ids:
        succeeded(event_id, "tk-record", 1)

    out = run_command("events_replay", "tk-record", "--event", "tk.placed")

    assert "Replayed 2 stored event(s) to tk-record: 2 re-enqueued for a worker" in out
    for event_id in ids:
        succeeded(event_id, "tk-record", 2)
    assert sorted(r.event_id for r in runs("record", ids)) == sorted(ids * 2)
    assert len(runs("record_async", ids)) == 2  # the other subscription was left alone


def test_admin_retry_selected_reenqueues_a_failed_task_delivery(
    db_worker: DbWorker, admin_client: Client
) -> None:
    event_id = publish("tk.paid", {"order_id": 31}).id
    failure = failed_first_time(event_id)

    page = action(admin_client, "retry_selected", failure.pk)

    assert "1 re-enqueued for a worker" in page.content.decode()
    done = succeeded(event_id, "tk-flaky", 2)
    assert done.pk == failure.pk
    assert len(runs("fails_first_time", [event_id])) == 2


def run_command(command: str, *args: str) -> str:
    out = io.StringIO()
    call_command(command, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_a_due_delivery_is_sent_by_the_relay_through_its_task_backend(tasks_wiring: str) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from tests import brokers

    with transaction.atomic():
        event = publish("tk.placed", {"order_id": 50})
    DBTaskResult.objects.filter(queue_name=tasks_wiring).delete()  # the first run was made
    # A run failed; its retry, or a hand-on or a replay, was left due to the relay.
    Delivery.objects.create(
        event_id=event.id,
        subscription="tk-record",
        mode="async",
        status="pending",
        attempts=1,
        retry_at=timezone.now() - timedelta(seconds=1),
    )

    assert relay_pending(min_age=0).retried == 1

    [row] = DBTaskResult.objects.filter(queue_name=tasks_wiring)
    [message] = row.args_kwargs["args"]
    assert (message["subscription"], message["prior_attempts"]) == ("tk-record", 1)
    # Not through Celery (the wiring's app is the filesystem transport's).
    assert not [p for p in brokers.FS_FOLDER.iterdir() if tasks_wiring in p.name]
    assert Delivery.objects.get(event_id=event.id).retry_at is None
    assert row.task.call(message) == "succeeded"
    assert Delivery.objects.values_list("status", "attempts").get(event_id=event.id) == (
        "succeeded",
        2,
    )


# A backend that enqueues after commit: the database backend on another database.


class TasksElsewhere:
    """Task rows on the alias ``other``: not the event log's database, so tasks are enqueued
    after commit, and an outage of that database leaves the event pending for the relay."""

    def db_for_read(self, model: type, **hints: object) -> str | None:
        return "other" if model._meta.app_label == "django_tasks_database" else None  # type: ignore[attr-defined]

    db_for_write = db_for_read


@contextmanager
def _task_table_locked(alias: str) -> Iterator[None]:
    """Another connection holds the lock of ``alias``'s task table: a write there fails after
    a second (SQLite: the database's write lock; PostgreSQL: the table's, and a lock_timeout)."""
    database = connections[alias]
    if database.vendor == "sqlite":
        down = sqlite3.connect(database.settings_dict["NAME"], timeout=1)
        down.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            down.rollback()
            down.close()
        return
    import psycopg

    params = database.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params) as down:  # a transaction till the block ends
        down.execute(f"LOCK TABLE {DBTaskResult._meta.db_table} IN ACCESS EXCLUSIVE MODE")
        with database.cursor() as cursor:
            cursor.execute("SET lock_timeout = '1s'")
        try:
            yield
        finally:
            down.rollback()
            with database.cursor() as cursor:
                cursor.execute("RESET lock_timeout")


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_the_relay_enqueues_tasks_a_backend_refused_on_commit(tasks_wiring: str) -> None:
    with override_settings(DATABASE_ROUTERS=[TasksElsewhere()]):
        tasks = DBTaskResult.objects.using("other")
        with _task_table_locked("other"), transaction.atomic():  # the task database is down
            event = publish("tk.placed", {"order_id": 41})
        assert EventRecord.objects.get(pk=event.id).status == "pending"
        assert not tasks.exists()

        result = relay_pending(min_age=0)

        assert (result.sent, result.unsent) == (1, 0)
        assert EventRecord.objects.get(pk=event.id).status == "dispatched"
        rows = list(tasks.filter(queue_name=tasks_wiring))
        assert sorted(r.args_kwargs["args"][0]["subscription"] for r in rows) == [
            "tk-async",
            "tk-record",
        ]
        for row in rows:  # what db_worker would do with them
            [message] = row.args_kwargs["args"]
            assert message["event"]["id"] == str(event.id) and message["prior_attempts"] == 0
            assert row.task.call(message) == "succeeded"
        assert relay_pending(min_age=0).sent == 0  # nothing sent twice
    assert len(runs("record", [event.id])) == 1 == len(runs("record_async", [event.id]))


def task_rows(event_id: uuid.UUID, using: str = "default") -> list[DBTaskResult]:
    rows = DBTaskResult.objects.using(using).filter(args_kwargs__args__0__event__id=str(event_id))
    return list(rows.order_by("enqueued_at"))


def run_task(row: DBTaskResult) -> str:
    """Run a task in this process, as db_worker would."""
    [message] = row.args_kwargs["args"]
    result: str = row.task.call(message)
    return result


@contextmanager
def _task_database_down(alias: str) -> Iterator[None]:
    """``alias`` out of reach for the block, through whatever connection the worker opens
    (it closes stale ones first): on SQLite its write lock held, on PostgreSQL a closed
    port."""
    database = connections[alias]
    if database.vendor == "sqlite":
        with _task_table_locked(alias):
            yield
        return
    port = database.settings_dict["PORT"]
    database.close()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        database.settings_dict["PORT"] = str(probe.getsockname()[1])
    try:
        yield
    finally:
        database.close()
        database.settings_dict["PORT"] = port


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_a_retry_the_task_backend_refuses_is_left_to_the_relay(
    tasks_wiring: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed run whose retry the task backend cannot take (its database down) leaves the
    retry due for the relay, as on Celery. Before, the task raised (db_worker fails it and
    never runs it again) and an ordered delivery stayed pending for good, with no task, its
    key held behind it."""
    monkeypatch.setenv("DJANGO_EVENTS_ORDERING_FIXED", str(tmp_path))
    account = f"down-{uuid.uuid4().hex[:6]}"
    with override_settings(DATABASE_ROUTERS=[TasksElsewhere()]):
        with transaction.atomic():
            head = publish("tk.step", {"account": account, "n": 0, "fail": True})
            behind = publish("tk.step", {"account": account, "n": 1})
        [first] = task_rows(head.id, "other")
        with _task_database_down("other"):
            assert run_task(first) == "retry"
        row = Delivery.objects.get(event_id=head.id, subscription="tk-ordered")
        assert (row.status, row.attempts) == ("pending", 1)
        assert row.retry_at is not None  # due for the relay's retries
        assert task_rows(head.id, "other") == [first]

        Path(tmp_path, account).touch()  # the fix deployed
        time.sleep(0.2)  # the retry is due (backoff 0.1 s)
        assert relay_pending(min_age=0).retried == 1

        [_, retry] = task_rows(head.id, "other")
        assert run_task(retry) == "succeeded"
        [second] = task_rows(behind.id, "other")
        assert run_task(second) == "succeeded"
    ran = runs("ordered_step", [head.id, behind.id])
    assert [r.payload["n"] for r in ran] == [0, 1]


def test_an_ordered_retry_whose_task_the_backend_lost_is_sent_by_the_relay(
    tasks_wiring: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry of an ordered delivery whose task is gone (a task row deleted, a task failed
    by a db_worker) is sent by the relay one threshold after its time, as an unordered
    one's. Before, its row had no due time and the relay's check of lost messages looks at
    Celery's only: the delivery stayed pending for good, its key held behind it."""
    monkeypatch.setenv("DJANGO_EVENTS_ORDERING_FIXED", str(tmp_path))
    account = f"lost-{uuid.uuid4().hex[:6]}"
    soon = {**settings.DJANGO_EVENTS, "RESEND_UNFINISHED_AFTER": 0.1}
    with override_settings(DJANGO_EVENTS=soon):
        with transaction.atomic():
            head = publish("tk.step", {"account": account, "n": 0, "fail": True})
        [first] = task_rows(head.id)
        assert run_task(first) == "retry"
        [_, retry] = task_rows(head.id)
        retry.delete()  # the task backend lost the retry's task

        Path(tmp_path, account).touch()
        time.sleep(0.3)  # the retry's time (0.1 s) and the threshold (0.1 s) passed
        assert relay_pending(min_age=0).retried == 1

        [_, again] = task_rows(head.id)
        assert run_task(again) == "succeeded"
    row = Delivery.objects.get(event_id=head.id, subscription="tk-ordered")
    assert (row.status, row.attempts, row.retry_at) == ("succeeded", 2, None)
