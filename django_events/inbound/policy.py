"""An event's ``inbound`` block, read into a policy, and the secrets it names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from django_events.wiring.declarations import EventDeclaration, SourceDeclaration

AUTH_KINDS = ("hmac", "token", "permission")
DEFAULT_SOURCE = "http"
DEFAULT_TOLERANCE = 300.0  # seconds a signed timestamp stays valid, either way
DEFAULT_RETENTION = 86400.0  # seconds an idempotency key is remembered


@dataclass(frozen=True)
class InboundPolicy:
    """How callers of one event authenticate, and the limits of their calls."""

    event: str
    auth: str
    secret: str | None = None
    permission: str | None = None
    source: str = DEFAULT_SOURCE
    idempotency_key: str | None = None
    idempotency_retention: float = DEFAULT_RETENTION
    tolerance: float = DEFAULT_TOLERANCE
    max_body: int | None = None

    @classmethod
    def of(cls, declaration: EventDeclaration) -> InboundPolicy | None:
        """Return the policy of an event, or None if it accepts no inbound calls."""
        block = declaration.inbound
        if block is None:
            return None
        return cls(
            event=declaration.name,
            auth=block["auth"],
            secret=block.get("secret"),
            permission=block.get("permission"),
            source=block.get("source", DEFAULT_SOURCE),
            idempotency_key=block.get("idempotency_key"),
            idempotency_retention=block.get("idempotency_retention", DEFAULT_RETENTION),
            tolerance=block.get("tolerance", DEFAULT_TOLERANCE),
            max_body=block.get("max_body"),
        )


@dataclass(frozen=True)
class SourcePolicy:
    """How one provider's webhooks are verified and turned into declared events."""

    name: str
    auth: str
    secret: str
    events: dict[str, str]
    type: dict[str, str]  # {"header": name} or {"field": dotted path}
    idempotency: dict[str, str]
    idempotency_retention: float = DEFAULT_RETENTION
    tolerance: float = DEFAULT_TOLERANCE
    max_body: int | None = None
    payload: str | None = None
    permission: str | None = None  # never set: sources do not authenticate users

    @classmethod
    def of(cls, declaration: SourceDeclaration) -> SourcePolicy:
        """Return the policy of a source, with the defaults of its kind of auth."""
        auth = declaration.auth
        return cls(
            name=declaration.name,
            auth=auth,
            secret=declaration.secret or "",
            events=dict(declaration.events),
            type=declaration.type_at,
            idempotency=declaration.idempotency_at,
            idempotency_retention=declaration.idempotency_retention or DEFAULT_RETENTION,
            tolerance=declaration.tolerance or DEFAULT_TOLERANCE,
            max_body=declaration.max_body,
            payload=declaration.payload,
        )


class SecretNotConfigured(LookupError):
    """The setting or environment variable named as ``secret`` is missing or unusable."""

    def __init__(self, name: str, reason: str, *, missing: bool) -> None:
        self.name, self.reason, self.missing = name, reason, missing
        super().__init__(f"Inbound secret {name!r} {reason}")


def credentials(name: str) -> list[tuple[str, str]]:
    """Return the (caller identity, secret) pairs held by the setting or env var ``name``.

    A setting may hold one secret, a list of them (rotation: any of them is accepted) or a
    dict of caller name to secret (the caller name becomes the identity); an environment
    variable holds one. Raises ``SecretNotConfigured``.
    """
    value: Any = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name)
    if value is None:
        raise SecretNotConfigured(
            name, "is neither a setting nor an environment variable", missing=True
        )
    pairs: list[tuple[Any, Any]]
    if isinstance(value, str):
        pairs = [(name, value)]
    elif isinstance(value, list | tuple):
        pairs = [(name, v) for v in value]
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
    if not pairs or not all(isinstance(c, str) and isinstance(s, str) and s for c, s in pairs):
        raise SecretNotConfigured(
            name,
            "must be a non-empty string, a list of them or a dict of caller name to one",
            missing=False,
        )
    return pairs
