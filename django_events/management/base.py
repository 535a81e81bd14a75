"""What the commands that read and write the event log share."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from django_events.delivery.recording import event_log_alias, event_log_read_alias


class EventLogCommand(BaseCommand):
    """A command on the event log: a database error (unreachable, tables not migrated) is a
    one-line error (exit 1), as for any `CommandError`, not a traceback.

    Without ``--database`` it works on the database the routers give the event log, as
    `publish()` and the admin do: the one they write it to, or, for a command that only
    lists (``reads_only``), the one they read it from.
    """

    #: Only reads the event log: without ``--database``, where the routers read it.
    reads_only = False

    def execute(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute(*args, **options)
        except DatabaseError as exc:
            alias = self.database(options)
            error = f"{type(exc).__name__}: {exc}".strip()
            raise CommandError(
                f"The database {alias!r} failed"
                f"{routed_elsewhere(alias, read=self.reads_only)}: {error}"
            ) from exc

    def database(self, options: dict[str, Any]) -> str:
        """The alias ``--database`` names, else the one the routers give the event log."""
        given: str | None = options.get("database")
        return given or routed_alias(read=self.reads_only)


def add_database_argument(parser: CommandParser) -> None:
    """Add ``--database``: an alias of ``DATABASES``, None by default (`routed_alias`)."""
    parser.add_argument(
        "--database",
        default=None,
        choices=tuple(connections),
        help="Database alias holding the event log (default: the one DATABASE_ROUTERS give "
        "django_events, default without routers).",
    )


def routed_alias(*, read: bool = False) -> str:
    """The alias the routers write the event log to (``read``: read it from); ``default``
    without routers, as for any model."""
    return event_log_read_alias() if read else event_log_alias()


def routed_elsewhere(alias: str, *, read: bool = False) -> str:
    """A note naming the alias the routers give the event log (``read``: read it from), when
    it is not ``alias`` (a ``--database`` given); else ``""``."""
    routed = routed_alias(read=read)
    if routed == alias:
        return ""
    verb = f"read the event log from {routed!r}" if read else f"write the event log to {routed!r}"
    return f" (the routers {verb}: pass --database {routed})"
