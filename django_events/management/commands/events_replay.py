from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_events.management.base import EventLogCommand, add_database_argument
from django_events.operations.replay import ReplayError, replay_events
from django_events.operations.timerange import EXAMPLES, parse_range


class Command(EventLogCommand):
    help = (
        "Deliver stored events again to one subscription (its `when` filter still applies). "
        "An idempotent subscription skips events it already handled."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("subscription", help="The subscription to deliver to.")
        parser.add_argument(
            "--event",
            action="append",
            default=[],
            help="Only events with this name (repeatable; default: every event it receives).",
        )
        parser.add_argument("--since", help=f"Only events that occurred since: {EXAMPLES}.")
        parser.add_argument("--until", help="Only events that occurred before this moment.")
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            since, until = parse_range(options["since"], options["until"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        try:
            matched, result = replay_events(
                options["subscription"],
                events=options["event"],
                using=self.database(options),
                since=since,
                until=until,
            )
        except ReplayError as exc:
            raise CommandError(str(exc)) from exc
        for reason in result.skipped:
            self.stderr.write(f"Skipped {reason}")
        self.stdout.write(
            f"Replayed {matched} stored event(s) to {options['subscription']}: {result.summary()}"
        )
        if result.unsent:
            raise CommandError("The broker did not take every delivery; they are marked failed.")
