"""Play the payment provider: send a signed "payment succeeded" webhook, then its retry."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test import Client
from django_events.inbound.signing import sign

from orders.models import Order

PATH = "/events/payments.payment_succeeded/"


class Command(BaseCommand):
    help = (
        "Send the webhook the payment provider sends when it captured an order's payment, "
        "signed with PAYMENTS_WEBHOOK_SECRET, and send it again as the provider's retry "
        "would. Without --url the call goes through Django in this process (no server)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--order", type=int, help="order id (default: the latest placed)")
        parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")

    def handle(self, *args: Any, order: int | None, url: str | None, **options: Any) -> None:
        placed = Order.objects.filter(status=Order.Status.PLACED).order_by("-pk")
        paid = Order.objects.filter(pk=order) if order else placed
        target = paid.first()
        if target is None:
            raise CommandError("No order to pay: run place_orders first.")
        payload = {
            "payment_id": f"pay_{uuid.uuid4().hex[:12]}",
            "order_id": target.pk,
            "amount": float(target.total),
            "currency": "EUR",
        }
        body = json.dumps(payload).encode()
        for attempt in ("webhook", "retry"):
            # Signed anew each time, as providers do; the payment_id makes the retry a no-op.
            headers = {
                "Content-Type": "application/json",
                **sign(settings.PAYMENTS_WEBHOOK_SECRET, body),
            }
            status, answer, replayed = _send(url, body, headers)
            note = " (Idempotent-Replayed: the first call's event)" if replayed else ""
            self.stdout.write(f"{attempt}: POST {PATH} -> {status} {answer}{note}")
            if status != 202:
                raise CommandError(f"The endpoint refused the {attempt}.")


def _send(url: str | None, body: bytes, headers: dict[str, str]) -> tuple[int, str, bool]:
    if url is None:
        response = Client(HTTP_HOST="localhost").post(
            PATH, data=body, content_type=headers.pop("Content-Type"), headers=headers
        )
        return (
            response.status_code,
            response.content.decode(),
            response.has_header("Idempotent-Replayed"),
        )
    request = urllib.request.Request(url.rstrip("/") + PATH, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            replayed = reply.headers.get("Idempotent-Replayed") is not None
            return reply.status, reply.read().decode(), replayed
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), False
