"""Place a few orders the way a view would: save, publish, commit."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django_events import publish
from django_events.models import EventRecord

from orders.models import Order

BIG_ORDER_TOTAL = Decimal("1250.00")  # at or above 1000: notifications sends an alert


class PaymentDeclined(Exception):
    """Raised inside the transaction to show that a rollback publishes nothing."""


class Command(BaseCommand):
    help = (
        "Place COUNT orders (the first one big), roll back one more, cancel the last one. "
        "Every event of this run carries the header run=<id> that show_results looks for."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, default=5, help="orders to place (>= 2)")

    def handle(self, *args: Any, count: int, **options: Any) -> None:
        if count < 2:
            raise CommandError("--count must be at least 2 (one big order, one to cancel).")
        headers = {"run": uuid.uuid4().hex[:12]}
        self.stdout.write(f"Run {headers['run']}: placing {count} orders")

        orders = []
        for index in range(count):
            total = BIG_ORDER_TOTAL if index == 0 else Decimal("19.90") + 35 * index
            orders.append(self.place(f"customer{index + 1}@example.com", total, headers))

        self.place_and_roll_back(headers)

        last = orders[-1]
        with transaction.atomic():
            last.status = Order.Status.CANCELLED
            last.save(update_fields=["status"])
            publish(
                "orders.order_cancelled",
                {"order_id": last.pk, "reason": "customer changed their mind"},
                headers=headers,
            )
        self.stdout.write(f"  cancelled order #{last.pk}")
        self.stdout.write(
            self.style.SUCCESS(
                f"Run {headers['run']}: {count} orders placed, 1 rolled back, 1 cancelled."
            )
        )

    def place(self, email: str, total: Decimal, headers: dict[str, str]) -> Order:
        """Save an order and publish ``orders.order_placed`` in one transaction."""
        with transaction.atomic():
            order = Order.objects.create(email=email, total=total)
            publish(
                "orders.order_placed",
                {"order_id": order.pk, "total": float(order.total), "email": order.email},
                headers=headers,
            )
        # Committed: the sync handler has run, the async deliveries are on the broker.
        big = "  (big order)" if total >= 1000 else ""
        self.stdout.write(f"  placed order #{order.pk}: {total}{big}")
        return order

    def place_and_roll_back(self, headers: dict[str, str]) -> None:
        """Publish inside a transaction that fails: no order, no event, no delivery."""
        events_before = EventRecord.objects.count()
        try:
            with transaction.atomic():
                order = Order.objects.create(email="declined@example.com", total=Decimal("99"))
                publish(
                    "orders.order_placed",
                    {"order_id": order.pk, "total": 99.0, "email": order.email},
                    headers=headers,
                )
                raise PaymentDeclined(f"card declined for order #{order.pk}")
        except PaymentDeclined as exc:
            self.stdout.write(f"  rolled back: {exc}")
        if Order.objects.filter(pk=order.pk).exists():
            raise CommandError(f"Order #{order.pk} survived its rollback")
        if EventRecord.objects.count() != events_before:
            raise CommandError("A rolled-back transaction left an event behind")
        self.stdout.write(f"  order #{order.pk} and its event were discarded; nothing was sent")
