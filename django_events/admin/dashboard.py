"""The dashboard's figures: per subscription over the last hour, day and week, and the outbox.

One grouped query over the week's `Delivery` rows (an index range scan), one over the pending
outbox (its partial index): cheap on an event log of millions of rows. Handler times come as
a histogram of fixed buckets counted in SQL (every database can), so p50 and p95 are given as
the bucket's upper bound ("at most 20 ms").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from django.db.models import Case, Count, F, IntegerField, Min, Q, Sum, Value, When
from django.utils import timezone

from django_events.delivery.recording import event_log_read_alias
from django_events.models import Delivery, EventRecord

WINDOWS: tuple[tuple[str, timedelta], ...] = (
    ("hour", timedelta(hours=1)),
    ("day", timedelta(days=1)),
    ("week", timedelta(weeks=1)),
)
# Upper bounds (ms) of the handler-time buckets; a last bucket holds the slower runs.
BOUNDS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000,
)  # fmt: skip
UNMEASURED = -1


@dataclass
class WindowStats:
    """One subscription over one window."""

    deliveries: int = 0
    failed: int = 0
    retries: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_MS) + 1))

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.deliveries if self.deliveries else None

    @property
    def p50(self) -> float | None:
        return percentile(self.histogram, 0.50)

    @property
    def p95(self) -> float | None:
        return percentile(self.histogram, 0.95)

    @property
    def measured(self) -> int:
        return sum(self.histogram)


@dataclass
class SubscriptionStats:
    name: str
    windows: dict[str, WindowStats]


@dataclass
class Dashboard:
    now: datetime
    subscriptions: list[SubscriptionStats]
    pending: int
    oldest_pending: datetime | None

    @property
    def oldest_pending_age(self) -> timedelta | None:
        return None if self.oldest_pending is None else self.now - self.oldest_pending


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile ``q``; ``inf`` past the last."""
    total = sum(histogram)
    if not total:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(histogram):
        seen += count
        if count and seen >= rank:
            return BOUNDS_MS[index] if index < len(BOUNDS_MS) else float("inf")
    return float("inf")  # not reached: seen ends at total >= rank


def collect(now: datetime | None = None, *, using: str | None = None) -> Dashboard:
    """Read the dashboard's figures (by default where the routers read the event log)."""
    using = event_log_read_alias(using)
    now = now or timezone.now()
    starts = {name: now - span for name, span in WINDOWS}
    bucket = Case(
        When(duration_ms__isnull=True, then=Value(UNMEASURED)),
        *(When(duration_ms__lt=bound, then=Value(i)) for i, bound in enumerate(BOUNDS_MS)),
        default=Value(len(BOUNDS_MS)),
        output_field=IntegerField(),
    )
    retries = Case(When(attempts__gt=1, then=F("attempts") - 1), default=Value(0))
    aggregates: dict[str, Count | Sum] = {}
    for name, start in starts.items():
        within = Q(updated_at__gte=start)
        aggregates[f"n_{name}"] = Count("pk", filter=within)
        aggregates[f"f_{name}"] = Count("pk", filter=within & Q(status=Delivery.Status.FAILED))
        aggregates[f"r_{name}"] = Sum(retries, filter=within)
    oldest = min(starts.values())
    rows = (
        Delivery.objects.using(using)
        # Every status, spelled out: PostgreSQL then reads the (status, -updated_at) index,
        # one range per status, instead of the whole table.
        .filter(status__in=Delivery.Status.values, updated_at__gte=oldest)
        .annotate(bucket=bucket)
        .values("subscription", "bucket")
        .annotate(**aggregates)
        .order_by()
    )
    stats: dict[str, dict[str, WindowStats]] = {}
    for row in cast(Iterable[dict[str, Any]], rows):  # keys built above: not a TypedDict's
        windows = stats.setdefault(row["subscription"], {n: WindowStats() for n, _ in WINDOWS})
        for name, window in windows.items():
            count = row[f"n_{name}"]
            window.deliveries += count
            window.failed += row[f"f_{name}"]
            window.retries += row[f"r_{name}"] or 0
            if row["bucket"] != UNMEASURED:
                window.histogram[row["bucket"]] += count
    outbox = (
        EventRecord.objects.using(using)
        .filter(status=EventRecord.Status.PENDING)
        .aggregate(n=Count("pk"), oldest=Min("occurred_at"))
    )
    return Dashboard(
        now=now,
        subscriptions=[SubscriptionStats(n, stats[n]) for n in sorted(stats)],
        pending=outbox["n"],
        oldest_pending=outbox["oldest"],
    )
