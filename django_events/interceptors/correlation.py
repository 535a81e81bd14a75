"""Logging with correlation and causation ids: an interceptor and a logging filter."""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

from django_events.events import Event, current_event
from django_events.interceptors.base import CallNext, Interceptor
from django_events.logs import log_extra

if TYPE_CHECKING:
    from django_events.wiring.compiled import Subscription

LOGGER = "django_events.interceptors.correlation"


def _logger() -> logging.Logger:
    # Looked up when used, not at import: LOGGING imports this module for CorrelationFilter,
    # and dictConfig() then disables every logger that existed before it ran
    # (disable_existing_loggers, true unless set), this one included.
    return logging.getLogger(LOGGER)


def correlation_extra(event: Event, subscription: str | None = None) -> dict[str, Any]:
    """The ``extra`` of a log record about ``event``: ids of the event and of its chain."""
    causation = str(event.causation_id) if event.causation_id else None
    return {**log_extra(event, subscription), "causation_id": causation}


class CorrelationInterceptor(Interceptor):
    """Log every publish and every handler run (logger ``django_events.interceptors.correlation``).

    Records carry ``event_id``, ``event_name``, ``subscription``, ``correlation_id`` and
    ``causation_id`` as extras, and name both ids in the message, so one grep for a
    correlation id follows a whole chain across processes.
    """

    def send(self, event: Event) -> None:
        _logger().info(
            "Published %s %s (correlation %s, caused by %s)",
            event.name,
            event.id,
            event.correlation_id,
            event.causation_id or "-",
            extra=correlation_extra(event),
        )

    def handle(self, event: Event, subscription: Subscription, call_next: CallNext) -> Any:
        extra = correlation_extra(event, subscription.name)
        started = perf_counter()
        try:
            result = call_next(event)
        except Exception as exc:
            _logger().warning(
                "Handler %s failed on %s %s after %.1f ms (correlation %s): %s: %s",
                subscription.name,
                event.name,
                event.id,
                (perf_counter() - started) * 1000,
                event.correlation_id,
                type(exc).__name__,
                exc,
                extra=extra,
            )
            raise
        _logger().info(
            "Handled %s %s by %s in %.1f ms (correlation %s, caused by %s)",
            event.name,
            event.id,
            subscription.name,
            (perf_counter() - started) * 1000,
            event.correlation_id,
            event.causation_id or "-",
            extra=extra,
        )
        return result


class CorrelationFilter(logging.Filter):
    """Add the handled event's ids to every log record emitted while a handler runs.

    Attach it to a handler in ``LOGGING``
    (``"()": "django_events.interceptors.correlation.CorrelationFilter"``) and use
    ``%(correlation_id)s`` in formats: outside handlers the ids are ``"-"``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        event = current_event()
        for key, value in (correlation_extra(event) if event else {}).items():
            if key != "subscription" and not hasattr(record, key):
                setattr(record, key, value)
        for key in ("event_id", "event_name", "correlation_id", "causation_id"):
            if getattr(record, key, None) is None:
                setattr(record, key, "-")
        return True
