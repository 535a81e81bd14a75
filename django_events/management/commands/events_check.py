from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage
from django.core.management.base import BaseCommand, CommandError

from django_events.checks import (
    check_celery,
    check_configuration,
    check_database,
    check_handlers,
    check_lock,
    check_tasks,
    check_upcasters,
)
from django_events.inbound.checks import check_inbound
from django_events.management.contract import line
from django_events.wiring.registry import reset_registry


class Command(BaseCommand):
    help = "Validate settings, manifests, payload schemas, handlers and the Celery app."
    requires_system_checks: list[str] = []  # it runs our checks itself and reports them all

    def handle(self, *args: Any, **options: Any) -> None:
        reset_registry()  # read the manifests as they are on disk now
        messages: list[CheckMessage] = [
            *check_configuration(),
            *check_handlers(),
            *check_celery(),
            *check_tasks(),
            *check_database(),
            *check_inbound(),
            *check_upcasters(),
            *check_lock(),
        ]
        for message in messages:
            text = line(message)
            self.stderr.write(text) if message.is_serious() else self.stdout.write(text)
        errors = sum(1 for m in messages if m.is_serious())
        if errors:
            raise CommandError(f"{errors} problem(s) found in the events configuration.")
        warnings = len(messages) - errors
        self.stdout.write(f"Events configuration OK ({warnings} warning(s)).")
