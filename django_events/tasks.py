"""The one Celery task, ``django_events.deliver``. The only module that defines tasks."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from django_events.conf import conf
from django_events.delivery.worker import process_message


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
        # A changed message (a run that did not count) replaces the task's argument.
        args = None if outcome.message is None else (outcome.message,)
        raise self.retry(countdown=outcome.retry_in, exc=outcome.error, args=args)
    return outcome.status


@shared_task(name="django_events.relay", ignore_result=True)
def relay(batch_size: int = 500, min_age: float = 10.0) -> int:
    """Send pending outbox records: schedule it with Celery beat instead of ``--loop``."""
    from django_events.operations.relay import relay_pending

    return relay_pending(batch_size=batch_size, min_age=min_age).sent
