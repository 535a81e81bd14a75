"""Notifications react to orders: an alert for big orders, and an activity feed."""

from __future__ import annotations

import logging

from django_events import Event

from .models import Notification

logger = logging.getLogger(__name__)

SALES_TEAM = "sales@example.com"


def send_big_order_alert(event: Event) -> None:
    """Tell the sales team about a big order (async, only for ``total >= 1000``)."""
    order_id, total = event.payload["order_id"], event.payload["total"]
    Notification.objects.create(
        kind=Notification.Kind.BIG_ORDER,
        order_id=order_id,
        event_id=event.id,
        recipient=SALES_TEAM,
        message=f"Big order #{order_id}: {total:.2f}",
    )
    logger.info("Alerted %s about big order #%s (%.2f)", SALES_TEAM, order_id, total)


def record_activity(event: Event) -> None:
    """Add every order event to the activity feed (sync: in the publisher's process)."""
    order_id = event.payload["order_id"]
    what = event.name.removeprefix("orders.order_").replace("_", " ")
    Notification.objects.create(
        kind=Notification.Kind.ACTIVITY,
        order_id=order_id,
        event_id=event.id,
        message=f"Order #{order_id} {what}",
    )
    logger.info("Activity: order #%s %s (event %s)", order_id, what, event.id)
