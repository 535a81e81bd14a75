"""Sync redeliveries whose process died mid-run: recorded as failures, to be retried.

`events_retry`, the admin's retry, `events_replay` and `events_resume` run a sync (or inline)
subscription's deliveries in their own process, each claimed `running` just before its run
(`redelivery._claim_run`). A process killed while a handler runs (SIGKILL, an admin request
cut off by its server) leaves that row `running`, and no worker holds a message that would
ever finish it. `record_interrupted` turns such rows, untouched for longer than a threshold,
into failures that say so, with the run counted: the failures list and `events_retry` offer
them again, and `delivery_failed` is sent. A run still going past the threshold writes its
own outcome over that failure when it ends (outcomes are upserts).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db.models import F
from django.utils import timezone

from django_events.delivery.dispatch import failed_signal
from django_events.delivery.recording import event_log_alias, event_of
from django_events.logs import log_extra
from django_events.models import Delivery

logger = logging.getLogger("django_events.relay")

#: The modes whose redeliveries run in the process that asked for them.
IN_PROCESS_MODES = ("sync", "inline")


def interrupted_error(since: str, older_than: float) -> str:
    return (
        f"Interrupted: its run began at {since} and had no outcome {older_than:g}s later; "
        "the process running it (events_retry, events_replay, events_resume or an admin "
        "request) stopped. Retry it."
    )


def record_interrupted(*, older_than: float, using: str | None = None) -> int:
    """Record as failed the sync deliveries `running` for over ``older_than`` seconds on
    ``using`` (default: where the routers write the event log); how many. Keep
    ``older_than`` above the longest handler run: a run still going is then offered for a
    retry, and a retry would run it a second time."""
    stale = Delivery.objects.using(event_log_alias(using)).filter(
        mode__in=IN_PROCESS_MODES,
        status=Delivery.Status.RUNNING,
        updated_at__lt=timezone.now() - timedelta(seconds=older_than),
    )
    recorded = 0
    for row in stale.select_related("event"):
        error = interrupted_error(row.updated_at.isoformat(timespec="seconds"), older_than)
        # Only if still as read: a run that ended meanwhile keeps its outcome.
        if not stale.filter(pk=row.pk, updated_at=row.updated_at).update(
            status=Delivery.Status.FAILED,
            attempts=F("attempts") + 1,
            last_error=error,
            traceback="",
            updated_at=timezone.now(),
        ):
            continue
        recorded += 1
        row.refresh_from_db(fields=["status", "attempts", "last_error"])
        event = event_of(row.event)
        logger.error(
            "Sync delivery %s of event %s interrupted: running since %s, no outcome after "
            "%gs; recorded failed",
            row.subscription,
            row.event_id,
            row.updated_at.isoformat(timespec="seconds"),
            older_than,
            extra=log_extra(event, row.subscription),
        )
        failed_signal(event, row)
    return recorded
