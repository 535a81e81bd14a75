"""Running one handler for one event, through the interceptors' ``handle`` hooks."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from .events import Event, handling
from .registry import Subscription


def run_handler(subscription: Subscription, event: Event, interceptors: Sequence[Any]) -> Any:
    """Call the subscription's handler with ``event`` as the current event."""
    handler = subscription.handler()
    with handling(event):
        if not interceptors:
            return handler(event)
        call_next: Any = handler
        for interceptor in reversed(interceptors):
            call_next = partial(_intercept, interceptor, subscription, call_next)
        return call_next(event)


def _intercept(interceptor: Any, subscription: Subscription, call_next: Any, event: Event) -> Any:
    return interceptor.handle(event, subscription, call_next)


def log_extra(event: Event, subscription: Subscription | str | None = None) -> dict[str, Any]:
    """The ``extra`` every log record about an event carries."""
    name = subscription.name if isinstance(subscription, Subscription) else subscription
    return {
        "event_id": str(event.id),
        "event_name": event.name,
        "subscription": name,
        "correlation_id": str(event.correlation_id),
    }
