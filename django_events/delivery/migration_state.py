"""Whether the event log's database has every migration of django_events applied.

A worker of a new release started before ``manage.py migrate`` writes columns that do not
exist yet: its outcomes wait (`worker._is_outage`) until migrate runs. It says so at start.
"""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, router
from django.db.migrations.loader import MigrationLoader

from django_events.models import Delivery

APP = "django_events"


def unapplied_migrations(alias: str) -> list[str]:
    """django_events migrations on disk not applied on database ``alias`` (raises
    ``DatabaseError``)."""
    loader = MigrationLoader(connections[alias])  # reads django_migrations
    on_disk = {name for app, name in loader.disk_migrations if app == APP}
    applied = {name for app, name in loader.applied_migrations if app == APP}
    return sorted(on_disk - applied)


def lacks_migrations(alias: str) -> bool:
    """Whether ``alias`` lacks a django_events migration (False when it cannot be told)."""
    try:
        return bool(unapplied_migrations(alias))
    except DatabaseError:
        return False


def migrate_command(alias: str) -> str:
    """The command that migrates ``alias``: a plain migrate migrates `default` only."""
    return "manage.py migrate" + ("" if alias == DEFAULT_DB_ALIAS else f" --database {alias}")


def unapplied_problems() -> list[str]:
    """What a worker logs at start when the event log's database (the router's, for
    `Delivery`) lacks migrations; nothing when all are applied."""
    alias = router.db_for_write(Delivery)
    try:
        missing = unapplied_migrations(alias)
    except DatabaseError as exc:  # the database is down: the worker waits for it anyway
        return [f"Could not check django_events' migrations on database {alias!r}: {exc}"]
    if not missing:
        return []
    return [
        f"Database {alias!r} lacks django_events migration(s) {', '.join(missing)}: run "
        f"{migrate_command(alias)}. Until then this worker cannot record outcomes: each waits, "
        "unacknowledged, for the migration"
    ]
