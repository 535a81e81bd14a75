from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from django_events.relay import DatabaseOutage, relay_backlog

# Seconds between a loop's passes while the database or the broker is down, at most.
MAX_BACKOFF = 30.0


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
            "leaving fresh ones to the publisher's on-commit send.",
        )
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="Database alias holding the event log."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["database"] not in connections.settings:
            raise CommandError(f"Unknown database alias {options['database']!r}")
        if options["batch_size"] < 1 or options["interval"] <= 0 or options["min_age"] < 0:
            raise CommandError("--batch-size and --interval must be positive, --min-age >= 0")
        loop, interval = options["loop"], options["interval"]
        outage = DatabaseOutage(options["database"])
        delay, unsent_before = interval, 0
        while True:
            try:
                result = relay_backlog(
                    batch_size=options["batch_size"],
                    min_age=options["min_age"],
                    using=options["database"],
                )
            except DatabaseError as exc:
                if not loop:
                    raise CommandError(f"The database could not be reached: {exc}") from exc
                # A loop outlives outages: logged once, retried with backoff.
                outage.failed(exc)
                delay = min(delay * 2, max(interval, MAX_BACKOFF))
                time.sleep(delay)
                continue
            outage.passed()
            if not loop or result.sent or result.retried or result.unsent > unsent_before:
                retries = f" and {result.retried} due retry(ies)" if result.retried else ""
                self.stdout.write(
                    f"Relayed {result.sent} event(s){retries}; {result.unsent} still pending."
                )
            if not loop:
                if result.unsent:
                    raise CommandError("The broker did not take every pending event.")
                return
            unsent_before = result.unsent
            # The broker did not take everything: it is down (broker.health logs it once).
            delay = min(delay * 2, max(interval, MAX_BACKOFF)) if result.unsent else interval
            time.sleep(delay)
