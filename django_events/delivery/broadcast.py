"""Broadcast subscriptions: every worker consuming a queue gets its own copy of each message.

A broadcast subscription's messages go to the fanout exchange ``<queue>.broadcast`` instead
of to ``<queue>``. Each worker that consumes ``<queue>`` binds an auto-delete queue of its own
to that exchange (a `kombu.common.Broadcast` queue), once `consume_broadcasts` has been
called on its Celery app.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING, Any

from kombu import Exchange
from kombu.common import Broadcast

from django_events.logs import log_extra
from django_events.wiring.compiled import exchange_name

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("django_events.broadcast")


@cache
def route(queue: str) -> dict[str, Any]:
    """The ``send_task`` options that publish to ``queue``'s fanout exchange (no queue declared)."""
    name = exchange_name(queue)
    exchange = Exchange(name, type="fanout")
    return {"exchange": exchange, "routing_key": name, "declare": [exchange]}


def broadcast_queues(consumed: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Map each queue with broadcast subscriptions (among ``consumed``) to their names."""
    from django_events.wiring.registry import get_registry

    wanted = None if consumed is None else set(consumed)
    queues: dict[str, list[str]] = {}
    for subscription in get_registry().subscriptions.values():
        if subscription.mode != "async" or not subscription.declaration.broadcast:
            continue
        if wanted is None or subscription.queue in wanted:
            queues.setdefault(subscription.queue, []).append(subscription.name)
    return queues


def consume_broadcasts(app: Celery) -> None:
    """Make each worker of ``app`` also consume the broadcasts of the queues it consumes.

    Call it in the module that creates the Celery app. At start-up (Celery's
    ``celeryd_after_setup`` signal, after ``-Q`` was applied), the worker binds one
    auto-delete queue per broadcast exchange of the queues it consumes.
    """
    from celery.signals import celeryd_after_setup

    def add_broadcast_queues(sender: str, instance: Any, **kwargs: Any) -> None:
        if instance.app is not app:
            return
        queues = app.amqp.queues
        for queue, subscriptions in broadcast_queues(list(queues.consume_from)).items():
            name = exchange_name(queue)
            # The routing key must be the one `route` publishes with: kombu's Redis transport
            # matches fanout messages to bindings by it (RabbitMQ ignores it).
            bound = queues.select_add(
                Broadcast(name, queue=f"{name}.{sender}", unique=True, routing_key=name)
            )
            logger.info(
                "Consuming broadcasts of %s through %s (fanout exchange %s)",
                ", ".join(subscriptions),
                bound.name,
                name,
                extra=log_extra(),
            )

    celeryd_after_setup.connect(
        add_broadcast_queues, weak=False, dispatch_uid=f"django_events.broadcast.{id(app)}"
    )
