"""The one Celery task, ``django_events.deliver``. The only module that defines tasks."""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore, Reject
from celery.signals import worker_init, worker_ready

from django_events.conf import conf
from django_events.delivery import ordering
from django_events.delivery.continuing import run_handed_on
from django_events.delivery.failure_logs import masked_for_celery
from django_events.delivery.messages import summary_of
from django_events.delivery.migration_state import unapplied_problems
from django_events.delivery.worker import (
    Outcome,
    defer_retry,
    process_message,
    queues_left_waiting,
    wiring_problems,
)
from django_events.logs import log_extra
from django_events.wiring.compiled import Subscription

logger = logging.getLogger("django_events.worker")

# What a message can come to that ends its task as a success (``Outcome.status``).
DONE_WITHOUT_FAILING = frozenset({"succeeded", "held", "skipped"})


@shared_task(
    bind=True,
    name="django_events.deliver",
    acks_late=True,  # at least once: a message is acked only after the handler finished
    reject_on_worker_lost=True,  # a killed worker's message goes back to the queue
    ignore_result=True,
    serializer="json",
    max_retries=None,  # each subscription's retry policy decides
)
def deliver(self: Task[Any, Any], message: Any) -> None:
    """Run one subscription's handler for one event (the message names the subscription).

    A delivery that failed for good (logged and recorded already) ends as an ignored task,
    acknowledged: Celery would log a returned value as a task that succeeded. A message held
    (its ordered key's turn, a pause) or skipped (a duplicate) returns, as a success does: its
    work is done, its own INFO line says which, and Celery's `Ignore` costs a traceback taken
    twice, formatted, and pickled to the pool's parent: about a third of a worker's CPU
    while one key holds most of its messages (figure 16's one key).

    An ordered delivery that hands its key on to a held one runs that one next, in this task
    (`continuing`), unless this task has a time limit.
    """
    batch_success = conf.SUCCESS_RECORDS == "batched"
    # An ordered delivery's finish may hand its key on: the deliveries it hands on run here
    # next (those left are sent their messages on the way out).
    with ordering.hand_ons_kept() as handed_on:
        outcome = process_message(message, self.request.retries or 0, batch_success=batch_success)
        if handed_on and _without_time_limit(self):
            run_handed_on(handed_on, batch_success=batch_success, retry=partial(_retry, self))
    if outcome.retry_in is not None:
        # Celery would saferepr() the whole message into the retry's argsrepr (task events,
        # Flower): keep the short summary the first message had.
        shown: dict[str, Any] = {"argsrepr": summary_of(message), "kwargsrepr": "{}"}
        args = None if outcome.retry_with is None else (outcome.retry_with,)
        # Celery logs the exception (INFO "retry: Retry in 5s: <repr>"), sends its repr in
        # task events and logs a rejection's reason: the redacted values masked.
        error = masked_for_celery(message, outcome.error)
        try:
            raise self.retry(args=args, countdown=outcome.retry_in, exc=error, **shown)
        except Reject as rejected:
            # Celery could not publish the retry and would drop this message: leave the
            # retry to the relay, or, if the database cannot take it either, requeue.
            if not defer_retry(outcome):
                raise Reject(error, requeue=True) from rejected
            raise
    if outcome.status not in DONE_WITHOUT_FAILING:
        raise Ignore(f"delivery {outcome.status}")


# Set in a worker's environment when it has time limits of its own (`celery worker
# --time-limit`/`--soft-time-limit`, or the app's settings): Celery keeps them on the worker,
# not in the app's settings. Noted at `worker_init`, in the main process, whose environment
# the pool's processes inherit, forked or spawned.
WORKER_TIME_LIMITED = "DJANGO_EVENTS_WORKER_TIME_LIMITED"


@worker_init.connect(dispatch_uid="django_events.worker_limits")
def _note_worker_limits(sender: Any = None, **kwargs: Any) -> None:
    limited = getattr(sender, "time_limit", None) or getattr(sender, "soft_time_limit", None)
    os.environ[WORKER_TIME_LIMITED] = "1" if limited else ""


