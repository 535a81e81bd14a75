"""Async deliveries through Django's Tasks framework (``django.tasks`` on Django 6, the
``django-tasks`` backport on 5.2): the task ``deliver`` runs the same messages as Celery's.

Imported only where a subscription goes ``via: tasks``: it needs one of those packages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.db import router
from django.utils import timezone

from django_events.conf import conf
from django_events.delivery.messages import build_message, event_body
from django_events.delivery.worker import process_message
from django_events.events import Event
from django_events.logs import batch_log_extra
from django_events.wiring.compiled import Subscription

try:
    from django.tasks import task, task_backends  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Django 5.2: the backport
    from django_tasks import task, task_backends  # type: ignore[no-redef,assignment,unused-ignore]

logger = logging.getLogger("django_events.tasks")

DB_BACKENDS = ("django_tasks_db.backend.DatabaseBackend", "django_tasks_db.DatabaseBackend")

SendItem = tuple[Event, bool, Sequence[Subscription]]


@task()  # type: ignore[untyped-decorator,unused-ignore]
def deliver(message: dict[str, Any]) -> str:
    """Run one subscription's handler for one event; a retry is a new task, ``run_after``."""
    retries = int(message.get("task_retries", 0))
    outcome = process_message(message, retries)
    if outcome.retry_in is not None:
        again = {**message, "task_retries": retries + 1, "rerun": True}
        run_after = timezone.now() + timedelta(seconds=outcome.retry_in)
        _task(message_queue(message)).using(run_after=run_after).enqueue(again)
    return outcome.status


def message_queue(message: Mapping[str, Any]) -> str:
    return str(message.get("queue") or conf.DEFAULT_QUEUE)


def _task(queue: str) -> Any:
    return deliver.using(queue_name=queue, backend=conf.TASKS_BACKEND)


def backend() -> Any:
    """The configured task backend (``InvalidTaskBackendError`` for an unknown alias)."""
    return task_backends[conf.TASKS_BACKEND]


def is_database_backend(value: Any) -> bool:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}" in DB_BACKENDS


def enqueues_in_transaction(alias: str) -> bool:
    """Whether the task backend stores tasks in ``alias``: then a task row is written in the
    publisher's transaction and commits or rolls back with the event."""
    current = backend()
    if not is_database_backend(current):
        return False
    from django_tasks_db.models import DBTaskResult

    return router.db_for_write(DBTaskResult) == alias


def enqueue(
    items: Sequence[SendItem],
    alias: str,
    *,
    prior_attempts: Mapping[tuple[UUID, str], int] | None = None,
    rerun: bool = False,
) -> None:
    """Enqueue one task per (event, subscription); raises what the backend raises."""
    for event, _durable, subscriptions in items:
        body = event_body(event)
        for subscription in subscriptions:
            prior = prior_attempts.get((event.id, subscription.name), 0) if prior_attempts else 0
            message = build_message(body, subscription.name, alias, prior, rerun)
            message["queue"] = subscription.queue
            _task(subscription.queue).enqueue(message)


def send_deliveries(
    items: Sequence[SendItem],
    alias: str,
    *,
    prior_attempts: Mapping[tuple[UUID, str], int] | None = None,
) -> set[UUID]:
    """Enqueue after commit; return the ids of events not enqueued (never raises)."""
    rerun = prior_attempts is not None  # events_retry, events_replay, "Retry selected"
    unsent: set[UUID] = set()
    for item in items:
        try:
            enqueue([item], alias, prior_attempts=prior_attempts, rerun=rerun)
        except Exception:
            logger.exception(
                "Could not enqueue a django_events task; the event stays pending",
                extra=batch_log_extra([item[0]]),
            )
            unsent.add(item[0].id)
    return unsent
