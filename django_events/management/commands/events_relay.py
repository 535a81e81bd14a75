from __future__ import annotations

import math
import signal
import threading
import time
from datetime import datetime, timedelta
from types import FrameType, TracebackType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections
from django.db.models import Count, Max
from django.utils import timezone

from django_events.management.base import add_database_argument, routed_alias, routed_elsewhere
from django_events.models import EventRecord
from django_events.operations.relay import (
    DatabaseOutage,
    RelayResult,
    pending_of_newer_versions,
    recover_dead_runs,
    relay_backlog,
)

# Seconds between a loop's passes while the database or the broker is down, at most.
MAX_BACKOFF = 30.0


class _Stop(BaseException):
    """Raised out of the loop's wait on SIGTERM (a BaseException: no handler takes it)."""


class _StopOnSigterm:
    """SIGTERM (how systemd, Docker and Kubernetes stop a service) stops the loop as Ctrl+C
    does, but never mid-pass: during a wait at once, during a pass once its current batch
    is done (each batch commits what it sent: nothing is left half-done)."""

    def __init__(self) -> None:
        self.requested = False
        self._waiting = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _StopOnSigterm:
        # Signal handlers can only be set in the main thread (call_command elsewhere: none).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._waiting:
            raise _Stop

    def __call__(self) -> bool:
        return self.requested

    def sleep(self, seconds: float) -> None:
        """Wait between passes; raise `_Stop` once SIGTERM came (before or during)."""
        self._waiting = True  # before the check: a signal in between raises at once
        try:
            if self.requested:
                raise _Stop
            time.sleep(seconds)
        finally:
            self._waiting = False