def _without_time_limit(task: Task[Any, Any]) -> bool:
    """Whether this task runs without a time limit: its message's, the task's own (the
    app's ``task_annotations``), the worker's or the app's settings."""
    app_conf = task.app.conf
    limits = (
        *(task.request.timelimit or ()),
        task.time_limit,
        task.soft_time_limit,
        os.environ.get(WORKER_TIME_LIMITED),
        app_conf.task_time_limit,
        app_conf.task_soft_time_limit,
    )
    return not any(limits)


def _retry(
    task: Task[Any, Any], message: dict[str, Any], outcome: Outcome, subscription: Subscription
) -> None:
    """Send the retry of a delivery that ``task`` ran for its key (`run_handed_on`): what
    ``self.retry`` sends for a delivery that was its task's own first message (one retry
    counted), to the subscription's queue. One the broker does not take is left to the
    relay, as a refused retry is."""
    # Celery's send_task options its stubs leave out.
    options: dict[str, Any] = {
        "retries": 1,
        "argsrepr": summary_of(message),
        "kwargsrepr": "{}",
    }
    try:
        task.apply_async(
            args=(message,), countdown=outcome.retry_in or 0.0, queue=subscription.queue, **options
        )
    except Exception:  # any transport error: the delivery's row keeps it
        logger.warning(
            "The broker did not take the retry of a handed-on delivery",
            exc_info=True,
            extra=log_extra(None, subscription.name),
        )
        if not defer_retry(outcome):
            # Its row is due for events_relay all the same, later: as `continuing` made it
            # before the send (`keep_retry_due`), or as its hand-on left it.
            logger.error(
                "Could not leave the retry of a handed-on delivery to events_relay at its "
                "time; events_relay sends it once its row falls due, later",
                extra=log_extra(None, subscription.name),
            )


@shared_task(name="django_events.relay", ignore_result=True)
def relay(
    batch_size: int = 500,
    min_age: float = 10.0,
    running_after: float = 3600.0,
    database: str | None = None,
) -> int:
    """Send pending outbox records: schedule it with Celery beat instead of ``--loop``.

    Each run does what one pass of ``events_relay --loop`` does: it takes deliveries running
    for over ``running_after`` seconds for dead (``--requeue-running-after``: a ``via: tasks``
    one's task is requeued, a sync redelivery is recorded failed), then relays batches of
    ``batch_size`` until the backlog is sent or the broker stops taking it. ``database``
    (``--database``): the event log's alias, by default the one the routers write it to.
    """
    from django_events.operations.relay import recover_dead_runs, relay_backlog

    recover_dead_runs(older_than=running_after, using=database)
    return relay_backlog(batch_size=batch_size, min_age=min_age, using=database).sent


@worker_ready.connect(dispatch_uid="django_events.report_wiring")
def _report_wiring(sender: Any = None, **kwargs: Any) -> None:
    """Log, as a worker starts, what will make its deliveries fail (bad handler paths)."""
    app = getattr(sender, "app", None)
    queues = getattr(getattr(app, "amqp", None), "queues", None)
    consumed = set(queues.consume_from) if queues is not None else None
    for subscription, problem in wiring_problems(consumed):
        logger.error(problem, extra=log_extra(None, subscription))
    for problem in unapplied_problems():
        logger.error(problem, extra=log_extra())
    if consumed is not None and app is not None:
        waiting = queues_left_waiting(consumed, app.conf.task_default_queue)
        if waiting:
            logger.warning(
                "This worker consumes only Celery's default queue %r, none of the queues of "
                "django_events (%s): unless another worker consumes them, their deliveries "
                'wait (-Q "$(python manage.py events_queues --via celery)")',
                app.conf.task_default_queue,
                ", ".join(waiting),
                extra=log_extra(),
            )


@shared_task(name="django_events.prune", ignore_result=True)
def prune(database: str | None = None) -> int:
    """Delete what ``RETENTION`` no longer keeps: schedule it with Celery beat (daily).
    ``database``: the event log's alias, by default the one the routers write it to."""
    from django_events.operations.pruning import prune_retained

    return prune_retained(using=database).events
