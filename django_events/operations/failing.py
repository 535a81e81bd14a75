"""Recording deliveries failed that an operation gives up on, with `delivery_failed`.

Retries, resumes, the relay and a deleted endpoint each end some deliveries without running
them (the broker refused them, nothing can run them any more). DESIGN 3.18: the signal is
sent once when a delivery ends failed, so here too, for each row that was not failed already.
"""

from __future__ import annotations

from functools import partial

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from django_events.delivery.dispatch import failed_signal
from django_events.delivery.recording import event_of
from django_events.models import Delivery


def record_failed(rows: QuerySet[Delivery], error: str, *, keep_error: bool = False) -> int:
    """Record ``rows`` failed with ``error`` (``keep_error``: not over an earlier error) and
    send `delivery_failed` for each that was not failed before; how many were recorded."""
    newly = list(rows.exclude(status=Delivery.Status.FAILED).select_related("event"))
    failed = {"status": Delivery.Status.FAILED, "retry_at": None, "updated_at": timezone.now()}
    if keep_error:  # two disjoint updates: ``rows`` may select by status, which this changes
        count = rows.exclude(last_error="").update(**failed)
        count += rows.filter(last_error="").update(**failed, last_error=error)
    else:
        count = rows.update(**failed, last_error=error)
    for row in newly:
        row.status = Delivery.Status.FAILED
        row.last_error = row.last_error if keep_error and row.last_error else error
        # Once it commits (at once outside a transaction): a receiver reads the failure.
        transaction.on_commit(partial(failed_signal, event_of(row.event), row), using=rows.db)
    return count
