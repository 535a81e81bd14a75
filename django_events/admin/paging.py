"""Changelist counts and date drill-downs that stay cheap on a table of millions of events."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Max, Min, QuerySet
from django.utils import timezone
from django.utils.functional import cached_property

# Below this many rows an exact count is cheap; above, PostgreSQL's estimate is used.
EXACT_BELOW = 100_000
# A filtered count stops here: the page says "10000+" instead of scanning every match.
COUNT_CAP = 10_000

if TYPE_CHECKING:
    PaginatorBase = Paginator[Any]
else:
    PaginatorBase = Paginator


class Approximate(int):
    """A count shown as ``~N`` (PostgreSQL's estimate of an unfiltered table)."""

    def __str__(self) -> str:
        return f"~{int(self)}"


class AtLeast(int):
    """A count shown as ``N+`` (counting stopped at the cap)."""

    def __str__(self) -> str:
        return f"{int(self)}+"


class CheapCountPaginator(PaginatorBase):
    """Estimate unfiltered counts on PostgreSQL; cap filtered counts at ``COUNT_CAP``."""

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return super().count
        if not queryset.query.where:
            estimate = estimated_rows(queryset)
            if estimate is not None and estimate >= EXACT_BELOW:
                return Approximate(estimate)
        capped = queryset.order_by()[: COUNT_CAP + 1].count()
        return AtLeast(COUNT_CAP) if capped > COUNT_CAP else capped


def estimated_rows(queryset: QuerySet[Any]) -> int | None:
    """The planner's row estimate of the queryset's table (PostgreSQL), else None."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [queryset.model._meta.db_table],
        )
        row = cursor.fetchone()
    # -1: never analysed (PostgreSQL 14+); 0 may be stale too. Count those for real.
    return int(row[0]) if row and row[0] > 0 else None


class PeriodQuerySet(QuerySet[Any]):
    """``datetimes()`` lists every year, month or day between the first and the last row.

    The admin's date hierarchy asks for the distinct dates of the filtered rows, which scans
    all of them; here two index lookups (min and max) give the range. A period without any
    row can show up as a link to an empty page.
    """

    def datetimes(  # type: ignore[override]
        self,
        field_name: str,
        kind: str,
        order: str = "ASC",
        tzinfo: tzinfo | None = None,
        **kwargs: Any,
    ) -> list[datetime]:
        if kind not in ("year", "month", "day"):
            return list(super().datetimes(field_name, kind, order, tzinfo, **kwargs))  # type: ignore[arg-type]
        bounds = self.aggregate(first=Min(field_name), last=Max(field_name))
        if bounds["first"] is None:
            return []
        zone = tzinfo or timezone.get_current_timezone()
        first = timezone.localtime(bounds["first"], zone)
        last = timezone.localtime(bounds["last"], zone)
        periods = []
        current = _start_of(first, kind)
        while current <= last:
            periods.append(current)
            current = _next(current, kind)
        return periods[::-1] if order == "DESC" else periods


def _start_of(moment: datetime, kind: str) -> datetime:
    month = 1 if kind == "year" else moment.month
    day = moment.day if kind == "day" else 1
    return datetime(moment.year, month, day, tzinfo=moment.tzinfo)


def _next(moment: datetime, kind: str) -> datetime:
    if kind == "year":
        return moment.replace(year=moment.year + 1)
    if kind == "month":
        if moment.month == 12:
            return moment.replace(year=moment.year + 1, month=1)
        return moment.replace(month=moment.month + 1)
    return _start_of(moment + timedelta(days=1), "day")


def with_cheap_periods(queryset: QuerySet[Any]) -> PeriodQuerySet:
    """The same queryset (filters, prefetches), with the cheap ``datetimes()``."""
    clone = queryset.all()
    clone.__class__ = PeriodQuerySet
    return clone  # type: ignore[return-value]
