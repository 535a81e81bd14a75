"""Figure 8: a worker delivering a v1 event upcast to v3, against a current (v3) event."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from django_events.delivery.messages import build_message
from django_events.delivery.worker import process_message
from django_events.wiring.registry import get_registry

from .bench_publish import Context
from .harness import Baseline, Target, compare, per_op

V3_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order_id", "amount", "currency", "channel"],
    "properties": {
        "order_id": {"type": "integer"},
        "amount": {"type": "integer"},
        "currency": {"type": "string"},
        "channel": {"type": "string"},
        "email": {"type": "string"},
    },
}
UPCASTERS = "tests.app.upcasters"


def _message(version: int, payload: dict[str, Any]) -> dict[str, Any]:
    event = {
        "id": str(uuid.uuid4()),
        "name": "bench.versioned",
        "payload": payload,
        "headers": {},
        "occurred_at": timezone.now().isoformat(),
        "correlation_id": str(uuid.uuid4()),
        "causation_id": None,
        "version": version,
    }
    return build_message(event, "bench-versioned", "default")


def figure_8(ctx: Context) -> bool:
    """The worker's path for one message (parse, upcast, validate, build, run a no-op handler;
    ``record: failures``, so no database write), v1 -> v3 through two upcasters vs v3."""
    value = {
        **settings.DJANGO_EVENTS,
        "EVENTS": {
            "bench.versioned": {
                "schema": V3_SCHEMA,
                "record": "failures",
                "version": 3,
                "upcast": {1: f"{UPCASTERS}.split_total", 2: f"{UPCASTERS}.add_channel"},
            }
        },
        "SUBSCRIPTIONS": [
            {
                "name": "bench-versioned",
                "event": "bench.versioned",
                "handler": "benchmarks.handlers.noop",
                "mode": "async",
            }
        ],
    }
    n = ctx.count(20000)
    v1 = _message(1, {"order_id": 1, "total": 12.5, "email": "a@example.com"})
    v3 = _message(3, {"order_id": 1, "amount": 1250, "currency": "EUR", "channel": "web",
                      "email": "a@example.com"})  # fmt: skip

    def deliver(message: dict[str, Any]) -> float:
        def run(count: int) -> None:
            for _ in range(count):
                outcome = process_message(message, 0, manage_connections=False)
                assert outcome.status == "succeeded", outcome

        return per_op(run, n)

    with override_settings(DJANGO_EVENTS=value):
        get_registry()
        deliver(v1)  # imports the upcasters before timing
        return bool(
            compare(
                "8",
                "worker delivery of a v1 event upcast to v3",
                "us",
                lambda: deliver(v1),
                [Baseline("a current v3 event", lambda: deliver(v3), Target(1.1))],
                ctx.repeat,
            )
        )
