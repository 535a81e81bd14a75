"""Whether the databases a worker writes to have every migration of django_events applied.

A worker of a new release started before ``manage.py migrate`` writes columns that do not
exist yet: its outcomes wait (`worker._is_outage`) until migrate runs. It says so at start.
"""

from __future__ import annotations

from django.db import DatabaseError, connections, router
from django.db.migrations.loader import MigrationLoader

from django_events.models import Delivery

APP = "django_events"


def unapplied_migrations() -> dict[str, list[str]]:
    """Database alias -> django_events migrations on disk not applied there, for each
    database the router lets hold the event log (raises ``DatabaseError``)."""
    missing: dict[str, list[str]] = {}
    for alias in connections:
        if not router.allow_migrate_model(alias, Delivery):
            continue
        loader = MigrationLoader(connections[alias])  # reads django_migrations
        on_disk = {name for app, name in loader.disk_migrations if app == APP}
        applied = {name for app, name in loader.applied_migrations if app == APP}
        if on_disk - applied:
            missing[alias] = sorted(on_disk - applied)
    return missing


def unapplied_problems() -> list[str]:
    """`unapplied_migrations` as the lines a worker logs at start (none when all applied)."""
    try:
        missing = unapplied_migrations()
    except DatabaseError as exc:  # the database is down: the worker waits for it anyway
        return [f"Could not check django_events' migrations: {exc}"]
    return [
        f"Database {alias!r} lacks django_events migration(s) {', '.join(names)}: run "
        "manage.py migrate. Until then this worker cannot record outcomes: each waits, "
        "unacknowledged, for the migration"
        for alias, names in missing.items()
    ]
