from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections

from django_events.management.base import EventLogCommand
from django_events.operations.pausing import PauseError, pause


class Command(EventLogCommand):
    help = "Pause a subscription: its deliveries are held, not run, until events_resume."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The subscription's name (see events_list).")
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            choices=tuple(connections),
            help="Database alias.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        try:
            created = pause(name, by="events_pause", using=options["database"])
        except PauseError as exc:
            raise CommandError(str(exc)) from exc
        if created:
            self.stdout.write(f"Paused {name!r}: its deliveries are held until events_resume.")
        else:
            self.stdout.write(f"{name!r} was already paused.")
