from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_events.management.base import EventLogCommand, add_database_argument
from django_events.operations.pausing import PauseError, is_paused, resume


class Command(EventLogCommand):
    help = "Resume a paused subscription and deliver what it held, oldest event first."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The subscription's name (see events_list).")
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        using = self.database(options)
        was_paused = is_paused(name, using=using)
        try:
            result = resume(name, using=using)
        except PauseError as exc:
            raise CommandError(str(exc)) from exc
        done = f"Resumed {name!r}." if was_paused else f"{name!r} was not paused."
        self.stdout.write(f"{done} Held deliveries: {result.summary()}")
        for reason in result.skipped:
            self.stderr.write(f"skipped: {reason}")
        if result.unsent:
            raise CommandError(f"{result.unsent} held deliveries not sent: the broker is down")
