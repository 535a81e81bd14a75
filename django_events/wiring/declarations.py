"""Frozen declarations of events and subscriptions, whatever their source."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["inline", "sync", "async"]
MODES: tuple[Mode, ...] = ("inline", "sync", "async")


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
    ordering_key: str | None = None  # payload path: deliveries of one key value run in order

    @property
    def is_pattern(self) -> bool:
        return "*" in self.event
