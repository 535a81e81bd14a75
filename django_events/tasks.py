"""The one Celery task, ``django_events.deliver``. The only module that defines tasks."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject

from .conf import conf
from .worker import defer_retry, process_message


@shared_task(
    bind=True,
    name="django_events.deliver",
    acks_late=True,  # at least once: a message is acked only after the handler finished
    reject_on_worker_lost=True,  # a killed worker's message goes back to the queue
    ignore_result=True,
    serializer="json",
    max_retries=None,  # each subscription's retry policy decides
)
def deliver(self: Task[Any, Any], message: Any) -> str:
    """Run one subscription's handler for one event (the message names the subscription)."""
    outcome = process_message(
        message, self.request.retries or 0, batch_success=conf.SUCCESS_RECORDS == "batched"
    )
    if outcome.retry_in is not None:
        try:
            raise self.retry(countdown=outcome.retry_in, exc=outcome.error)
        except Reject as rejected:
            # Celery could not publish the retry and would drop this message: leave the
            # retry to the relay, or, if the database cannot take it either, requeue.
            if not defer_retry(outcome):
                raise Reject(outcome.error, requeue=True) from rejected
            raise
    return outcome.status


@shared_task(name="django_events.relay", ignore_result=True)
def relay(batch_size: int = 500, min_age: float = 10.0) -> int:
    """Send pending outbox records: schedule it with Celery beat instead of ``--loop``."""
    from .relay import relay_pending

    return relay_pending(batch_size=batch_size, min_age=min_age).sent


@shared_task(name="django_events.prune", ignore_result=True)
def prune() -> int:
    """Delete what ``RETENTION`` no longer keeps: schedule it with Celery beat (daily)."""
    from .pruning import prune_retained

    return prune_retained().events
