from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_events.wiring.describing import describe_wiring
from django_events.wiring.listing import FORMATS, render


class Command(BaseCommand):
    help = "Print the wiring: every event and its subscriptions (table, JSON or Mermaid)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--format", choices=FORMATS, default="table", help="Output format (default: table)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(render(describe_wiring(), options["format"]))
