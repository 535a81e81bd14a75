"""Running one handler for one event, through the interceptors' ``handle`` hooks."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from django_events.events import Event, attempt_number, handling
from django_events.wiring.compiled import Subscription


def run_handler(
    subscription: Subscription, event: Event, interceptors: Sequence[Any], attempt: int = 1
) -> Any:
    """Call the subscription's handler with ``event`` as the current event."""
    handler = subscription.handler()
    with handling(event):
        if not interceptors:
            return handler(event)
        call_next: Any = handler
        for interceptor in reversed(interceptors):
            call_next = partial(_intercept, interceptor, subscription, call_next)
        token = attempt_number.set(attempt)
        try:
            return call_next(event)
        finally:
            attempt_number.reset(token)


def _intercept(interceptor: Any, subscription: Subscription, call_next: Any, event: Event) -> Any:
    return interceptor.handle(event, subscription, call_next)
