"""The shipped migrations match the models, whatever DEFAULT_AUTO_FIELD the project uses."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings


@pytest.mark.parametrize(
    "auto_field", ["django.db.models.AutoField", "django.db.models.BigAutoField"]
)
def test_no_missing_migrations(db: None, auto_field: str) -> None:
    out = StringIO()
    with override_settings(DEFAULT_AUTO_FIELD=auto_field):
        call_command("makemigrations", "django_events", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("function", "before"),
    [("django_events_finish_ordered", "0010"), ("django_events_ordered_turn", "0012")],
)
def test_each_function_comes_and_goes_with_its_migration(function: str, before: str) -> None:
    # The functions of migrations 0011 (an ordered delivery's finish) and 0013 (its turn),
    # PostgreSQL: unmigrating drops each, migrating creates it again.
    from django.db import connection

    def exists() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regproc(%s) IS NOT NULL", [function])
            return bool(cursor.fetchone()[0])

    assert exists()
    try:
        call_command("migrate", "django_events", before, verbosity=0)
        assert not exists()
    finally:
        call_command("migrate", "django_events", verbosity=0)
    assert exists()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_a_worker_says_at_start_which_migrations_are_missing() -> None:
    from django_events.delivery.migration_state import unapplied_problems

    assert unapplied_problems() == []
    try:
        call_command("migrate", "django_events", "0011", verbosity=0)
        [problem] = unapplied_problems()
    finally:
        call_command("migrate", "django_events", verbosity=0)
    assert problem.startswith(
        "Database 'default' lacks django_events migration(s) 0012_delivery_uncounted, "
        "0013_ordered_turn_function: run "
        "manage.py migrate."
    )


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_the_missing_migrations_name_the_database_the_routers_give_the_log() -> None:
    from django_events.delivery.migration_state import unapplied_problems
    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]):
        try:
            call_command("migrate", "django_events", "0011", database="other", verbosity=0)
            [problem] = unapplied_problems()
        finally:
            call_command("migrate", "django_events", database="other", verbosity=0)
    assert problem.startswith(
        "Database 'other' lacks django_events migration(s) 0012_delivery_uncounted, "
        "0013_ordered_turn_function: run "
        "manage.py migrate --database other."
    )


@pytest.mark.django_db
def test_a_worker_that_cannot_read_the_migrations_says_so_and_waits_for_no_migration() -> None:
    from django.db import OperationalError, connection

    from django_events.delivery.migration_state import lacks_migrations, unapplied_problems

    def refuse(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        if "django_migrations" in sql:
            raise OperationalError("the database went away")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse):
        [problem] = unapplied_problems()
        lacks = lacks_migrations("default")
    assert problem == (
        "Could not check django_events' migrations on database 'default': the database went away"
    )
    assert lacks is False  # a missing column is then refused, not waited for
