"""What the shop publishes, checked with `captured_events`: nothing is dispatched."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.db import transaction
from django_events import publish
from django_events.testing import CapturedEvents

from billing.models import Invoice
from notifications.models import Notification
from orders.models import Order


class Refunded(Exception):
    pass


def cancel_then_fail(order: Order) -> None:
    with transaction.atomic():
        publish("orders.order_cancelled", {"order_id": order.pk})
        raise Refunded(order.pk)


@pytest.mark.django_db(transaction=True)
def test_placing_orders_publishes_one_event_per_committed_order(
    captured_events: CapturedEvents,
) -> None:
    call_command("place_orders", "--count", "3")

    placed = captured_events.named("orders.order_placed")
    orders = list(Order.objects.order_by("id"))
    assert [e.payload["order_id"] for e in placed] == [o.pk for o in orders]
    big = captured_events.assert_published("orders.order_placed", {"total": 1250.0}, times=1)
    assert big.payload["email"] == "customer1@example.com"
    # The order whose payment was declined was rolled back: no event for it.
    assert "declined@example.com" not in [
        p["email"] for p in captured_events.payloads("orders.*") if "email" in p
    ]
    cancelled = captured_events.assert_published(
        "orders.order_cancelled", {"order_id": orders[-1].pk}, times=1
    )
    assert {e.headers["run"] for e in captured_events} == {cancelled.headers["run"]}
    # Captured, not dispatched: neither billing nor notifications ran.
    assert not Invoice.objects.exists()
    assert not Notification.objects.exists()


def test_an_order_event_is_published_only_when_its_transaction_commits(
    db: None, django_capture_on_commit_callbacks: Any, captured_events: CapturedEvents
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            order = Order.objects.create(email="a@example.com", total=10)
            publish(
                "orders.order_placed",
                {"order_id": order.pk, "total": 10.0, "email": order.email},
            )
        assert len(captured_events) == 0  # committed only when the test's transaction would
    captured_events.assert_published("orders.order_placed", {"order_id": order.pk}, times=1)

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(Refunded):
        cancel_then_fail(order)
    captured_events.assert_not_published("orders.order_cancelled")
