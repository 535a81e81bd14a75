"""Interceptors for the tests: they note what they saw in ``calls``; some of them fail."""

from __future__ import annotations

from typing import Any

from django_events import Event
from django_events.interceptors.base import Interceptor
from django_events.interceptors.context import ContextInterceptor

calls: list[tuple[str, str, str]] = []  # (interceptor, hook, event name or subscription)


class Outer(Interceptor):
    def send(self, event: Event) -> None:
        calls.append(("outer", "send", event.name))
        event.headers["stamp"] = "outer"

    def handle(self, event: Event, subscription: Any, call_next: Any) -> Any:
        calls.append(("outer", "before", subscription.name))
        result = call_next(event)
        calls.append(("outer", "after", subscription.name))
        return result


class Inner(Interceptor):
    def send(self, event: Event) -> None:
        calls.append(("inner", "send", event.headers.get("stamp", "")))

    def handle(self, event: Event, subscription: Any, call_next: Any) -> Any:
        calls.append(("inner", "before", subscription.name))
        return call_next(event)


class StampsOnly(Interceptor):
    """Overrides ``send`` only: handlers run through the base class's ``handle``."""

    def send(self, event: Event) -> None:
        event.headers["stamp"] = "only"


class RefusesToSend(Interceptor):
    def send(self, event: Event) -> None:
        raise PermissionError("no tenant bound")


class RefusesOrderTwo(Interceptor):
    def send(self, event: Event) -> None:
        if event.data["order_id"] == 2:
            raise ValueError("order 2 is on hold")


class BadHeader(Interceptor):
    def send(self, event: Event) -> None:
        event.headers["tenant"] = 42  # type: ignore[assignment]


class FailsToHandle(Interceptor):
    def handle(self, event: Event, subscription: Any, call_next: Any) -> Any:
        raise LookupError(f"tenant of {subscription.name} is gone")


class NeedsArguments(Interceptor):
    def __init__(self, level: int) -> None:
        self.level = level


class OnlySends:
    def send(self, event: Event) -> None:
        pass


tenant_only = ContextInterceptor(keys=["tenant"])
