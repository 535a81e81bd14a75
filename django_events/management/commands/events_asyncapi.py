from __future__ import annotations

import json
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandParser

from django_events.wiring.asyncapi import asyncapi_document
from django_events.wiring.registry import get_registry


class Command(BaseCommand):
    help = "Print the wiring as an AsyncAPI 3.0 document (channels: events; operations: handlers)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--title", default="Events", help="info.title (default 'Events').")
        parser.add_argument(
            "--api-version", default="1.0.0", help="info.version (default '1.0.0')."
        )
        parser.add_argument("--description", default="", help="info.description.")
        parser.add_argument(
            "--format", choices=["json", "yaml"], default="json", help="Output format."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        document = asyncapi_document(
            get_registry(),
            title=options["title"],
            version=options["api_version"],
            description=options["description"],
        )
        if options["format"] == "yaml":
            self.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
        else:
            self.stdout.write(json.dumps(document, indent=2, ensure_ascii=False))
