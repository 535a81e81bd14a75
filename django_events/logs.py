"""The ``extra`` every log record of the package carries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django_events.events import Event
    from django_events.wiring.compiled import Subscription


LOG_FIELDS = ("event_id", "event_name", "subscription", "correlation_id")


def log_extra(
    event: Event | None = None, subscription: Subscription | str | None = None
) -> dict[str, Any]:
    """The ``extra`` of every log record of the package (``None`` where it is not known).

    JSON log formatters find ``event_id``, ``event_name``, ``subscription`` and
    ``correlation_id`` on every record, whatever the record is about.
    """
    name = (
        subscription if subscription is None or isinstance(subscription, str) else subscription.name
    )
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
