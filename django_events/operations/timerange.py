"""Parsing the ``--since``/``--until`` arguments of the operator commands."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

EXAMPLES = "an ISO date or datetime (2026-05-01, 2026-05-01T12:00) or an age (30m, 2h, 3d, 1w)"
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_moment(text: str, *, now: datetime | None = None) -> datetime:
    """An aware datetime from an ISO date or datetime, or an age such as ``3d`` ago."""
    value = text.strip()
    if value[:-1].isdigit() and value[-1:] in UNITS:
        try:
            return (now or timezone.now()) - timedelta(**{UNITS[value[-1]]: int(value[:-1])})
        except OverflowError as exc:
            raise ValueError(f"{text!r} reaches back before the year 1") from exc
    try:
        moment = parse_datetime(value)
        day = parse_date(value) if moment is None else None
    except ValueError as exc:  # well formed but impossible, such as 2026-13-01
        raise ValueError(f"{text!r} is not a valid date: {exc}") from exc
    if moment is None and day is not None:
        moment = datetime(day.year, day.month, day.day)
    if moment is None:
        raise ValueError(f"{text!r} is not {EXAMPLES}")
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


def parse_range(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """Parse ``--since``/``--until`` (either may be missing); ``ValueError`` names the flag."""
    moments: list[datetime | None] = []
    for flag, text in (("--since", since), ("--until", until)):
        try:
            moments.append(parse_moment(text) if text else None)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from exc
    start, end = moments
    if start and end and start >= end:
        raise ValueError(
            f"--since ({start.isoformat()}) must be before --until ({end.isoformat()})"
        )
    return start, end
