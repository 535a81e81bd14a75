"""Billing reacts to orders. Both handlers run on a Celery worker (mode: async)."""

from __future__ import annotations

import logging

from django.utils import timezone
from django_events import Event

from orders.models import Order

from .models import Invoice

logger = logging.getLogger(__name__)


def create_invoice(event: Event) -> None:
    """Bill a placed order (subscribed with ``idempotent: true``: at most one success)."""
    order = Order.objects.get(pk=event.payload["order_id"])
    invoice = Invoice.objects.create(order=order, number=f"INV-{order.pk:06d}", amount=order.total)
    logger.info("Issued %s for order #%s (%s)", invoice.number, order.pk, invoice.amount)


def void_invoice(event: Event) -> None:
    """Void the invoice of a cancelled order.

    The cancellation may overtake the placement on another worker process; then the
    invoice does not exist yet, ``Invoice.DoesNotExist`` propagates and the subscription's
    retry policy runs this again a little later.
    """
    invoice = Invoice.objects.get(order_id=event.payload["order_id"])
    if invoice.status != Invoice.Status.VOID:
        invoice.status = Invoice.Status.VOID
        invoice.voided_at = timezone.now()
        invoice.save(update_fields=["status", "voided_at"])
    logger.info("Voided %s (order #%s cancelled)", invoice.number, invoice.order_id)


def record_payment(event: Event) -> None:
    """Mark the invoice paid when the payment provider's webhook says so.

    The webhook may arrive before the invoice exists (both are asynchronous): then
    ``Invoice.DoesNotExist`` propagates and the retry policy runs this again later.
    """
    invoice = Invoice.objects.get(order_id=event.payload["order_id"])
    invoice.paid_at = invoice.paid_at or timezone.now()
    invoice.payment_id = event.payload["payment_id"]
    invoice.save(update_fields=["paid_at", "payment_id"])
    logger.info(
        "Paid %s (payment %s, from %s)",
        invoice.number,
        invoice.payment_id,
        event.headers.get("caller"),
    )
