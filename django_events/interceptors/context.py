"""Context values (user id, tenant...) that travel with events from publisher to handler.

Bind values where the work starts (a request, a command); `ContextInterceptor` in ``PIPELINE``
copies them into the headers of every event published meanwhile, and restores them around
each handler run, on the worker too::

    from django_events.interceptors import context

    with context.bind(tenant="acme", user_id=request.user.pk):
        publish("orders.order_placed", {...})

    def create_invoice(event):          # on the worker
        context.get("tenant")           # "acme"

Values are strings (headers are); ``bind`` converts with ``str()``. Thread- and async-safe:
they live in a `contextvars.ContextVar`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from django_events.interceptors.base import CallNext, Interceptor

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse

    from django_events.events import Event
    from django_events.wiring.compiled import Subscription

_EMPTY: Mapping[str, str] = MappingProxyType({})
_values: ContextVar[Mapping[str, str]] = ContextVar("django_events_context", default=_EMPTY)


def get(key: str, default: str | None = None) -> str | None:
    """Return the value bound to ``key`` in this context, or ``default``."""
    return _values.get().get(key, default)


def values() -> dict[str, str]:
    """Return a copy of every value bound in this context."""
    return dict(_values.get())


@contextmanager
def bind(**values: Any) -> Iterator[None]:
    """Bind values for the block, on top of those already bound; ``None`` unbinds a key."""
    merged = dict(_values.get())
    for key, value in values.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    with restore(merged):
        yield


@contextmanager
def restore(values: Mapping[str, str]) -> Iterator[None]:
    """Make ``values`` exactly the bound values for the block (what a handler run gets)."""
    token = _values.set(MappingProxyType(dict(values)))
    try:
        yield
    finally:
        _values.reset(token)


class ContextInterceptor(Interceptor):
    """Carry bound context values to handlers through ``context-<key>`` headers.

    ``keys`` limits what travels (default: every bound value). For options, point
    ``PIPELINE`` at an instance: ``tenant_only = ContextInterceptor(keys=["tenant"])``.
    """

    prefix = "context-"

    def __init__(self, keys: list[str] | tuple[str, ...] | None = None) -> None:
        self.keys = frozenset(keys) if keys is not None else None

    def send(self, event: Event) -> None:
        for key, value in _values.get().items():
            if self.keys is None or key in self.keys:
                event.headers.setdefault(self.prefix + key, value)

    def handle(self, event: Event, subscription: Subscription, call_next: CallNext) -> Any:
        start = len(self.prefix)
        carried = {
            name[start:]: value
            for name, value in event.headers.items()
            if name.startswith(self.prefix) and (self.keys is None or name[start:] in self.keys)
        }
        with restore(carried):
            return call_next(event)


class ContextMiddleware:
    """Bind ``user_id`` (the authenticated user's pk) for each request.

    Put it after ``AuthenticationMiddleware``. Subclass and override `context_for` to bind
    more (a tenant, a request id).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        with bind(**self.context_for(request)):
            return self.get_response(request)

    def context_for(self, request: HttpRequest) -> dict[str, Any]:
        """Return the values to bind for ``request``."""
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            return {"user_id": user.pk}
        return {}
