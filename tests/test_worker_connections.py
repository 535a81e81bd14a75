"""What check W215 says, on a real worker and PostgreSQL.

Celery's Django fixup closes a worker's database connections before and after every task
unless its app sets ``CELERY_DB_REUSE_MAX`` (it does not read ``CONN_MAX_AGE``), and the
worker closes a connection ``CONN_MAX_AGE`` has aged before each delivery, as Django does at
each request. With both set, each pool process keeps its connection, and a cut connection
to the database does not wedge it. Should Celery change how it closes them, this fails, and
W215 must change with it.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from uuid import UUID

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.db.models import QuerySet

from django_events import publish
from django_events.models import Delivery
from tests import brokers
from tests.app.models import HandlerRun
from tests.faultproxy import FaultProxy
from tests.worker import start_worker, wait_for

pytestmark = [
    pytest.mark.servers,
    pytest.mark.postgresql,
    pytest.mark.django_db(transaction=True),
]

DELIVERIES = 8
KEEPS_CONNECTIONS = {"DJANGO_EVENTS_TEST_DB_REUSE_MAX": "1000"}  # and CONN_MAX_AGE 60


def _publish(count: int, start: int = 0) -> list[UUID]:
    ids = []
    for n in range(start, start + count):
        with transaction.atomic():
            ids.append(publish("conn.noted", {"n": n}).id)
    return ids


def _runs(ids: list[UUID]) -> QuerySet[HandlerRun]:
    """The rows the handler committed for the events ``ids``, one a run."""
    return HandlerRun.objects.filter(handler="record_connection", event_id__in=ids)


def _ran(ids: list[UUID]) -> bool:
    """Whether each delivery succeeded and its handler's row was committed."""
    succeeded = Delivery.objects.filter(event_id__in=ids, status="succeeded").count()
    return succeeded == _runs(ids).count() == len(ids)


def _backends(ids: list[UUID]) -> set[tuple[int, str]]:
    return {(r.payload["backend_pid"], r.payload["backend_start"]) for r in _runs(ids)}


@pytest.mark.parametrize(
    ("reuse_max", "conn_max_age", "reconnects", "warning"),
    [
        # Celery's default: a connection a task.
        (None, 60, True, "CELERY_DB_REUSE_MAX is not set"),
        # Celery keeps it, but the worker closes it before each delivery, as a request would.
        (1000, 0, True, "have CONN_MAX_AGE 0 and no pool"),
        # Both: one connection a pool process (prefork -c 2).
        (1000, 60, False, None),
    ],
)
def test_a_worker_connects_for_each_delivery_unless_celery_and_django_keep_connections(
    reuse_max: int | None,
    conn_max_age: int,
    reconnects: bool,
    warning: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"DJANGO_EVENTS_WORKER_CONN_MAX_AGE": str(conn_max_age)}
    if reuse_max is not None:
        env["DJANGO_EVENTS_TEST_DB_REUSE_MAX"] = str(reuse_max)
        monkeypatch.setitem(brokers.amqp.conf, "CELERY_DB_REUSE_MAX", reuse_max)
    with (
        start_worker("amqp", tmp_path, prefix="conn", manifest="connections.yaml", env=env) as w,
        brokers.delivery_wiring("amqp", w.queue, "connections.yaml"),
    ):
        ids = _publish(DELIVERIES)
        wait_for(lambda: _ran(ids), what=f"{DELIVERIES} deliveries")
        # What `check --deploy` says of the same settings, given to this process (it cannot see
        # the worker's: the count of connections above is what tests the worker).
        for alias in ("default", "other"):  # the worker's two, tests/settings.py
            monkeypatch.setitem(connections.settings[alias], "CONN_MAX_AGE", conn_max_age)
        out = StringIO()
        # `--database default`: without it Django 6.1 runs the checks that read rows against
        # every database, where this test may query only the default one.
        call_command(
            "check",
            "--deploy",
            "--tag",
            "django_events",
            "--database",
            "default",
            stdout=out,
            stderr=out,
        )

    seen = _backends(ids)
    if reconnects:
        assert len(seen) == DELIVERIES, seen
    else:
        assert len(seen) <= 2, seen
    if warning is None:
        assert "W215" not in out.getvalue(), out.getvalue()
    else:
        assert "(django_events.W215)" in out.getvalue(), out.getvalue()
        assert warning in out.getvalue()


def test_a_worker_that_keeps_its_connections_outlives_a_database_cut(tmp_path: Path) -> None:
    # What W215 asks for must not wedge a worker on connections a cut broke (as a database
    # restart or a network fault would; the proxy drops them, the server runs on): the worker
    # closes a broken one before the next delivery (CONN_HEALTH_CHECKS, as tests/settings.py
    # gives workers), and a delivery that could not reach the database is retried.
    address = (connection.settings_dict["HOST"], int(connection.settings_dict["PORT"]))
    with FaultProxy(address) as db:
        env = {**KEEPS_CONNECTIONS, "DJANGO_EVENTS_WORKER_DB_PORT": str(db.port)}
        with (
            start_worker(
                "amqp", tmp_path, prefix="conn-cut", manifest="connections.yaml", env=env
            ) as worker,
            brokers.delivery_wiring("amqp", worker.queue, "connections.yaml"),
        ):
            before = _publish(DELIVERIES)
            wait_for(lambda: _ran(before), what="the first deliveries")
            kept = _backends(before)
            assert len(kept) <= 2, kept  # one a pool process: the connections were kept

            db.cut()  # the kept connections dropped, new ones refused
            during = _publish(2, start=DELIVERIES)
            wait_for(lambda: worker.log().count("Retry in") >= 2, what="the deliveries retried")
            db.restore()
            after = _publish(DELIVERIES, start=DELIVERIES + 2)
            everything = before + during + after
            wait_for(lambda: _ran(everything), timeout=60, what="every delivery after the cut")

    assert _backends(during + after).isdisjoint(kept)  # connected again once it was back
    assert _runs(everything).count() == len(everything)  # each ran to its commit once
    assert set(
        Delivery.objects.filter(event_id__in=everything).values_list("status", flat=True)
    ) == {"succeeded"}