class Command(BaseCommand):
    help = "Send pending outbox records (events committed while the broker was unreachable)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--loop", action="store_true", help="Keep polling until stopped.")
        parser.add_argument(
            "--interval",
            type=float,
            default=5.0,
            help="Seconds between polls with --loop (default 5).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=500,
            help="Records sent per transaction (default 500).",
        )
        parser.add_argument(
            "--min-age",
            type=float,
            default=10.0,
            help="Only records older than this many seconds (default 10), "
            "leaving fresh ones to the publisher's on-commit send; a one-shot run waits "
            "for the records pending when it started to reach that age.",
        )
        parser.add_argument(
            "--requeue-running-after",
            type=float,
            default=3600.0,
            metavar="SECONDS",
            help="A delivery running for longer than this (default 3600) counts as its "
            "process having died: via: tasks with the database backend, its task is requeued "
            "(its db_worker is gone); a sync one run again by events_retry, events_replay, "
            "events_resume or the admin is recorded failed, to be retried. Keep it above the "
            "longest handler run: a run still going would run twice.",
        )
        parser.add_argument(
            "--resend-unfinished-after",
            type=float,
            default=None,
            metavar="SECONDS",
            help="Send again the async deliveries of events dispatched longer ago than this "
            "that still have no outcome recorded (their message lost, or a worker killed "
            "before it wrote their outcome: the handler runs again). Default: the "
            "RESEND_UNFINISHED_AFTER setting, else one hour plus the broker's visibility "
            "timeout (two hours on Redis). Keep it above the longest queue wait plus run.",
        )
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        _check_options(options)
        # The event log's database, as publish() records it: the routers' unless given.
        options["database"] = options["database"] or routed_alias()
        if not options["loop"]:
            try:
                self._requeue(options)
                self._one_shot(options)
            except DatabaseError as exc:
                _refuse_without_tables(options["database"], exc)
                raise CommandError(f"The database could not be reached: {exc}") from exc
            return
        try:
            with _StopOnSigterm() as stop:
                self._loop(options, stop)
        except KeyboardInterrupt:  # Ctrl+C: how a loop is stopped by hand (status 0, as runserver)
            self.stdout.write("Stopped.")
        except _Stop:  # SIGTERM: a service manager's stop, after the pass under way
            self.stdout.write("Stopped.")

    def _requeue(self, options: dict[str, Any]) -> None:
        dead = recover_dead_runs(
            older_than=options["requeue_running_after"], using=options["database"]
        )
        if dead.requeued:
            self.stdout.write(
                f"Requeued {dead.requeued} task(s) left running by a db_worker that is gone."
            )
        if dead.interrupted:
            self.stdout.write(
                f"Recorded {dead.interrupted} sync delivery(ies) left running by a process "
                "that is gone as failed: retry them (events_retry, or the admin's failures)."
            )

    def _loop(self, options: dict[str, Any], stop: _StopOnSigterm) -> None:
        """Relay until stopped, outliving database and broker outages (logged once each)."""
        interval = options["interval"]
        outage = DatabaseOutage(options["database"])
        delay, unsent_before = interval, 0
        while True:
            try:
                self._requeue(options)
                result = self._drain(options, stop)
            except DatabaseError as exc:
                _refuse_without_tables(options["database"], exc)  # no outage: no relay ever
                outage.failed(exc)
                delay = min(delay * 2, max(interval, MAX_BACKOFF))
                stop.sleep(delay)
                continue
            outage.passed()
            if result.sent or result.retried or result.resent or result.unsent > unsent_before:
                # This pass's count: the records younger than --min-age are not in it. A pass
                # the broker refused nothing says nothing of it.
                left = f"{result.unsent} not taken by the broker (left pending)"
                self.stdout.write(self._relayed(result, left if result.unsent else ""))
            unsent_before = result.unsent
            # The broker did not take everything: it is down (broker.health logs it once).
            delay = min(delay * 2, max(interval, MAX_BACKOFF)) if result.unsent else interval
            stop.sleep(delay)

    def _drain(self, options: dict[str, Any], stop: _StopOnSigterm | None = None) -> RelayResult:
        return relay_backlog(
            batch_size=options["batch_size"],
            min_age=options["min_age"],
            using=options["database"],
            resend_after=options["resend_unfinished_after"],
            stop=stop,
        )

    @staticmethod
    def _relayed(result: RelayResult, left: str) -> str:
        # Due deliveries: retries, and ordered hand-ons, the broker refused to a worker.
        due = (
            f" and {result.retried} due delivery(ies) (retries, hand-ons)" if result.retried else ""
        )
        parts = [f"Relayed {result.sent} event(s){due}"]
        parts += [left] if left else []
        parts += [f"resent {result.resent} delivery(ies) with no outcome"] if result.resent else []
        return "; ".join(parts) + "."

    def _one_shot(self, options: dict[str, Any]) -> None:
        """Send every record pending when the run started; account for each one left."""
        started = timezone.now()
        result = self._drain(options)
        total, retried, unsent = result.sent, result.retried, result.unsent
        resent = result.resent
        if not unsent:
            # Records of the last --min-age seconds (an outage that just ended): wait for them
            # to come of age rather than race their publisher's own send, then send them.
            young = self._pending(options).filter(
                occurred_at__lte=started,
                occurred_at__gt=started - timedelta(seconds=options["min_age"]),
            )
            found = young.aggregate(count=Count("pk"), newest=Max("occurred_at"))
            if found["count"]:
                newest: datetime = found["newest"]
                ready_at = newest + timedelta(seconds=options["min_age"])
                wait = max((ready_at - timezone.now()).total_seconds(), 0.0)
                self.stdout.write(
                    f"Waiting {wait:.1f}s: {found['count']} pending record(s) are younger "
                    f"than --min-age ({options['min_age']:g}s), left meanwhile to their "
                    "publishers' own send."
                )
                time.sleep(wait)
                more = self._drain(options)
                total, retried, unsent = total + more.sent, retried + more.retried, more.unsent
                resent += more.resent
        left = self._pending(options).count()
        newer = self._pending(options).filter(occurred_at__gt=started).count() if left else 0
        versions = pending_of_newer_versions(started, options["database"]) if left else 0
        relayed = RelayResult(total, retried=retried, resent=resent)
        self.stdout.write(self._relayed(relayed, f"{left} still pending"))
        if newer:
            self.stdout.write(
                f"  {newer} dated after this run started (published meanwhile, or a "
                "publisher's clock ahead): the next run sends them."
            )
        if versions:
            self.stdout.write(
                f"  {versions} of a version newer than this release declares: a relay of the "
                "newer release sends them."
            )
        if unsent:
            raise CommandError(
                f"The broker did not take every pending event: {left - newer} record(s) from "
                "before this run are still pending; run events_relay again once it takes them."
            )
        locked = left - newer - versions
        if locked:
            self.stdout.write(
                f"  {locked} locked by another relay running at the same time: "
                "that relay sends them."
            )

    def _pending(self, options: dict[str, Any]) -> Any:
        return EventRecord.objects.using(options["database"]).filter(
            status=EventRecord.Status.PENDING
        )


def _check_options(options: dict[str, Any]) -> None:
    """Raise `CommandError` naming an option whose value is out of range, and its value."""
    if options["batch_size"] < 1:
        raise CommandError(f"--batch-size must be at least 1, got {options['batch_size']}")
    seconds = {
        "--interval": options["interval"],
        "--min-age": options["min_age"],
        "--requeue-running-after": options["requeue_running_after"],
        "--resend-unfinished-after": options["resend_unfinished_after"],  # None: the setting
    }
    for option, value in seconds.items():
        if value is None:
            continue
        if option == "--min-age":
            if not (math.isfinite(value) and value >= 0):
                raise CommandError(f"--min-age must be a number of seconds >= 0, got {value:g}")
        elif not (math.isfinite(value) and value > 0):
            raise CommandError(f"{option} must be a positive number of seconds, got {value:g}")


def _refuse_without_tables(alias: str, error: DatabaseError) -> None:
    """Raise `CommandError` if the database answers but has no event log (not migrated, or
    the log is on another alias): an outage would be waited out for good."""
    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            tables = connection.introspection.table_names(cursor)
    except DatabaseError:  # it does not answer: an outage, waited out
        return
    if EventRecord._meta.db_table not in tables:
        raise CommandError(
            f"The database {alias!r} has no django_events tables ({error}): run manage.py "
            f"migrate --database {alias}, or pass --database with the event log's alias"
            f"{routed_elsewhere(alias)}"
        ) from error
