"""Signals django_events sends.

``delivery_failed`` is sent once when a delivery ends failed: retries used up, a
`PermanentFailure`, ``give_up_after`` passed, a sync handler that raised, or a message the
worker cannot handle. Keyword arguments: ``event`` (the `Event`, or None when the message's
event does not rebuild), ``event_id``, ``subscription`` (its name), ``mode`` (the
subscription's, as on its `Delivery`: ``sync``, ``async`` or ``webhook``), ``attempts``
(runs of the handler so far), ``error`` (the text recorded on the `Delivery`) and
``exception`` (the handler's exception, or None). The sender is the subscription's name.

``endpoint_disabled`` is sent when a webhook endpoint registered at run time is disabled for
failing too long (see below).
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from django.dispatch import Signal

from django_events.events import Event
from django_events.logs import log_extra

__all__ = ["delivery_failed", "endpoint_disabled"]

delivery_failed = Signal()

#: Sent once when a webhook endpoint is disabled for failing longer than
#: ``WEBHOOK_ENDPOINTS["disable_after"]``: ``endpoint`` (the `WebhookEndpoint`, as it was
#: before) and ``reason`` (what its admin page shows). The sender is `WebhookEndpoint`.
endpoint_disabled = Signal()

logger = logging.getLogger("django_events.signals")


def send_delivery_failed(
    *,
    event: Event | None,
    event_id: UUID | str | None,
    subscription: str,
    mode: str,
    attempts: int,
    error: str,
    exception: BaseException | None = None,
) -> None:
    """Send `delivery_failed`; a receiver that raises is logged and never breaks delivery."""
    if not delivery_failed.receivers:
        return
    results: list[tuple[Any, Any]] = delivery_failed.send_robust(
        sender=subscription,
        event=event,
        event_id=event_id,
        subscription=subscription,
        mode=mode,
        attempts=attempts,
        error=error,
        exception=exception,
    )
    for receiver, result in results:
        if isinstance(result, Exception):
            logger.error(
                "A delivery_failed receiver %r raised",
                receiver,
                exc_info=result,
                extra=log_extra(event, subscription),
            )
