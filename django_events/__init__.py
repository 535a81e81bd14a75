"""Declarative events and subscriptions for Django.

Safe to import before settings are configured: ``publish``, ``publish_many`` and their async
forms load their module (which needs the models) on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django_events.events import Event, current_event
from django_events.exceptions import (
    EventError,
    InterceptorError,
    InvalidPayload,
    PayloadProblem,
    PermanentFailure,
    RetryLater,
    UnknownEvent,
)
from django_events.wiring.typed import event

if TYPE_CHECKING:
    from django_events.publishing import apublish, apublish_many, publish, publish_many

__all__ = [
    "Event",
    "EventError",
    "InterceptorError",
    "InvalidPayload",
    "PayloadProblem",
    "PermanentFailure",
    "RetryLater",
    "UnknownEvent",
    "apublish",
    "apublish_many",
    "current_event",
    "event",
    "publish",
    "publish_many",
]


def __getattr__(name: str) -> Any:
    if name in ("publish", "publish_many", "apublish", "apublish_many"):
        from django_events import publishing

        return getattr(publishing, name)
    raise AttributeError(f"module 'django_events' has no attribute {name!r}")
