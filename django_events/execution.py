"""Running one handler for one event, through the interceptors' ``handle`` hooks."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from functools import partial
from typing import Any

from .events import Event, handling
from .registry import Subscription

_attempt: ContextVar[int] = ContextVar("django_events_attempt", default=1)


def current_attempt() -> int:
    """The number of the handler run in progress for its event, 1 for the first.

    Interceptors read it in ``handle`` (async retries and manual retries count up).
    """
    return _attempt.get()


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
        token = _attempt.set(attempt)
        try:
            return call_next(event)
        finally:
            _attempt.reset(token)


def _intercept(interceptor: Any, subscription: Subscription, call_next: Any, event: Event) -> Any:
    return interceptor.handle(event, subscription, call_next)


LOG_FIELDS = ("event_id", "event_name", "subscription", "correlation_id")


def log_extra(
    event: Event | None = None, subscription: Subscription | str | None = None
) -> dict[str, Any]:
    """The ``extra`` of every log record of the package (``None`` where it is not known).

    JSON log formatters find ``event_id``, ``event_name``, ``subscription`` and
    ``correlation_id`` on every record, whatever the record is about.
    """
    name = subscription.name if isinstance(subscription, Subscription) else subscription
    if event is None:
        return {"event_id": None, "event_name": None, "subscription": name, "correlation_id": None}
    return {
        "event_id": str(event.id),
        "event_name": event.name,
        "subscription": name,
        "correlation_id": str(event.correlation_id),
    }


def batch_log_extra(events: Sequence[Event]) -> dict[str, Any]:
    """``log_extra`` of a record about several events: the event's fields if there is one."""
    return log_extra(events[0] if len(events) == 1 else None)
