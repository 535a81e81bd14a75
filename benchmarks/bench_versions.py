"""Figure 8: a worker delivering a v1 event upcast to v3, against a current (v3) event."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
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


@contextmanager
def figure_8_loops() -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Figure 8's two loops, in the settings they need: the worker's path (``process_message``)
    for a v1 message upcast to v3, and for a v3 one (also counted by benchmarks/instructions.py).

    ``record: failures``, so no database write; the upcasters are imported on entry.
    """
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
    v1 = _message(1, {"order_id": 1, "total": 12.5, "email": "a@example.com"})
    v3 = _message(3, {"order_id": 1, "amount": 1250, "currency": "EUR", "channel": "web",
                      "email": "a@example.com"})  # fmt: skip

    def deliveries(message: dict[str, Any]) -> Callable[[int], None]:
        def run(count: int) -> None:
            for _ in range(count):
                outcome = process_message(message, 0, manage_connections=False)
                assert outcome.status == "succeeded", outcome

        return run

    with override_settings(DJANGO_EVENTS=value):
        get_registry()
        upcast_v1, current_v3 = deliveries(v1), deliveries(v3)
        upcast_v1(1)  # imports the upcasters and the handler
        yield upcast_v1, current_v3


def figure_8(ctx: Context) -> bool:
    """The worker's path for one message (parse, upcast, validate, build, run a no-op handler;
    ``record: failures``, so no database write), v1 -> v3 through two upcasters vs v3."""
    n = ctx.count(20000)
    with figure_8_loops() as (upcast_v1, current_v3):
        return bool(
            compare(
                "8",
                "worker delivery of a v1 event upcast to v3",
                "us",
                partial(per_op, upcast_v1, n),
                [Baseline("a current v3 event", partial(per_op, current_v3, n), Target(1.1))],
                ctx.repeat,
            )
        )
