"""When a message the broker took counts as lost: the threshold the relay resends after.

Used by the relay's pass over deliveries with no outcome (`operations.unfinished`) and by a
worker that schedules a retry (its `pending` row falls due for the relay one threshold after
the retry's own time, should the retry's message be lost too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django_events.conf import conf
from django_events.delivery.broker import celery_app, transport_kind

if TYPE_CHECKING:
    from celery import Celery

#: Seconds allowed, beyond the broker's own redelivery delay, for a message to wait in its
#: queue and for its handler to run, before the delivery counts as lost.
QUEUE_ALLOWANCE = 3600.0
#: Transports that hand out a dead consumer's unacknowledged messages only after a visibility
#: timeout, with kombu's default for it (seconds).
VISIBILITY_TIMEOUTS = {"redis": 3600.0, "sqs": 1800.0}


def resend_after(app: Celery | None = None) -> float:
    """Seconds after its dispatch an async delivery with no outcome is sent again.

    ``RESEND_UNFINISHED_AFTER`` if set; else `QUEUE_ALLOWANCE` plus the broker's visibility
    timeout (Redis, SQS: how long it keeps a dead worker's messages before handing them out
    again), so that nothing the broker would still deliver, or a worker is still running,
    is sent twice.
    """
    value = conf.RESEND_UNFINISHED_AFTER
    if value is not None:
        return value
    return QUEUE_ALLOWANCE + visibility_timeout(app)


def visibility_timeout(app: Celery | None = None) -> float:
    """The broker's visibility timeout in seconds (0 for brokers without one: RabbitMQ)."""
    try:
        app = app or celery_app()
    except ImportError:  # CELERY_APP does not import: the send reports it
        return 0.0
    if app is None:
        return 0.0
    default = VISIBILITY_TIMEOUTS.get(transport_kind(app))
    if default is None:
        return 0.0
    options = app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", default))
