"""Wait until a place_orders run has been fully handled, then show what happened."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_events.models import Delivery, EventRecord
from django_events.wiring.registry import get_registry

from billing.models import Invoice
from notifications.models import Notification
from orders.models import Order


def expected_subscriptions(record: EventRecord) -> set[str]:
    """What the wiring in events.yaml must deliver for one event: this is what we verify."""
    if record.name == "orders.order_placed":
        expected = {"billing.create_invoice", "notifications.order_activity"}
        if record.payload["total"] >= 1000:
            expected.add("notifications.big_order_alert")
        return expected
    if record.name == "orders.order_cancelled":
        return {"billing.void_invoice", "notifications.order_activity"}
    return set()


@dataclass
class Progress:
    """Where a run stands: what is still awaited, and what went wrong for good."""

    waiting: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.failed


def check_run(run: str) -> Progress:
    """Compare the run's events, deliveries, invoices and notifications with expectations."""
    progress = Progress()
    records = list(
        EventRecord.objects.filter(headers__run=run)
        .order_by("occurred_at")
        .prefetch_related("deliveries")
    )
    if not records:
        progress.failed.append(f"no event carries the header run={run}")
    for record in records:
        label = f"{record.name} {str(record.id)[:8]}"
        if record.status != EventRecord.Status.DISPATCHED:
            progress.waiting.append(f"{label}: event is {record.status}, not yet dispatched")
        deliveries = {d.subscription: d for d in record.deliveries.all()}
        expected = expected_subscriptions(record)
        for name in sorted(expected):
            found = deliveries.get(name)
            if found is None:
                progress.waiting.append(f"{label}: no delivery to {name} yet")
            elif found.status == Delivery.Status.FAILED:
                progress.failed.append(f"{label}: {name} failed: {found.last_error}")
            elif found.status != Delivery.Status.SUCCEEDED:
                progress.waiting.append(f"{label}: {name} is {found.status}")
        for name in sorted(set(deliveries) - expected):
            progress.failed.append(f"{label}: unexpected delivery to {name}")
        progress.waiting.extend(f"{label}: {problem}" for problem in effects_missing(record))
    return progress


def effects_missing(record: EventRecord) -> list[str]:
    """What the handlers should have written for this event and have not (yet)."""
    order_id = record.payload["order_id"]
    invoice = Invoice.objects.filter(order_id=order_id).first()
    kinds = set(Notification.objects.filter(event_id=record.id).values_list("kind", flat=True))
    missing = []
    if Notification.Kind.ACTIVITY not in kinds:
        missing.append("no activity notification")
    if record.name == "orders.order_placed":
        if invoice is None:
            missing.append(f"no invoice for order #{order_id}")
        if record.payload["total"] >= 1000 and Notification.Kind.BIG_ORDER not in kinds:
            missing.append(f"no big-order alert for order #{order_id}")
    elif record.name == "orders.order_cancelled" and (
        invoice is None or invoice.status != Invoice.Status.VOID
    ):
        missing.append(f"invoice of order #{order_id} not void")
    return missing


def latest_run() -> str:
    """The run id of the newest event that has one."""
    record = EventRecord.objects.filter(headers__has_key="run").order_by("-occurred_at").first()
    if record is None:
        raise CommandError("No run found: run `python manage.py place_orders` first.")
    return str(record.headers["run"])


def redacted(record: EventRecord) -> str:
    """The payload as JSON, with the keys the event declares in ``redact`` masked."""
    compiled = get_registry().events.get(record.name)
    hidden = set(compiled.declaration.redact) if compiled else set()
    payload = {key: "***" if key in hidden else value for key, value in record.payload.items()}
    return json.dumps(payload, sort_keys=True)


class Command(BaseCommand):
    help = (
        "Wait until every event of a place_orders run has been delivered and handled, then "
        "print orders, invoices, notifications and the event log. Exit 1 if something failed "
        "or did not arrive in time."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--run", help="run id printed by place_orders (default: latest)")
        parser.add_argument("--timeout", type=float, default=60, help="seconds to wait")
        parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls")

    def handle(self, *args: Any, **options: Any) -> None:
        run = options["run"] or latest_run()
        self.stdout.write(f"Waiting up to {options['timeout']:g}s for run {run} ...")
        started = time.monotonic()
        deadline = started + options["timeout"]
        while True:
            progress = check_run(run)
            if progress.done or progress.failed or time.monotonic() >= deadline:
                break
            time.sleep(options["interval"])
        self.show(run)
        if progress.done:
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nAll events of run {run} delivered and handled "
                    f"(waited {time.monotonic() - started:.1f}s)."
                )
            )
            return
        for problem in progress.failed + progress.waiting:
            self.stderr.write(f"  - {problem}")
        what = "failed" if progress.failed else f"not complete after {options['timeout']:g}s"
        raise CommandError(f"Run {run} {what}; see the list above and the worker's log.")

    def show(self, run: str) -> None:
        records = list(
            EventRecord.objects.filter(headers__run=run)
            .order_by("occurred_at")
            .prefetch_related("deliveries")
        )
        order_ids = sorted({r.payload["order_id"] for r in records})
        orders = Order.objects.filter(pk__in=order_ids).select_related("invoice")
        self.table(
            "Orders",
            ["order", "total", "status", "invoice", "amount", "invoice status"],
            [[f"#{o.pk}", o.total, o.status, *self.invoice_columns(o)] for o in orders],
        )
        notifications = Notification.objects.filter(order_id__in=order_ids)
        self.table(
            "Notifications",
            ["id", "kind", "order", "recipient", "message"],
            [
                [n.pk, n.kind, f"#{n.order_id}", n.recipient or "-", n.message]
                for n in notifications
            ],
        )
        self.table(
            "Event log (django_events.EventRecord)",
            ["event", "name", "status", "payload"],
            [[str(r.id)[:8], r.name, r.status, redacted(r)] for r in records],
        )
        self.table(
            "Deliveries (django_events.Delivery)",
            ["event", "subscription", "mode", "status", "attempts", "last error"],
            [
                [
                    str(r.id)[:8],
                    d.subscription,
                    d.mode,
                    d.status,
                    d.attempts,
                    " ".join(d.last_error.split())[:60] or "-",
                ]
                for r in records
                for d in sorted(r.deliveries.all(), key=lambda d: d.subscription)
            ],
        )

    @staticmethod
    def invoice_columns(order: Order) -> list[Any]:
        try:
            invoice = order.invoice
        except Invoice.DoesNotExist:
            return ["-", "-", "-"]
        return [invoice.number, invoice.amount, invoice.status]

    def table(self, title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Print rows under a title as an aligned plain-text table."""
        cells = [[str(value) for value in row] for row in [headers, *rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        self.stdout.write(f"\n{title}")
        for number, row in enumerate(cells):
            self.stdout.write(
                "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            )
            if number == 0:
                self.stdout.write("  " + "  ".join("-" * w for w in widths))
        if len(cells) == 1:
            self.stdout.write("  (none)")
