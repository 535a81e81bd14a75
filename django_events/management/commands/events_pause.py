from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_events.management.base import EventLogCommand, add_database_argument
from django_events.operations.pausing import PauseError, pause


class Command(EventLogCommand):
    help = "Pause a subscription: its deliveries are held, not run, until events_resume."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The subscription's name (see events_list).")
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        try:
            created = pause(name, by="events_pause", using=self.database(options))
        except PauseError as exc:
            raise CommandError(str(exc)) from exc
        if created:
            self.stdout.write(f"Paused {name!r}: its deliveries are held until events_resume.")
        else:
            self.stdout.write(f"{name!r} was already paused.")
