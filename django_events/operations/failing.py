"""Recording deliveries failed that an operation gives up on, with `delivery_failed`.

Retries, resumes, the relay and a deleted endpoint each end some deliveries without running
them (the broker refused them, nothing can run them any more). DESIGN 3.18: the signal is
sent once when a delivery ends failed, so here too, for each row that was not failed already.
"""

from __future__ import annotations

from functools import partial

from django.db import connections, transaction
from django.db.models import QuerySet
from django.utils import timezone

from django_events.delivery.dispatch import failed_signal
from django_events.delivery.recording import event_of
from django_events.models import Delivery
from django_events.signals import delivery_failed


def record_failed(rows: QuerySet[Delivery], error: str, *, keep_error: bool = False) -> int:
    """Record ``rows`` failed with ``error`` (``keep_error``: not over an earlier error) and
    send `delivery_failed` for each that was not failed before, once this commits; how many
    were recorded.

    The rows are locked while they are read and written (where the database has row locks),
    so a worker's outcome lands before or after, never between: no signal for a row that did
    not fail, none missed for one that did.
    """
    using = rows.db
    features = connections[using].features
    with transaction.atomic(using=using):
        locking = rows
        if features.has_select_for_update:
            of = ("self",) if features.has_select_for_update_of else ()
            locking = rows.select_for_update(of=of)
        # The events only for a receiver: a deleted endpoint's backlog may be large.
        if delivery_failed.receivers:
            found = list(locking.select_related("event"))
        else:
            found = list(locking.only("pk"))
        failed = {"status": Delivery.Status.FAILED, "retry_at": None, "updated_at": timezone.now()}
        if keep_error:  # first those that keep theirs: ``rows`` may select by status
            rows.exclude(last_error="").update(**failed)
            rows.filter(last_error="").update(**failed, last_error=error)
        else:
            rows.update(**failed, last_error=error)
        if delivery_failed.receivers:
            for row in found:
                if row.status == Delivery.Status.FAILED:
                    continue
                row.status = Delivery.Status.FAILED
                row.last_error = row.last_error if keep_error and row.last_error else error
                # Once it commits (at once outside a transaction): a receiver reads the failure.
                signal = partial(failed_signal, event_of(row.event), row)
                transaction.on_commit(signal, using=using)
    return len(found)
