"""Exceptions raised by django_events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class EventError(Exception):
    """Base class of the errors `publish()` raises."""


class UnknownEvent(EventError, LookupError):
    """The event name is not declared in any manifest, setting or `@event` class."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        message = f"Unknown event {name!r}: declare it in a manifest, settings or @event."
        super().__init__(f"{message} {detail}" if detail else message)


@dataclass(frozen=True)
class PayloadProblem:
    """One schema violation: where in the payload (JSON path) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidPayload(EventError, ValueError):
    """The payload does not match the event's schema."""

    def __init__(self, name: str, problems: Sequence[PayloadProblem]) -> None:
        self.name = name
        self.problems = tuple(problems)
        details = "; ".join(str(p) for p in self.problems)
        super().__init__(f"Invalid payload for event {name!r}: {details}")


class InterceptorError(EventError):
    """An interceptor's ``send`` raised: the publish is aborted, nothing recorded or sent."""

    def __init__(self, name: str, interceptor: str, error: Exception) -> None:
        self.name = name
        self.interceptor = interceptor
        self.error = error
        super().__init__(
            f"Interceptor {interceptor} refused event {name!r}: {type(error).__name__}: {error}"
        )


class UpcastError(EventError):
    """An upcaster raised, did not import, or returned something that is not a payload."""

    def __init__(self, name: str, step: int, path: str, reason: str) -> None:
        self.name = name
        self.step = step  # the version it upgrades from
        self.path = path
        self.reason = reason
        super().__init__(f"Upcaster v{step} -> v{step + 1} of event {name!r} ({path}) {reason}")


class NewerVersion(EventError):
    """A stored or sent payload is of a newer version than this process declares."""

    def __init__(self, name: str, version: int, known: int) -> None:
        self.name = name
        self.version = version
        self.known = known
        # What the process does about it is its own to say (the worker: "Waiting for a
        # newer worker: ...", the relay: "Left pending: ..."), once.
        super().__init__(
            f"Event {name!r} is version {version}; this process knows up to version {known}"
        )


class RetryLater(Exception):
    """Raised by a handler: run this delivery again in ``seconds``.

    ``counts=False`` leaves the attempt out of ``max_attempts`` (``Delivery.attempts`` still
    counts the run). ``give_up_after`` still applies.
    """

    def __init__(self, seconds: float, *, counts: bool = True) -> None:
        if seconds < 0:
            raise ValueError(f"RetryLater needs seconds >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.counts = counts
        super().__init__(f"retry in {seconds:g}s" + ("" if counts else " (not counted)"))


class PermanentFailure(Exception):
    """Raised by a handler: this delivery has failed for good; do not retry it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
