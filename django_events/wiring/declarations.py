"""Frozen declarations of events and subscriptions, whatever their source."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["inline", "sync", "async", "webhook"]
# Subscription names of the webhook endpoints registered at run time (models.WebhookEndpoint):
# `endpoint:<id>`. A declared subscription may not take one (E323).
ENDPOINT_PREFIX = "endpoint:"
MODES: tuple[Mode, ...] = ("inline", "sync", "async", "webhook")


@dataclass(frozen=True)
class Origin:
    """Where a declaration came from: a manifest file and line, settings, or code."""

    label: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.file is not None and self.line is not None:
            return f"{self.file}:{self.line}"
        return self.file or self.label


@dataclass(frozen=True)
class Problem:
    """A configuration problem, reported as a system check and by ``events_check``."""

    id: str
    message: str
    hint: str | None = None
    origin: Origin | None = None

    @property
    def is_error(self) -> bool:
        return self.id.split(".")[-1].startswith("E")

    def __str__(self) -> str:
        where = f"{self.origin}: " if self.origin else ""
        return f"{self.id} {where}{self.message}"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``backoff * 2**(n-1)`` seconds before retry n, capped, jittered."""

    max_attempts: int = 3
    backoff: float = 2.0
    max_backoff: float = 300.0
    jitter: bool = True

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry)."""
        base = min(self.max_backoff, self.backoff * 2.0 ** min(retry_number - 1, 64))
        if self.jitter:
            # "Equal jitter": delays still grow while retries of many events spread out.
            return base / 2 + random.uniform(0, base / 2)
        return base


@dataclass(frozen=True)
class EventDeclaration:
    """An event: its name, payload schema (or type) and options."""

    name: str
    origin: Origin
    description: str = ""
    schema: dict[str, Any] | bool | None = None
    type_path: str | None = None
    type: type | None = field(default=None, compare=False)
    durable: bool = True
    redact: tuple[str, ...] = ()
    record: str | None = None
    inbound: dict[str, Any] | None = None
    version: int = 1
    # old version -> dotted path of f(payload) -> payload of the next version
    upcast: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SubscriptionDeclaration:
    """A subscription: which events go to which handler, and how."""

    name: str
    event: str
    handler: str
    origin: Origin
    mode: Mode = "sync"
    queue: str | None = None
    when: dict[str, Any] | None = None
    retry: dict[str, Any] | None = None
    broadcast: bool = False
    idempotent: bool = False
    timeout: float | None = None
    via: str | None = None  # "celery" or "tasks"; None: DJANGO_EVENTS["DELIVERY"]
    give_up_after: float | None = None
    # mode: webhook (DESIGN 3.15): where to POST, the signing secret, the body's format
    url: str | None = None  # a literal https URL, or the name of a setting or env var
    secret: str | None = None  # the name of a setting or env var holding whsec_<base64>
    format: str = "standard-webhooks"  # or "cloudevents"
    ordering_key: str | None = None  # payload path: deliveries of one key value run in order

    @property
    def is_pattern(self) -> bool:
        return "*" in self.event


# How a source's provider signs its calls (docs/inbound.md, "Webhooks from providers").
SOURCE_AUTH_KINDS = ("standard-webhooks", "github", "stripe", "hmac", "token")
# Where each kind of provider puts its event type and its delivery id, unless declared.
TYPE_DEFAULTS: dict[str, dict[str, str]] = {"github": {"header": "X-GitHub-Event"}}
IDEMPOTENCY_DEFAULTS: dict[str, dict[str, str]] = {
    "standard-webhooks": {"header": "webhook-id"},
    "github": {"header": "X-GitHub-Delivery"},
    "stripe": {"field": "id"},
}


@dataclass(frozen=True)
class SourceDeclaration:
    """A provider whose webhooks arrive at ``POST <prefix>/sources/<name>/`` (manifest ``sources``).

    ``type`` and ``idempotency`` say where the provider puts its event type and its delivery
    id: ``{"header": name}`` or ``{"field": dotted path}``; ``events`` maps its types to
    declared events. Options left out take the defaults of the ``auth`` kind.
    """

    name: str
    origin: Origin
    auth: str
    secret: str | None = None
    type: dict[str, str] | None = None
    events: dict[str, str] = field(default_factory=dict)
    idempotency: dict[str, str] | None = None
    idempotency_retention: float | None = None
    tolerance: float | None = None
    max_body: int | None = None
    payload: str | None = None  # dotted path of the part of the body to publish; None: all
    options: tuple[str, ...] = ()  # the keys the declaration gave (checks of ignored options)

    @property
    def type_at(self) -> dict[str, str]:
        """Where a call says its type: declared, else the ``auth`` kind's place."""
        return self.type or TYPE_DEFAULTS.get(self.auth, {"field": "type"})

    @property
    def idempotency_at(self) -> dict[str, str]:
        """Where a call carries its delivery id: declared, else the ``auth`` kind's place."""
        return self.idempotency or IDEMPOTENCY_DEFAULTS.get(
            self.auth, {"header": "Idempotency-Key"}
        )
