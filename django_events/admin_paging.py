"""Changelist counts that stay cheap on a table of millions of events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
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
