from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_events.checks import check_configuration, check_handlers
from django_events.conf import conf
from django_events.wiring.compiled import Subscription, exchange_name
from django_events.wiring.registry import get_registry

VIAS = ("celery", "tasks")
# What consumes each kind of queue: a Celery worker must never be told to consume a queue of
# Django's Tasks framework (its messages are rows of the task backend), nor db_worker Celery's.
START = {
    "celery": "celery -A <project> worker -Q {}",
    "tasks": "python manage.py db_worker --no-reload --queue-name {}",
}
WORKER = {"celery": "a Celery worker", "tasks": "db_worker"}


def _via(value: str) -> str:
    return "tasks" if value == "tasks" else "celery"  # as publishing routes a delivery


class Command(BaseCommand):
    help = (
        "Print the queues a worker must consume, comma-separated: Celery's (for worker -Q) or, "
        "with DELIVERY 'tasks' or --via tasks, Django Tasks' (for db_worker --queue-name)."
    )
    # Django's checks would stop it before printing anything: it reports ours itself, after
    # the queues, so `-Q "$(...)"` never gets an empty name.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--via",
            choices=VIAS,
            default=None,
            help="The queues of the subscriptions delivered this way (default: DELIVERY).",
        )
        parser.add_argument(
            "--explain",
            action="store_true",
            help="Say, queue by queue, what a worker consuming it runs (broadcasts included), "
            "and how to start the workers of each kind.",
        )

    def handle(
        self, *args: Any, via: str | None = None, explain: bool = False, **options: Any
    ) -> None:
        queues = self._queues()
        chosen = via or _via(conf.DELIVERY)
        if explain:
            kinds = [k for k in ([chosen] if via else VIAS) if queues[k]]
            for i, kind in enumerate(kinds):
                if i:
                    self.stdout.write("")
                self._explain(kind, queues[kind])
        elif queues[chosen]:
            self.stdout.write(",".join(queues[chosen]))
        if not explain and via is None:
            other = next(k for k in VIAS if k != chosen)
            if queues[other]:
                self.stderr.write(
                    f"Not listed: the queues of the via: {other} subscriptions "
                    f"({','.join(queues[other])}), for {WORKER[other]} "
                    f"(manage.py events_queues --via {other})."
                )
        errors = [m for m in (*check_configuration(), *check_handlers()) if m.is_serious()]
        for message in errors:
            self.stderr.write(f"{message.obj}: ({message.id}) {message.msg}")
        if errors:
            raise CommandError(
                f"{len(errors)} problem(s) in the events configuration: the queues above may "
                "be incomplete and deliveries will fail (see `manage.py events_check`)."
            )
        if not queues[chosen]:
            raise CommandError(f"No subscription is delivered via {chosen}: no queue to consume.")

    def _queues(self) -> dict[str, list[str]]:
        """The queues of each kind of worker, sorted. The queue of the webhook endpoints
        registered at run time (DEFAULT_QUEUE unless set), which go by DELIVERY, is always
        there: endpoints are rows, added without a deploy (and `worker -Q ""` would fail)."""
        found: dict[str, set[str]] = {kind: set() for kind in VIAS}
        for subscription in get_registry().subscriptions.values():
            if subscription.is_queued:
                found[_via(subscription.via)].add(subscription.queue)
        found[_via(conf.DELIVERY)].add(conf.WEBHOOK_ENDPOINTS["queue"])
        return {kind: sorted(names) for kind, names in found.items()}

    def _explain(self, via: str, queues: list[str]) -> None:
        subscriptions: list[Subscription] = [
            s for s in get_registry().subscriptions.values() if s.is_queued and _via(s.via) == via
        ]
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
            if queue == conf.WEBHOOK_ENDPOINTS["queue"] and via == _via(conf.DELIVERY):
                self.stdout.write("  webhook endpoints registered at run time (the admin)")
            elif not here:
                self.stdout.write("  no async subscription (the default queue)")
        self.stdout.write(f"Start workers with: {START[via].format(','.join(queues))}")
        if any_broadcast:
            self.stdout.write(
                "Broadcasts reach only workers whose Celery app called "
                "django_events.delivery.broadcast.consume_broadcasts(app)."
            )
