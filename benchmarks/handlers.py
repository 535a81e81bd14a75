"""What the benchmark subscriptions and raw tasks run."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from django.conf import settings

from django_events import Event

_clients: dict[int, redis.Redis] = {}


def noop(event: Event) -> None:
    """The sync handler of figure 1: nothing, so only the wiring is measured."""


def bump(payload: dict[str, Any]) -> None:
    """Count one handler run under the key the payload names (how a run sees it is done)."""
    client = _clients.get(os.getpid())
    if client is None:  # one connection per (forked) process
        client = _clients[os.getpid()] = redis.Redis.from_url(settings.REDIS_URL)
    client.incr(payload["note"])


def stamp_payload(payload: dict[str, Any]) -> None:
    """Note when a handler started (figure 10): ``<order_id> <time.time()>`` on a Redis list."""
    started = time.time()
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(settings.REDIS_URL)
    client.rpush(payload["note"], f"{payload['order_id']} {started}")


def stamp(event: Event) -> None:
    """Figure 10's async handler."""
    stamp_payload(event.data)


def count(event: Event) -> None:
    """The async handler: the same work as the raw Celery task."""
    bump(event.data)


def count_with_row(event: Event) -> None:
    """Figure 4's handler that uses the ORM, as most do: an order row, then the count."""
    from .models import Order

    Order.objects.create(total=event.data["total"], created_at=event.occurred_at)
    bump(event.data)


async def acount(event: Event) -> None:
    """The async handler of figure 10: the same work as :func:`count`."""
    bump(event.data)
