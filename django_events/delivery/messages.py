"""The delivery message: the one JSON object a ``django_events.deliver`` task carries.

Every producer (the broker, Django Tasks, the testing helpers) builds it here and every
consumer (the worker) reads it here::

    {"v": 1, "subscription": "invoice-on-order", "db": "default", "prior_attempts": 0,
     "rerun": false,                      # a retry or replay: its Delivery row exists
     "uncounted": 0,                      # runs that asked RetryLater(counts=False)
     "event": {"id": ..., "name": ..., "version": 1, "payload": {...}, "headers": {...},
               "occurred_at": ..., "correlation_id": ..., "causation_id": null,
               "sealed": ...}}           # only for events with `redact` (sealing.py)

It names the subscription, never a handler path. Anyone who can write to the broker can send
one, so `parse_message` checks all of it before anything reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import UUID

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS
from django.utils.dateparse import parse_datetime

from django_events.events import Event
from django_events.wiring.validation import json_problems, storable_text

TASK_NAME = "django_events.deliver"
MESSAGE_VERSION = 1

# Handler runs one delivery may count, manual retries included. No retry policy comes near
# it; a message claiming more (or fewer than none) is forged or corrupt, and would otherwise
# never reach its last attempt, or overflow `Delivery.attempts` (PostgreSQL: DataError).
MAX_ATTEMPTS = 1_000_000


class MalformedMessage(ValueError):
    """A message that is not a well-formed ``django_events.deliver`` argument."""


@dataclass(frozen=True)
class DeliveryMessage:
    """A checked message: its event part can be rebuilt into an `Event` and recorded."""

    subscription: str
    event: dict[str, Any]
    alias: str
    prior_attempts: int
    rerun: bool
    version: int = MESSAGE_VERSION
    uncounted: int = 0  # runs that raised RetryLater(counts=False): out of max_attempts

    @property
    def database_known(self) -> bool:
        """Whether this process has the message's database (``alias`` in ``DATABASES``)."""
        return self.alias in settings.DATABASES

    def attempt(self, retries: Any) -> int:
        """The number of this run of the handler (the task's ``retries`` comes from outside)."""
        if not _is_int(retries) or not 0 <= self.prior_attempts + retries < MAX_ATTEMPTS:
            raise MalformedMessage(f"retries is not an integer from 0 to {MAX_ATTEMPTS - 1}")
        runs: int = self.prior_attempts + retries
        # Uncounted runs are some of the runs before: every sender (a retry, a row's
        # `PriorRuns`, a replay) keeps them so. More would count this run below the first,
        # retried with no backoff for as long as the claim lasts.
        if self.uncounted > runs:
            raise MalformedMessage(
                f"uncounted ({self.uncounted}) exceeds the runs before this one ({runs})"
            )
        return runs + 1


class PriorRuns(NamedTuple):
    """A delivery's runs so far, as its row records them: what a message that sends it
    again (a retry, replay or resume, the relay's resend) goes on counting from."""

    attempts: int
    uncounted: int = 0  # of the attempts, RetryLater(counts=False) runs


#: A first send's: no run before it.
NO_RUNS = PriorRuns(0)


def event_body(event: Event[Any]) -> dict[str, Any]:
    """The JSON form of ``event`` inside a message (its payload as stored: ``data``)."""
    return {
        "id": str(event.id),
        "name": event.name,
        "payload": event.data,
        "headers": event.headers,
        "occurred_at": event.occurred_at.isoformat(),
        "correlation_id": str(event.correlation_id),
        "causation_id": str(event.causation_id) if event.causation_id else None,
        "version": event.version,
    }


def event_from_body(
    body: dict[str, Any],
    payload: Any = None,
    *,
    upcast: tuple[dict[str, Any], int] | None = None,
) -> Event[Any]:
    """Rebuild an event from `event_body` output; ``payload`` is what handlers get, if typed.

    ``upcast``: the body's payload upgraded, and the version it now has (`CompiledEvent.upgrade`).
    Raises ``KeyError``/``ValueError`` for a body `parse_message` did not check.
    """
    occurred_at = parse_datetime(body["occurred_at"])
    if occurred_at is None:
        raise ValueError(f"bad occurred_at {body['occurred_at']!r}")
    data, version = (body["payload"], body.get("version", 1)) if upcast is None else upcast
    headers = body.get("headers") or {}
    if not isinstance(data, dict) or not isinstance(headers, dict):
        raise ValueError("payload and headers must be objects")
    causation = body.get("causation_id")
    return Event(
        UUID(body["id"]),
        body["name"],
        data if payload is None else payload,
        headers,
        occurred_at,
        UUID(body["correlation_id"]),
        UUID(causation) if causation else None,
        data,
        int(version),  # messages sent before versions existed: 1
    )


