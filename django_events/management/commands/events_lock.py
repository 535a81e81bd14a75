from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_events.conf import conf
from django_events.management.contract import checked_contract
from django_events.wiring.contracts import dump_lock, lock_data


class Command(BaseCommand):
    help = (
        "Write the events' contract (events with version and schema, subscriptions, queues) "
        "to the lock file, for review and for events_compat."
    )
    # Not Django's system checks: W130 (the lock is stale) is what this command fixes.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--output", "-o", help="File to write (default: DJANGO_EVENTS['LOCK_FILE'])."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        registry = checked_contract(self, "Not locking a broken configuration")
        path = Path(options["output"]) if options["output"] else conf.LOCK_FILE
        text = dump_lock(lock_data(registry))
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot write {path}: {exc}") from exc
        self.stdout.write(
            f"Wrote {path} ({len(registry.events)} event(s), "
            f"{len(registry.subscriptions)} subscription(s))."
        )
