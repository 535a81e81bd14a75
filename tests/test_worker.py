"""django_events.delivery.worker, in this process: what a delivery writes."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_events.delivery.worker import process_message
from django_events.models import Delivery
from tests.ops import drain, shop_wiring

RECORD = "tests.app.handlers.record"
ONCE = {"event": "shop.paid", "handler": RECORD, "mode": "async", "name": "shop-once"}


@pytest.mark.django_db
def test_an_idempotent_success_is_written_once_with_its_duration(queue: str, publish_now) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[{**ONCE, "idempotent": True}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-once"]
        table = Delivery._meta.db_table

        with CaptureQueriesContext(connection) as queries:
            assert process_message(message, 0, manage_connections=False).status == "succeeded"

    row: Any = Delivery.objects.get(event_id=paid.id, subscription="shop-once")
    assert (row.status, row.attempts) == ("succeeded", 1)
    assert row.duration_ms is not None and row.duration_ms >= 0
    writes = [
        q["sql"]
        for q in queries.captured_queries
        if table in q["sql"] and q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE"))
    ]
    assert len(writes) == 2, writes  # the running row (insert-or-keep), then its success
