"""Interceptors (``PIPELINE``): ``send`` runs at publish, ``handle`` wraps every handler run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from django_events.events import Event
from django_events.exceptions import InterceptorError

if TYPE_CHECKING:
    from django_events.wiring.compiled import Subscription

CallNext = Callable[[Event], Any]


class Interceptor:
    """Base class for ``PIPELINE`` entries: override ``send``, ``handle`` or both.

    Any object with both methods works; this class only supplies the pass-through defaults.
    """

    def send(self, event: Event) -> None:
        """Called by ``publish()`` before the event is recorded; may add ``event.headers``."""

    def handle(self, event: Event, subscription: Subscription, call_next: CallNext) -> Any:
        """Wrap one handler run: call ``call_next(event)`` and return its result."""
        return call_next(event)


def run_send(interceptors: Sequence[Any], event: Event) -> None:
    """Call each interceptor's ``send``; any exception becomes an `InterceptorError`."""
    headers: dict[Any, Any] = event.headers  # typed str -> str; interceptors may break that
    for interceptor in interceptors:
        try:
            interceptor.send(event)
        except Exception as exc:
            raise InterceptorError(event.name, _name(interceptor), exc) from exc
        # Checked after each hook, so the error names the interceptor that broke it.
        for key, value in headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                problem = ValueError(f"header {key!r} is {value!r}; headers map str to str")
                raise InterceptorError(event.name, _name(interceptor), problem) from problem


def _name(interceptor: Any) -> str:
    cls = interceptor if isinstance(interceptor, type) else type(interceptor)
    return f"{cls.__module__}.{cls.__qualname__}"
