from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from django_events.management.base import EventLogCommand, add_database_argument
from django_events.operations.pruning import prune_events


class Command(EventLogCommand):
    help = (
        "Delete event records (and their deliveries) older than N days. Records with a failed "
        "delivery are kept unless --include-failures; pending records (the outbox) and records "
        "with a delivery not finished (pending, held, running) always are, and so are records "
        "dispatched less than RESEND_UNFINISHED_AFTER ago (their messages may still wait in a "
        "queue). Expired inbound idempotency keys are deleted too."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days", type=float, required=True, help="Delete records older than this many days."
        )
        parser.add_argument(
            "--include-failures",
            action="store_true",
            help="Also delete records with a failed delivery.",
        )
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["days"]
        if not (math.isfinite(days) and days > 0):
            raise CommandError(f"--days must be a positive number of days, got {days:g}")
        try:
            older_than = timedelta(days=days)
            timezone.now() - older_than
        except OverflowError as exc:
            raise CommandError(f"--days {days:g} reaches back before the year 1") from exc
        result = prune_events(
            older_than,
            include_failures=options["include_failures"],
            using=self.database(options),
        )
        self.stdout.write(
            f"Deleted {result.events} event record(s) and {result.deliveries} delivery(ies) "
            f"older than {options['days']:g} day(s)."
        )
        if result.expired_keys:
            self.stdout.write(f"Deleted {result.expired_keys} expired inbound idempotency key(s).")
        if result.kept_failures:
            self.stdout.write(
                f"Kept {result.kept_failures} old record(s) with failures "
                "(--include-failures deletes them)."
            )
        if result.kept_pending:
            self.stdout.write(
                f"Kept {result.kept_pending} old record(s) still pending: run events_relay."
            )
        if result.kept_in_flight:
            self.stdout.write(
                f"Kept {result.kept_in_flight} old record(s) dispatched less than "
                f"{result.in_flight_for:g} s ago: their first deliveries may still wait in a "
                "queue (RESEND_UNFINISHED_AFTER)."
            )
        if result.kept_unfinished:
            self.stdout.write(
                f"Kept {result.kept_unfinished} old record(s) with deliveries not finished "
                "(pending, held or running)."
            )
