from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from django_events.conf import conf
from django_events.registry import get_registry


class Command(BaseCommand):
    help = "Print the queues a Celery worker must consume, comma-separated (for worker -Q)."

    def handle(self, *args: Any, **options: Any) -> None:
        # Never empty: `worker -Q ""` would fail, and the default queue is where async goes.
        self.stdout.write(",".join(get_registry().queues() or [conf.DEFAULT_QUEUE]))
