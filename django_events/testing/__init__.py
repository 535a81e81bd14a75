"""Test helpers: `captured_events` and `events_eager` (also pytest fixtures, see docs/testing.md).

Both patch process-wide switches: they see events published from any thread, and are not
meant for tests running concurrently in one process. Importing this module needs no settings.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import partial
from typing import Any
from uuid import UUID

from django_events.delivery.messages import event_body
from django_events.events import Event
from django_events.wiring.manifest import JsonPath, format_path

__all__ = [
    "CapturedEvents",
    "EagerDeliveryError",
    "EagerEvents",
    "EagerFailure",
    "captured_events",
    "events_eager",
]


class CapturedEvents(Sequence[Event]):
    """The events published while capturing, in the order their transactions committed."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __getitem__(self, index: Any) -> Any:
        return self.events[index]

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"<CapturedEvents {self.names}>"

    @property
    def names(self) -> list[str]:
        """The names of the captured events, in order."""
        return [e.name for e in self.events]

    def named(self, pattern: str) -> list[Event]:
        """The captured events named ``pattern`` (``*`` wildcards as in subscriptions)."""
        return [e for e in self.events if fnmatchcase(e.name, pattern)]

    def payloads(self, pattern: str) -> list[Any]:
        """The payloads (dicts, or typed instances) of the events named ``pattern``."""
        return [e.payload for e in self.named(pattern)]

    def clear(self) -> None:
        """Forget what was captured so far."""
        self.events.clear()

    def assert_published(
        self, name: str, payload: Any = None, *, times: int | None = None
    ) -> Event:
        """Assert an event ``name`` was published; return the last match.

        ``payload``: a dict matches events whose payload (its JSON form) has those keys with
        those values (other top-level keys are ignored); values compare as JSON values, type
        for type: ``True`` is not ``1``, ``"1"`` is not ``1``, a nested dict must have the
        same keys; ``1`` and ``1.0`` are the same number. A typed instance must be equal.
        ``times``: exactly that many matches (default: at least one).
        """
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 (got {times}): use assert_not_published")
        matches = [e for e in self.named(name) if _difference(e, payload) is None]
        if not matches or (times is not None and len(matches) != times):
            wanted = "at least 1" if times is None else str(times)
            where = f" with payload matching {payload!r}" if payload is not None else ""
            raise AssertionError(
                f"Expected {wanted} {name!r} event(s){where}, found {len(matches)}."
                f"{self._differences(name, payload)} Published: {self._summary()}"
            )
        return matches[-1]

    def assert_not_published(self, name: str) -> None:
        """Assert no event named ``name`` (a pattern) was published."""
        if self.named(name):
            raise AssertionError(f"Expected no {name!r} event. Published: {self._summary()}")

    def _summary(self) -> str:
        return ", ".join(f"{e.name} {e.data!r}" for e in self.events) or "nothing"

    def _differences(self, name: str, payload: Any) -> str:
        """Where each event named ``name`` that does not match differs from ``payload``."""
        found = []
        for index, event in enumerate(self.events):
            difference = _difference(event, payload) if fnmatchcase(event.name, name) else None
            if difference is not None:
                found.append(f"[{index}] {event.name} {difference}")
        return f" Differences: {'; '.join(found)}." if found else ""

    def _committed(self, events: list[Event]) -> None:
        self.events.extend(events)


def _difference(event: Event, payload: Any) -> str | None:
    """How ``event`` fails to match ``payload`` (see assert_published); None if it matches."""
    if payload is None:
        return None
    if isinstance(payload, Mapping):
        for key, value in payload.items():
            if key not in event.data:
                return f"{format_path((key,))}: missing (expected {value!r})"
            difference = _json_difference(event.data[key], value, (key,))
            if difference is not None:
                return difference
        return None
    return None if event.payload == payload else f"payload {event.payload!r} != {payload!r}"


def _json_difference(actual: Any, expected: Any, path: JsonPath) -> str | None:
    """The first place where the JSON value ``actual`` differs from ``expected``, or None.

    Type-strict where JSON is: a bool matches only a bool (``True == 1`` in Python, but JSON's
    ``true`` is not a number), a string only a string, an object only an object with the same
    keys. Numbers compare by value, so ``1`` matches ``1.0``: JSON has one number type, JSON
    Schema's ``integer`` accepts ``1.0``, and a receiver in another language cannot tell them
    apart.
    """
    where = format_path(path)
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return f"{where}: expected {expected!r}, got {actual!r}"
        for key in expected:
            if key not in actual:
                return f"{format_path((*path, key))}: missing (expected {expected[key]!r})"
        for key in actual:
            if key not in expected:
                return f"{format_path((*path, key))}: unexpected key (got {actual[key]!r})"
        for key, value in expected.items():
            difference = _json_difference(actual[key], value, (*path, key))
            if difference is not None:
                return difference
        return None
    if isinstance(expected, list | tuple):  # json.dumps writes a tuple as an array too
        if not isinstance(actual, list | tuple):
            return f"{where}: expected {expected!r}, got {actual!r}"
        if len(actual) != len(expected):
            return f"{where}: expected {len(expected)} item(s), got {len(actual)}: {actual!r}"
        for index, (got, value) in enumerate(zip(actual, expected, strict=True)):
            difference = _json_difference(got, value, (*path, index))
            if difference is not None:
                return difference
        return None
    if _json_kind(actual) != _json_kind(expected) or actual != expected:
        return f"{where}: expected {expected!r}, got {actual!r}"
    return None


def _json_kind(value: Any) -> type:
    """The JSON type ``value`` stands for: ``int`` and ``float`` are both numbers.

    Subclasses count as their base (a ``StrEnum`` member is a string, as in its JSON form).
    """
    for kind in (bool, str):
        if isinstance(value, kind):
            return kind
    if isinstance(value, int | float):
        return float
    return type(value)


