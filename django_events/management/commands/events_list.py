from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError

from django_events.operations.pausing import pause_state
from django_events.wiring.describing import describe_wiring
from django_events.wiring.listing import FORMATS, render


class Command(BaseCommand):
    help = "Print the wiring: every event and its subscriptions (table, JSON or Mermaid)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--format", choices=FORMATS, default="table", help="Output format (default: table)."
        )
        parser.add_argument(
            "--state",
            action="store_true",
            help="Also list paused subscriptions and held deliveries (reads the database).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        fmt = options["format"]
        text = render(describe_wiring(), fmt)
        if not options["state"] or fmt == "mermaid":
            self.stdout.write(text)
            return
        try:
            state = pause_state()
        except DatabaseError as exc:  # the wiring needs no database: list it all the same
            self.stderr.write(f"Paused subscriptions unknown (database: {exc})")
            state = {}
        if fmt == "json":
            data = json.loads(text)
            data["paused"] = {name: s["held"] for name, s in state.items() if s["paused"]}
            data["held"] = {name: s["held"] for name, s in state.items() if s["held"]}
            text = json.dumps(data, indent=2, sort_keys=True)
        elif fmt == "table" and state:
            lines = [
                f"{name}: {'paused' if s['paused'] else 'resumed'}, {s['held']} held"
                for name, s in sorted(state.items())
            ]
            text += "\n\nPaused or holding deliveries:\n  " + "\n  ".join(lines)
        self.stdout.write(text)
