"""The event log on another database than default (DATABASE_ROUTERS), end to end: publish()
and a real `celery worker` with the same router record it all on the alias "other".

In the PostgreSQL pass "other" is a PostgreSQL database too (tests/settings.py): the
statements written by hand (delivery/postgresql.py), the ordered finish's function of
migration 0012, the advisory locks and the background marker's update run on that alias.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import transaction
from django.test import override_settings

from django_events import publish
from django_events.models import Delivery, EventRecord, OrderingGate
from tests import brokers
from tests.app.models import HandlerRun
from tests.routers import EventLogElsewhere
from tests.worker import WorkerProcess, start_worker, wait_for, wait_idle

pytestmark = [
    pytest.mark.servers,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
]

ROUTERS = "tests.routers.EventLogElsewhere"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerProcess]:
    env = {
        "DJANGO_EVENTS_TEST_ROUTERS": ROUTERS,
        # What a worker sends itself (an ordered delivery's hand-on) goes to the same broker.
        "DJANGO_EVENTS_TEST_CELERY_APP": "tests.brokers.filesystem",
    }
    with start_worker(
        "filesystem", tmp_path, prefix="routed", manifest="ordering.yaml", env=env
    ) as worker:
        yield worker


def test_ordered_deliveries_of_a_routed_event_log_are_recorded_on_its_database(
    worker: WorkerProcess,
) -> None:
    accounts = ["a", "b"]
    ids = []
    with (
        override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]),
        brokers.delivery_wiring("filesystem", worker.queue, "ordering.yaml"),
    ):
        for n in range(3):  # a transaction of two events a round, one per account
            with transaction.atomic(using="other"):
                for account in accounts:
                    ids.append(publish("ord.changed", {"account": account, "n": n}).id)

        done = Delivery.objects.using("other").filter(event_id__in=ids, status="succeeded")
        wait_for(lambda: done.count() == len(ids), what="every ordered delivery succeeded")
        wait_idle(worker)

        records = EventRecord.objects.using("other").filter(pk__in=ids)
        wait_for(
            lambda: set(records.values_list("status", flat=True)) == {"dispatched"},
            what="the records marked dispatched",
        )
    rows = Delivery.objects.using("other").filter(event_id__in=ids)
    assert sorted(rows.values_list("ordering_key", "sequence")) == [
        (account, n) for account in accounts for n in (1, 2, 3)
    ]
    gates = OrderingGate.objects.using("other").values_list("key", "last_sequence")
    assert sorted(gates) == [("a", 3), ("b", 3)]
    # Each key's handler runs in its order (HandlerRun is on default: no router for it).
    runs = sorted(
        (r.payload["start"], r.payload["account"], r.payload["n"])
        for r in HandlerRun.objects.filter(handler="ordered_step", event_id__in=ids)
    )
    for account in accounts:
        assert [n for _, a, n in runs if a == account] == [0, 1, 2]
    for model in (EventRecord, Delivery, OrderingGate):  # nothing on default
        assert not model.objects.using("default").exists(), model.__name__
