"""The `Event` handlers receive, and the context that links events into chains."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic
from uuid import UUID

if TYPE_CHECKING:
    # A default (PEP 696) keeps a bare `Event` valid under mypy --strict: it is Event[Any].
    from typing_extensions import TypeVar

    PayloadT = TypeVar("PayloadT", default=Any, covariant=True)
else:
    from typing import TypeVar

    PayloadT = TypeVar("PayloadT", covariant=True)


@dataclass(frozen=True, slots=True)
class Event(Generic[PayloadT]):
    """One published event, as handlers see it.

    ``payload`` is a dict, or an instance of the event's class for typed events; ``data`` is
    always the JSON form that is stored and sent. ``Event[OrderPlaced]`` types ``payload``
    (``publish(OrderPlaced(...))`` returns one).
    """

    id: UUID
    name: str
    payload: PayloadT
    headers: dict[str, str]
    occurred_at: datetime
    correlation_id: UUID
    causation_id: UUID | None
    data: dict[str, Any] = field(repr=False, compare=False)
    # Of the contract ``data`` follows: the declared one once a worker has upcast it.
    version: int = 1


# The event whose handler runs in this context: events published meanwhile chain to it.
# Set and reset around each handler run by `django_events.delivery.execution.run_handler`.
handled_event: ContextVar[Event | None] = ContextVar("django_events_current_event", default=None)


def current_event() -> Event | None:
    """Return the event whose handler is running in this context, if any."""
    return handled_event.get()


class handling:
    """Mark ``event`` as the one being handled, so events published meanwhile chain to it."""

    __slots__ = ("event", "token")

    def __init__(self, event: Event) -> None:
        self.event = event

    def __enter__(self) -> None:
        self.token = handled_event.set(self.event)

    def __exit__(self, *exc_info: object) -> None:
        handled_event.reset(self.token)


attempt_number: ContextVar[int] = ContextVar("django_events_attempt", default=1)


def current_attempt() -> int:
    """The number of the handler run in progress for its event, 1 for the first.

    Interceptors read it in ``handle`` (async retries and manual retries count up).
    """
    return attempt_number.get()
