"""A key's next ordered deliveries run by the task that finished the one before them.

An ordered delivery that finds an earlier one of its key unfinished is held (`ordering`); the
worker that finishes the earlier one hands the key on to it. Sent as a message, that hand-on
goes to the back of the queue, behind the key's later messages: each of those comes up before
it, finds it unfinished and is held in turn, so while a backlog lasts every delivery of a busy
key costs a hold, a hand-on and a second trip through the queue (docs/performance-log.md, "Busy
keys"). The Celery task that finished the delivery runs the handed-on one itself instead, and
the ones its finish hands on, for up to `CONTINUE_FOR` seconds; the rest are sent as before.

Nothing about a delivery changes: each is claimed, run and recorded as its own message would
be (its row, its run lock, its attempts and retries). Its row stays due for events_relay in
the hand-on's `ordering.HAND_ON_GRACE` should this process die while it runs (it has no
message of its own for the broker to give back); the relay's copy of a delivery still
running then runs nothing, for its run lock. A retry it asks for is made due one threshold
for lost messages after the retry's own time before it is sent, as an unordered delivery's
retry is written.

Only deliveries that a run lock protects and that run without a time limit are run this
way. Without the lock (`ordering.locks_runs`: SQLite, a pool that outlives its sessions) a
relay copy sent while a handler runs longer than the hand-on's grace would run beside it. A
task's time limit is its own delivery's, and would cut another's handler short. A
subscription with a ``timeout``, a webhook or a ``via: tasks`` one is sent its message, as
before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django_events.delivery import broker, ordering
from django_events.delivery.worker import Outcome, keep_retry_due, process_message
from django_events.logs import log_extra
from django_events.wiring.compiled import Subscription
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.ordering")

#: Seconds a task goes on running its key's handed-on deliveries before it sends the next
#: one's message (a key busy for good would otherwise keep one task running).
CONTINUE_FOR = 1.0

# What sends the retry of a delivery run here: its message, as a retry would send it
# (one run of it counted), and why.
RetrySender = Callable[[dict[str, Any], Outcome, Subscription], None]


def runs_here(subscription: Subscription, alias: str) -> bool:
    """Whether a handed-on delivery of ``subscription`` on database ``alias`` may run in the
    task that handed it on: Celery's, with no time limit of its own, its run locked."""
    return (
        subscription.via != "tasks"
        and broker.soft_limit(subscription) is None
        and ordering.locks_runs(alias)
    )


def run_handed_on(
    handed_on: list[ordering.HandedOn],
    *,
    batch_success: bool,
    retry: RetrySender,
    seconds: float | None = None,
) -> int:
    """Run the deliveries of ``handed_on`` (from `ordering.hand_ons_kept`), and those their
    finishes add to it, one after the other for up to ``seconds`` (`CONTINUE_FOR`); how many
    ran. A run that asks for a retry has it sent by ``retry``. What is left on the list is
    the caller's to send (`ordering.hand_ons_kept` does, on its way out)."""
    deadline = time.monotonic() + (CONTINUE_FOR if seconds is None else seconds)
    registry = get_registry()
    ran = 0
    while handed_on and time.monotonic() < deadline:
        subscription = registry.subscriptions.get(handed_on[0].subscription)
        if subscription is None or not runs_here(subscription, handed_on[0].alias):
            break
        message = ordering.handed_on_message(handed_on.pop(0))
        if message is None:  # gone, or unreadable: logged, and left to events_relay
            continue
        logger.debug(
            "Running the next delivery of its key in the task that handed it on",
            extra=log_extra(None, subscription.name),
        )
        outcome = process_message(message, 0, batch_success=batch_success)
        ran += 1
        if outcome.retry_in is not None:
            keep_retry_due(outcome)
            retry(outcome.retry_with or message, outcome, subscription)
    return ran