def build_message(
    body: dict[str, Any],
    subscription: str,
    alias: str,
    prior_attempts: int = 0,
    rerun: bool = False,
    uncounted: int = 0,
) -> dict[str, Any]:
    """The task argument for one (event, subscription).

    ``rerun`` marks a retry or replay: its `Delivery` row already exists, so its success is
    written before the acknowledgement even with ``SUCCESS_RECORDS = "batched"``.
    ``prior_attempts`` and ``uncounted``: the runs its row records (`PriorRuns`).
    """
    message = {
        "v": MESSAGE_VERSION,
        "subscription": subscription,
        "event": body,
        "db": alias,
        "prior_attempts": prior_attempts,
    }
    if rerun:
        message["rerun"] = True
    if uncounted:
        message["uncounted"] = uncounted
    return message


def summary(subscription: str, event_id: str) -> str:
    """What Celery's monitors show as a delivery's arguments: never the payload."""
    return f"({subscription!r}, {event_id!r})"


def summary_of(message: Any) -> str:
    """`summary` of a message as received, whatever its shape."""
    event = message.get("event") if isinstance(message, dict) else None
    event_id = event.get("id") if isinstance(event, dict) else None
    subscription = message.get("subscription") if isinstance(message, dict) else None
    return summary(str(subscription), str(event_id))


def parse_message(raw: Any) -> DeliveryMessage:
    """Check a message's shape, all of it (raises `MalformedMessage`).

    A message of another format version (``v``) is parsed as far as its event and
    subscription go, so the worker can record it as failed; its ``version`` says which. Its
    database (``db``) is kept as sent, one this process lacks too (`database_known`).
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("event"), dict):
        raise MalformedMessage("not a django_events delivery message")
    version = raw.get("v", MESSAGE_VERSION)
    if not _is_int(version):
        raise MalformedMessage(f"v is {type(version).__name__}, not an integer")
    subscription = raw.get("subscription")
    if not isinstance(subscription, str) or not storable_text(subscription):
        raise MalformedMessage("subscription is not a string")
    # Kept as sent, even when this process lacks it: the worker leaves such a message for one
    # that has it (its outcome belongs in that database). Missing: the default database.
    alias = raw.get("db", DEFAULT_DB_ALIAS)
    if alias is None:
        alias = DEFAULT_DB_ALIAS
    if not isinstance(alias, str) or not alias or not storable_text(alias):
        raise MalformedMessage("db is not a database alias")
    prior = raw.get("prior_attempts", 0)
    # Below 0 after retries that ran nothing (a wait for a newer worker, the database out of
    # reach): each is one less. DeliveryMessage.attempt checks that the runs add up to a count.
    if not _is_int(prior) or not -MAX_ATTEMPTS < prior < MAX_ATTEMPTS:
        raise MalformedMessage(
            f"prior_attempts is not an integer from {1 - MAX_ATTEMPTS} to {MAX_ATTEMPTS - 1}"
        )
    if not isinstance(raw.get("rerun", False), bool):
        raise MalformedMessage("rerun is not a boolean")
    uncounted = raw.get("uncounted", 0)
    if not _is_int(uncounted) or not 0 <= uncounted < MAX_ATTEMPTS:
        raise MalformedMessage(f"uncounted is not an integer from 0 to {MAX_ATTEMPTS - 1}")
    event = raw["event"]
    _check_event(event)
    rerun = raw.get("rerun") is True
    return DeliveryMessage(subscription, event, alias, prior, rerun, version, uncounted)


def _check_event(event: dict[str, Any]) -> None:
    """The checks `event_from_body` leaves out, and those that keep `Delivery` storable."""
    name = event.get("name")
    if not isinstance(name, str) or not storable_text(name):
        raise MalformedMessage("event name is not a string")
    for key in ("id", "correlation_id", "causation_id"):
        value = event.get(key)
        if value is None and key == "causation_id":
            continue
        if not isinstance(value, str):
            raise MalformedMessage(f"event {key} is not a UUID string")
        try:
            UUID(value)
        except ValueError:
            raise MalformedMessage(f"event {key} is not a UUID string") from None
    occurred_at = event.get("occurred_at")
    try:
        parsed = parse_datetime(occurred_at) if isinstance(occurred_at, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise MalformedMessage("event occurred_at is not an aware ISO 8601 date and time")
    headers = event.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and storable_text(k) and storable_text(v)
        for k, v in headers.items()
    ):
        raise MalformedMessage("event headers do not map strings to strings")
    version = event.get("version", 1)
    if not _is_int(version) or version < 1:
        raise MalformedMessage("event version is not an integer from 1")
    payload = event.get("payload")
    if not isinstance(payload, dict):
        raise MalformedMessage("event payload is not an object")
    problems = json_problems(payload)
    if problems:  # values a database refuses: neither the event nor its failure can be stored
        raise MalformedMessage(f"event payload cannot be stored: {problems[0]}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
