"""django_events.delivery.worker, in this process: what a delivery writes."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_events.delivery.lost_messages import resend_after
from django_events.delivery.worker import process_message
from django_events.models import Delivery
from tests.ops import drain, shop_wiring

RECORD = "tests.app.handlers.record"
ONCE = {"event": "shop.paid", "handler": RECORD, "mode": "async", "name": "shop-once"}
FLAKY = {
    "event": "shop.paid",
    "handler": "tests.app.handlers.fails_first_time",
    "mode": "async",
    "name": "shop-flaky",
}


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


@pytest.mark.django_db
def test_a_retry_whose_message_is_lost_falls_due_for_the_relay(queue: str, publish_now) -> None:
    # A worker killed as it takes a retry's message (Redis' BRPOP window, the filesystem
    # transport) loses it: the retry's row falls due for the relay one threshold after the
    # retry's own time, and the relay's retries send it then.
    with shop_wiring(queue, SUBSCRIPTIONS=[FLAKY]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        before = timezone.now()
        outcome = process_message(message, 0, manage_connections=False)
        after = timezone.now()
        assert outcome.status == "retry" and outcome.retry_in is not None
        row: Any = Delivery.objects.get(event_id=paid.id, subscription="shop-flaky")
        wait = timedelta(seconds=outcome.retry_in + resend_after())
        assert (row.status, row.attempts) == ("pending", 1)
        assert before + wait <= row.retry_at <= after + wait

        # The retry's message never came: once the row is due, the relay sends the retry.
        Delivery.objects.filter(pk=row.pk).update(retry_at=timezone.now() - timedelta(seconds=1))
        out = StringIO()
        call_command("events_relay", "--min-age", "0", stdout=out, stderr=StringIO())
        assert "1 due retry(ies)" in out.getvalue()
        [again] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        assert process_message(again, 0, manage_connections=False).status == "succeeded"

    row.refresh_from_db()
    assert (row.status, row.attempts, row.retry_at) == ("succeeded", 2, None)


@pytest.mark.django_db(transaction=True)  # the ordered claim and finish commit
def test_an_ordered_retry_is_left_to_the_relays_check_of_its_key(queue: str, publish_now) -> None:
    # An ordered key's first unfinished delivery has a check of its own for a lost message
    # (pending, no due time, untouched): its retry row gets no due time.
    with shop_wiring(queue, SUBSCRIPTIONS=[{**FLAKY, "ordering_key": "order_id"}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        assert process_message(message, 0, manage_connections=False).status == "retry"

    row: Any = Delivery.objects.get(event_id=paid.id, subscription="shop-flaky")
    assert (row.status, row.attempts, row.retry_at) == ("pending", 1, None)
