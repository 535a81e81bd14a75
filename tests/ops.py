"""Helpers of the admin and operator-command tests: their wiring, and reading sent messages."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from django.conf import settings
from django.test import override_settings

from django_events.delivery.worker import Outcome, process_message
from tests.celery_app import app

MANIFESTS = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "admin.yaml")]


def shop_wiring(queue: str | None = None, **keys: Any) -> override_settings:
    """The admin manifest, async deliveries on the in-memory broker, on a queue of its own."""
    value = {
        **settings.DJANGO_EVENTS,
        "MANIFESTS": MANIFESTS,
        "CELERY_APP": "tests.celery_app.app",
        "DEFAULT_QUEUE": queue or f"ops-{uuid.uuid4().hex[:8]}",
        **keys,
    }
    return override_settings(DJANGO_EVENTS=value)


def drain(queue: str) -> list[dict[str, Any]]:
    """Take every task message waiting on ``queue`` (in-memory broker); return their argument."""
    return [argument for argument, _headers in drain_with_headers(queue)]


def drain_with_headers(queue: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """`drain`, with each message's headers (Celery's ``retries``, ``eta``...)."""
    messages = []
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue)
        try:
            while True:
                try:
                    message = simple.get(block=False)
                except simple.Empty:
                    break
                args, _kwargs, _embed = message.decode()
                messages.append((args[0], message.headers))
                message.ack()
        finally:
            simple.close()
    return messages


def work(queue: str) -> list[Outcome]:
    """Run what is waiting on ``queue`` through the worker's own code, as a worker would."""
    return [process_message(message, retries=0) for message in drain(queue)]


class _DiesWhileSending(Celery):
    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        raise SystemExit("the process died while sending")


# A Celery app (CELERY_APP="tests.ops.dies_while_sending") whose process "dies" mid-send.
dies_while_sending = _DiesWhileSending("tests-dies", set_as_current=False)
dies_while_sending.conf.update(broker_url="memory://", accept_content=["json"])
