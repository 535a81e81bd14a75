from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

from django_events.relay import relay_pending


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
        while True:
            total = retried = 0
            while True:
                result = relay_pending(
                    batch_size=options["batch_size"],
                    min_age=options["min_age"],
                    using=options["database"],
                )
                total += result.sent
                retried += result.retried
                if result.unsent or result.sent + result.undeclared < options["batch_size"]:
                    break
            if total or retried or result.unsent or not options["loop"]:
                retries = f" and {retried} due retry(ies)" if retried else ""
                self.stdout.write(
                    f"Relayed {total} event(s){retries}; {result.unsent} still pending."
                )
            if not options["loop"]:
                if result.unsent:
                    raise CommandError("The broker did not take every pending event.")
                return
            time.sleep(options["interval"])
