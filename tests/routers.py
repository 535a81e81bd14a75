"""Database routers of the tests (DATABASE_ROUTERS), importable by a worker subprocess too
(DJANGO_EVENTS_TEST_ROUTERS in tests/settings.py)."""

from __future__ import annotations


class EventLogElsewhere:
    """A router that keeps the event log on the "other" database."""

    def db_for_read(self, model: type, **hints: object) -> str | None:
        return "other" if model._meta.app_label == "django_events" else None  # type: ignore[attr-defined]

    db_for_write = db_for_read
