from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_events.checks import check_configuration, check_handlers
from django_events.conf import conf
from django_events.wiring.compiled import exchange_name
from django_events.wiring.registry import get_registry


class Command(BaseCommand):
    help = "Print the queues a Celery worker must consume, comma-separated (for worker -Q)."
    # Django's checks would stop it before printing anything: it reports ours itself, after
    # the queues, so `-Q "$(...)"` never gets an empty name.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--explain",
            action="store_true",
            help="Say, queue by queue, what a worker consuming it runs (broadcasts included).",
        )

    def handle(self, *args: Any, explain: bool = False, **options: Any) -> None:
        # Never empty: `worker -Q ""` would fail. The queue of the webhook endpoints
        # registered at run time (DEFAULT_QUEUE unless set) is always there: endpoints are
        # rows, added without a deploy.
        queues = sorted({*get_registry().queues(), conf.WEBHOOK_ENDPOINTS["queue"]})
        if not explain:
            self.stdout.write(",".join(queues))
        else:
            self._explain(queues)
        errors = [m for m in (*check_configuration(), *check_handlers()) if m.is_serious()]
        for message in errors:
            self.stderr.write(f"{message.obj}: ({message.id}) {message.msg}")
        if errors:
            raise CommandError(
                f"{len(errors)} problem(s) in the events configuration: the queues above may "
                "be incomplete and deliveries will fail (see `manage.py events_check`)."
            )

    def _explain(self, queues: list[str]) -> None:
        subscriptions = [s for s in get_registry().subscriptions.values() if s.is_queued]
        any_broadcast = False
        for queue in queues:
            here = [s for s in subscriptions if s.queue == queue]
            shared = [s.name for s in here if not s.declaration.broadcast]
            copied = [s.name for s in here if s.declaration.broadcast]
            self.stdout.write(f"{queue}:")
            if shared:
                self.stdout.write(f"  one worker runs each message: {', '.join(shared)}")
            if copied:
                any_broadcast = True
                self.stdout.write(
                    f"  every worker gets a copy (fanout exchange {exchange_name(queue)}): "
                    f"{', '.join(copied)}"
                )
            if queue == conf.WEBHOOK_ENDPOINTS["queue"]:
                self.stdout.write("  webhook endpoints registered at run time (the admin)")
            elif not here:
                self.stdout.write("  no async subscription (the default queue)")
        self.stdout.write(f"Start workers with: celery -A <project> worker -Q {','.join(queues)}")
        if any_broadcast:
            self.stdout.write(
                "Broadcasts reach only workers whose Celery app called "
                "django_events.delivery.broadcast.consume_broadcasts(app)."
            )
