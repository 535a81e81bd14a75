"""What the commands that read and write the event log share."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError


class EventLogCommand(BaseCommand):
    """A command on the event log: a database error (unreachable, tables not migrated) is a
    one-line error (exit 1), as for any `CommandError`, not a traceback."""

    def execute(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute(*args, **options)
        except DatabaseError as exc:
            alias = options.get("database") or DEFAULT_DB_ALIAS
            error = f"{type(exc).__name__}: {exc}".strip()
            raise CommandError(f"The database {alias!r} failed: {error}") from exc