@contextmanager
def captured_events() -> Iterator[CapturedEvents]:
    """Capture what ``publish()`` publishes, and dispatch nothing.

    Events are validated and pass the interceptors' ``send`` hooks as usual; then no
    handler runs (not even ``inline``), nothing is recorded and nothing is sent. An event
    joins the capture when its transaction commits (at once outside a transaction) and never
    if it rolls back: inside ``TestCase`` use ``captureOnCommitCallbacks(execute=True)``.
    Outside a transaction it needs no database (nor do the webhook endpoints registered at
    run time get read: nothing is sent to them).
    """
    from django.db import connections, transaction

    captured = CapturedEvents()

    def capture(batch: Sequence[Any], alias: str) -> None:
        events = [item.event for item in batch]
        if connections[alias].in_atomic_block:
            transaction.on_commit(partial(captured._committed, events), using=alias)
        else:  # what on_commit would do, without the connection it opens to ask
            captured._committed(events)

    from django_events.publishing import use_outlet

    with use_outlet(capture=capture, endpoints_for=_no_endpoints):
        yield captured


def _no_endpoints(event_name: str) -> tuple[()]:
    return ()


# Retries run at once under events_eager: a handler that always asks for an uncounted retry
# would loop for good.
MAX_UNCOUNTED_RETRIES = 100


@dataclass(frozen=True)
class EagerFailure:
    """An async delivery that failed for good under `events_eager`."""

    subscription: str
    event: Event
    error: BaseException | None


class EagerDeliveryError(AssertionError):
    """An async delivery failed under `events_eager` without a handler exception to raise."""


@dataclass
class EagerEvents:
    """What `events_eager` ran: ``delivered`` (subscription, event) pairs and ``failures``."""

    propagate: bool = True
    delivered: list[tuple[str, Event]] = field(default_factory=list)
    failures: list[EagerFailure] = field(default_factory=list)

    _queue: deque[tuple[dict[str, Any], str, Event, str]] = field(
        default_factory=deque, init=False, repr=False
    )
    _draining: bool = field(default=False, init=False, repr=False)

    def _send(self, items: Sequence[Any], alias: str) -> set[UUID]:
        for event, _durable, subscriptions in items:
            # What a worker gets: the message after a JSON round trip.
            message = json.loads(json.dumps(event_body(event)))
            for subscription in subscriptions:
                self._queue.append((message, subscription.name, event, alias))
        if self._draining:
            # Sent from a delivery in progress (a handler published): like a broker, the
            # queue runs it after that delivery, which neither waits for it nor sees it fail.
            return set()
        failed: list[EagerFailure] = []
        self._draining = True
        try:
            while self._queue:
                message, subscription, event, queued_on = self._queue.popleft()
                failure = self._deliver(message, subscription, event, queued_on)
                self.delivered.append((subscription, event))
                if failure is not None:
                    failed.append(failure)
        finally:
            self._draining = False
            self._queue.clear()
        self.failures.extend(failed)
        if failed and self.propagate:
            raise _error_of(failed[0], len(failed))
        return set()

    def _deliver(
        self, message: dict[str, Any], subscription: str, event: Event, alias: str
    ) -> EagerFailure | None:
        from django_events.delivery.messages import build_message
        from django_events.delivery.worker import process_message

        retries, uncounted = 0, 0
        raw = build_message(message, subscription, alias)
        while True:  # retries run at once: a test does not wait for backoff
            outcome = process_message(raw, retries, manage_connections=False)
            if outcome.retry_in is None:
                break
            if outcome.retry_with is not None:  # the retry carries a changed message
                raw = outcome.retry_with
            if outcome.uncounted:  # RetryLater(counts=False): a run that did not count
                uncounted += 1
                if uncounted >= MAX_UNCOUNTED_RETRIES:
                    return EagerFailure(
                        subscription,
                        event,
                        EagerDeliveryError(
                            f"async subscription {subscription!r} raised RetryLater(counts=False) "
                            f"{uncounted} times on {event.name!r} {event.id}: events_eager "
                            "does not wait, so it stops there"
                        ),
                    )
            retries += 1
        if outcome.status in ("succeeded", "held"):  # held: its subscription is paused
            return None
        return EagerFailure(subscription, event, outcome.error)


def _error_of(failure: EagerFailure, count: int) -> BaseException:
    where = f"async subscription {failure.subscription!r} failed on {failure.event.name!r}"
    more = f" ({count - 1} other failure(s) in EagerEvents.failures)" if count > 1 else ""
    if failure.error is None:
        return EagerDeliveryError(f"{where}: see its Delivery row{more}")
    failure.error.add_note(f"events_eager: {where} {failure.event.id}{more}")
    return failure.error


@contextmanager
def events_eager(*, propagate: bool = True) -> Iterator[EagerEvents]:
    """Run async subscriptions in-process, after commit, as a worker would.

    Each message takes the worker's path (JSON round trip, registry lookup, interceptors'
    ``handle``, ``Delivery`` rows); retries run at once up to ``max_attempts``. Each delivery
    is its own unit, as on a worker: events that a handler publishes are delivered after that
    handler's delivery ended, so their failures are theirs, never the publishing handler's.
    A delivery that fails for good raises its handler's exception where the outermost commit
    happened (or out of ``publish()`` outside a transaction), once every queued delivery ran;
    with ``propagate=False`` it is only recorded, as on a worker, and listed in ``failures``.
    """
    eager = EagerEvents(propagate=propagate)
    from django_events.publishing import use_outlet

    # robust=False: a failure is raised where the test committed, not logged by on_commit.
    with use_outlet(send=eager._send, robust=False):
        yield eager
