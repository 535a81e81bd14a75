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
from django_events.delivery.messages import NO_RUNS, PriorRuns, build_message, event_body
from django_events.delivery.worker import defer_retry, process_message, record_stopped_run
from django_events.events import Event
from django_events.logs import batch_log_extra, log_extra
from django_events.wiring.compiled import Subscription

try:
    from django.tasks import (  # type: ignore[import-not-found,unused-ignore]
        TaskResultStatus,
        task,
        task_backends,
    )
except ImportError:  # Django 5.2: the backport
    from django_tasks import (  # type: ignore[no-redef,assignment,unused-ignore]
        TaskResultStatus,
        task,
        task_backends,
    )

logger = logging.getLogger("django_events.tasks")

DB_BACKENDS = ("django_tasks_db.backend.DatabaseBackend", "django_tasks_db.DatabaseBackend")
# Backends with no worker process: ImmediateBackend runs each task inside enqueue(), in the
# process that enqueues it (Django's default TASKS); DummyBackend keeps it and never runs it.
NO_WORKER_BACKENDS = frozenset(
    f"{package}.backends.{name}"
    for package in ("django.tasks", "django_tasks")
    for name in ("immediate.ImmediateBackend", "dummy.DummyBackend")
)

SendItem = tuple[Event, bool, Sequence[Subscription]]


def _as_task(func: Any) -> Any:
    """``func`` as a task of ``TASKS_BACKEND``. A task is validated when defined, by default on
    Django's alias ``"default"`` and queue ``"default"``, which a project may not have (its own
    alias, or ``QUEUES`` without ``"default"``); each enqueue names its subscription's queue."""
    queues = task_backends[conf.TASKS_BACKEND].queues
    queue = "default" if not queues or "default" in queues else sorted(queues)[0]
    return task(backend=conf.TASKS_BACKEND, queue_name=queue)(func)


@_as_task
def deliver(message: dict[str, Any]) -> str:
    """Run one subscription's handler for one event; a retry is a new task, ``run_after``."""
    retries = int(message.get("task_retries", 0))
    try:
        outcome = process_message(message, retries, batch_success=conf.SUCCESS_RECORDS == "batched")
    except (SystemExit, KeyboardInterrupt) as stop:
        # db_worker's second signal (or Ctrl+C) stops it inside the handler: the task ends
        # failed, and no db_worker runs it again. The delivery is recorded failed, to retry.
        record_stopped_run(message, retries, stop)
        raise
    if outcome.retry_in is not None:
        # The worker's own retry message, when it differs (runs that did not count, a wait
        # for a newer worker), as Celery's path retries with it.
        base = message if outcome.retry_with is None else outcome.retry_with
        again = {**base, "task_retries": retries + 1, "rerun": True}
        run_after = timezone.now() + timedelta(seconds=outcome.retry_in)
        try:
            _task(message_queue(message)).using(run_after=run_after).enqueue(again)
        except Exception:
            # The backend refused the retry (its database out of reach): the delivery's row
            # is left due for the relay's retries, as Celery's path leaves a retry its broker
            # refused. A task that raised is never run again by db_worker: raised only if
            # the row could not be marked either.
            logger.warning(
                "Could not enqueue the retry of a django_events task",
                exc_info=True,
                extra=log_extra(None, str(message.get("subscription"))),
            )
            if not defer_retry(outcome):
                raise
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


def has_workers(value: Any) -> bool:
    """Whether the backend's tasks run in worker processes, not in the one that enqueues them
    (a subclass of ImmediateBackend or DummyBackend counts as its base)."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(value).__mro__}
    return not names & NO_WORKER_BACKENDS


def enqueues_in_transaction(alias: str) -> bool:
    """Whether the task backend stores tasks in ``alias``: then a task row is written in the
    publisher's transaction and commits or rolls back with the event."""
    current = backend()
    if not is_database_backend(current):
        return False
    from django_tasks_db.models import DBTaskResult

    return router.db_for_write(DBTaskResult) == alias


def requeue_lost(older_than: float) -> list[Any]:
    """Give back to the queue the ``deliver`` tasks a database backend shows running for more
    than ``older_than`` seconds: their worker died (``db_worker`` never runs them again).

    Returns the ids requeued. A worker that is only slow would run its task a second time,
    as with Redis' ``visibility_timeout``: keep ``older_than`` above the longest handler run.
    """
    if not is_database_backend(backend()):
        return []
    from django_tasks_db.models import DBTaskResult

    cutoff = timezone.now() - timedelta(seconds=older_than)
    lost = DBTaskResult.objects.using(router.db_for_write(DBTaskResult)).filter(
        status=TaskResultStatus.RUNNING,
        task_path=deliver.module_path,
        backend_name=conf.TASKS_BACKEND,
        started_at__lt=cutoff,
    )
    requeued = []
    for row in lost.only("id", "worker_ids", "started_at"):
        # Only if still running as seen: a worker that finished meanwhile keeps its outcome.
        if lost.filter(pk=row.pk).update(status=TaskResultStatus.READY):
            logger.warning(
                "Requeued django_events task %s: running since %s on db_worker %s, "
                "which is gone (over %gs)",
                row.pk,
                row.started_at.isoformat(),
                ",".join(row.worker_ids) or "?",
                older_than,
                extra=log_extra(),
            )
            requeued.append(row.pk)
    return requeued


def enqueue(
    items: Sequence[SendItem],
    alias: str,
    *,
    prior_attempts: Mapping[tuple[UUID, str], PriorRuns] | None = None,
    rerun: bool = False,
) -> None:
    """Enqueue one task per (event, subscription); raises what the backend raises."""
    for event, _durable, subscriptions in items:
        body = event_body(event)
        for subscription in subscriptions:
            key = (event.id, subscription.name)
            prior = prior_attempts.get(key, NO_RUNS) if prior_attempts else NO_RUNS
            message = build_message(
                body, subscription.name, alias, prior.attempts, rerun, prior.uncounted
            )
            message["queue"] = subscription.queue
            _task(subscription.queue).enqueue(message)


def send_deliveries(
    items: Sequence[SendItem],
    alias: str,
    *,
    prior_attempts: Mapping[tuple[UUID, str], PriorRuns] | None = None,
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
