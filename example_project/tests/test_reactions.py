"""What billing and notifications do with order events, run in-process by `events_eager`."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import TestCase
from django_events import publish
from django_events.models import Delivery
from django_events.testing import EagerEvents, captured_events, events_eager

from billing.models import Invoice
from notifications.models import Notification
from orders.models import Order


def place(total: str, email: str = "a@example.com") -> Order:
    with transaction.atomic():
        order = Order.objects.create(email=email, total=Decimal(total))
        publish(
            "orders.order_placed",
            {"order_id": order.pk, "total": float(order.total), "email": email},
        )
    return order


@pytest.mark.django_db(transaction=True)
def test_a_run_of_place_orders_is_billed_notified_and_cancelled(
    events_eager: EagerEvents,
) -> None:
    call_command("place_orders", "--count", "3")

    orders = list(Order.objects.order_by("id"))
    invoices = {i.order_id: i for i in Invoice.objects.all()}
    assert sorted(invoices) == [o.pk for o in orders]
    assert invoices[orders[-1].pk].status == Invoice.Status.VOID  # the cancelled order
    assert invoices[orders[0].pk].amount == Decimal("1250.00")
    alerts = Notification.objects.filter(kind=Notification.Kind.BIG_ORDER)
    assert [a.order_id for a in alerts] == [orders[0].pk]  # the `when` filter held
    assert Notification.objects.filter(kind=Notification.Kind.ACTIVITY).count() == 4
    assert set(Delivery.objects.values_list("status", flat=True)) == {"succeeded"}
    assert events_eager.failures == []


@pytest.mark.django_db(transaction=True)
def test_only_big_orders_alert_the_sales_team(events_eager: EagerEvents) -> None:
    small, big = place("999.99"), place("1000")

    assert [n.order_id for n in Notification.objects.filter(kind="big_order")] == [big.pk]
    assert Invoice.objects.get(order=small).amount == Decimal("999.99")


@pytest.mark.django_db(transaction=True)
def test_cancelling_an_order_without_invoice_fails_loudly(events_eager: EagerEvents) -> None:
    order = Order.objects.create(email="a@example.com", total=5)

    with pytest.raises(Invoice.DoesNotExist):
        publish("orders.order_cancelled", {"order_id": order.pk})

    failure = Delivery.objects.get(subscription="billing.void_invoice")
    assert (failure.status, failure.attempts) == ("failed", 8)  # every retry, without waiting


def test_with_pytest_django_on_commit_fixture(
    db: None, django_capture_on_commit_callbacks: Any, events_eager: EagerEvents
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        order = place("20")
        assert not Invoice.objects.exists()  # the test's transaction has not committed yet
    assert Invoice.objects.get(order=order).number == f"INV-{order.pk:06d}"


class OrdersTestCase(TestCase):
    """The same helpers in a Django TestCase, as context managers."""

    def test_placing_an_order_bills_it(self) -> None:
        with events_eager(), self.captureOnCommitCallbacks(execute=True):
            order = place("1500")
        assert Invoice.objects.get(order=order).amount == Decimal("1500")
        assert Notification.objects.filter(order_id=order.pk).count() == 2  # alert + activity

    def test_placing_an_order_publishes_it(self) -> None:
        with captured_events() as events, self.captureOnCommitCallbacks(execute=True):
            order = place("15")
        events.assert_published("orders.order_placed", {"order_id": order.pk, "total": 15.0})
        assert not Invoice.objects.exists()
