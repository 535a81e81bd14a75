"""What the commands that read and write the event log share."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, router

from django_events.models import EventRecord


class EventLogCommand(BaseCommand):
    """A command on the event log: a database error (unreachable, tables not migrated) is a
    one-line error (exit 1), as for any `CommandError`, not a traceback."""

    def execute(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute(*args, **options)
        except DatabaseError as exc:
            alias = options.get("database") or DEFAULT_DB_ALIAS
            error = f"{type(exc).__name__}: {exc}".strip()
            raise CommandError(
                f"The database {alias!r} failed{routed_elsewhere(alias)}: {error}"
            ) from exc


def routed_elsewhere(alias: str) -> str:
    """A note naming the alias the routers write the event log to, when it is not ``alias``
    (the commands read ``--database``, ``default`` unless given); else ``""``."""
    routed = router.db_for_write(EventRecord)
    if routed == alias:
        return ""
    return f" (the routers write the event log to {routed!r}: pass --database {routed})"
