"""The wiring as data: every event with its subscriptions, read from the registry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from django_events.conf import conf
from django_events.wiring.compiled import Registry, Subscription
from django_events.wiring.registry import get_registry


@dataclass(frozen=True)
class SubscriptionInfo:
    """One subscription as the wiring page and ``events_list`` show it."""

    name: str
    event: str
    handler: str
    mode: str
    queue: str | None
    when: dict[str, Any] | None
    retry: dict[str, Any] | None
    broadcast: bool
    idempotent: bool
    timeout: float | None
    origin: str
    give_up_after: float | None = None
    ordering_key: str | None = None
    via: str | None = None  # run by a worker: "celery" or "tasks" (Django's Tasks framework)


def carried(subscription: SubscriptionInfo) -> str:
    """How a subscription's deliveries go, in one line: its mode, what runs them and on which
    queue (``async via celery · big-orders``, ``webhook via tasks · hooks``, ``sync``)."""
    via = f" via {subscription.via}" if subscription.via else ""
    return subscription.mode + via + (f" · {subscription.queue}" if subscription.queue else "")


@dataclass(frozen=True)
class EventInfo:
    """One declared event and the subscriptions it reaches."""

    name: str
    description: str
    schema: Any
    type: str | None
    durable: bool
    record: str
    redact: list[str]
    origin: str
    subscriptions: list[SubscriptionInfo] = field(default_factory=list)


@dataclass(frozen=True)
class EndpointInfo:
    """A webhook endpoint registered at run time, as the wiring shows it (no secret, and of
    its URL only the scheme, host and port: a path or query may hold a token)."""

    name: str  # its subscription: endpoint:<id>
    url: str
    events: list[str]  # its patterns
    queue: str
    enabled: bool
    state: str  # enabled, failing since <time>, disabled, disabled: failing too long
    description: str
    retry: dict[str, Any]
    timeout: float | None
    failing_since: datetime | None = None  # its first failed attempt since the last success
    mode: str = "webhook"


@dataclass(frozen=True)
class Wiring:
    """Everything declared, sorted by name; ``unmatched``: patterns that match no event;
    ``endpoints``: the webhook endpoints given (each enabled one is also a subscription of
    the events it matches)."""

    events: list[EventInfo]
    unmatched: list[SubscriptionInfo]
    problems: int
    endpoints: list[EndpointInfo] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_wiring(
    registry: Registry | None = None, endpoints: Sequence[EndpointInfo] = ()
) -> Wiring:
    """Describe the registry (the current one by default) and the webhook ``endpoints``
    (`django_events.delivery.endpoints.describe` reads them: the declarations need no
    database)."""
    registry = registry or get_registry()
    events: list[EventInfo] = []
    used: set[str] = set()
    hooks = [(e, _endpoint_subscription(e)) for e in endpoints if e.enabled]
    for name in sorted(registry.events):
        compiled = registry.events[name]
        declaration = compiled.declaration
        declared = (*compiled.inline, *compiled.sync, *compiled.async_, *compiled.tasks)
        received = [s for e, s in hooks if any(fnmatchcase(name, p) for p in e.events)]
        subscriptions = sorted([*map(_subscription, declared), *received], key=lambda s: s.name)
        used.update(s.name for s in subscriptions)
        type_ = declaration.type
        events.append(
            EventInfo(
                name=name,
                description=declaration.description,
                schema=compiled.validator.schema,  # what payloads are checked against
                type=f"{type_.__module__}.{type_.__qualname__}" if type_ else declaration.type_path,
                durable=declaration.durable,
                record=declaration.record or conf.RECORD,
                redact=list(declaration.redact),
                origin=str(declaration.origin),  # as the checks show it
                subscriptions=subscriptions,
            )
        )
    unmatched = [
        _subscription(s) for name, s in sorted(registry.subscriptions.items()) if name not in used
    ]
    unmatched += [s for _, s in hooks if s.name not in used]
    problems = sum(1 for p in registry.problems if p.is_error)
    return Wiring(events, unmatched, problems, list(endpoints))


def _subscription(subscription: Subscription) -> SubscriptionInfo:
    declaration = subscription.declaration
    is_async = subscription.is_queued
    return SubscriptionInfo(
        name=declaration.name,
        event=declaration.event,
        handler=declaration.handler or _webhook_target(declaration.url or ""),
        mode=declaration.mode,
        queue=subscription.queue if is_async else None,
        via=subscription.via if is_async else None,
        when=declaration.when,
        retry=asdict(subscription.retry) if is_async else None,
        broadcast=declaration.broadcast,
        idempotent=declaration.idempotent,
        timeout=declaration.timeout,
        ordering_key=declaration.ordering_key,
        origin=str(declaration.origin),  # as the checks show it
        give_up_after=declaration.give_up_after,
    )


def _endpoint_subscription(endpoint: EndpointInfo) -> SubscriptionInfo:
    return SubscriptionInfo(
        name=endpoint.name,
        event=" ".join(endpoint.events),
        handler=f"webhook -> {endpoint.url}",
        mode="webhook",
        queue=endpoint.queue,
        via=conf.DELIVERY,  # as the endpoints' subscriptions are delivered
        when=None,
        retry=endpoint.retry,
        broadcast=False,
        idempotent=False,
        timeout=endpoint.timeout,
        origin="webhook endpoint" + (f": {endpoint.description}" if endpoint.description else ""),
    )


def _webhook_target(url: str) -> str:
    """``webhook -> NAME`` or ``webhook -> https://host/`` (a literal URL's path or query
    may hold a token: not shown)."""
    if url.startswith("https://"):
        return f"webhook -> {shown_url(url)}"
    return f"webhook -> {url}"


def shown_url(url: str) -> str:
    """``scheme://host[:port]/`` of ``url``: never its user and password, path or query,
    any of which may hold a token (Slack's hooks carry theirs in the path)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: shown without it
        port = None
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}/"
