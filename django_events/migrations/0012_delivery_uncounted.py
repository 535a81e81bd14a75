# A delivery's uncounted runs (RetryLater(counts=False)) kept on its row, so that a delivery
# sent again from its row (a resume, the relay, a retry) goes on counting as its messages did.
# The ordered finish function (0011) writes the new column too; COALESCE: the outcome of a
# worker of the release before this one has no "uncounted" (a new row gets 0, an existing
# one keeps its count, as that worker's plain upsert leaves it).

from __future__ import annotations

from importlib import import_module
from typing import Any

from django.db import migrations, models

FINISH_ORDERED = """
CREATE OR REPLACE FUNCTION django_events_finish_ordered(
    p_lock bigint, p_key varchar, p_outcome jsonb, p_due timestamptz
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    done django_events_delivery := jsonb_populate_record(NULL::django_events_delivery, p_outcome);
    handed bigint;
BEGIN
    -- The key's turn, as a worker holding a delivery takes it: the hand-on below, a statement
    -- of its own, sees every hold committed before the lock was granted.
    PERFORM pg_advisory_xact_lock(p_lock);
    INSERT INTO django_events_delivery (
        event_id, subscription, mode, status, attempts, uncounted, last_error, traceback,
        created_at, updated_at, retry_at, duration_ms, response_status, response_ms,
        response_body, ordering_key, sequence
    ) VALUES (
        done.event_id, done.subscription, done.mode, done.status, done.attempts,
        COALESCE(done.uncounted, 0), done.last_error, done.traceback, done.created_at,
        done.updated_at, done.retry_at, done.duration_ms, done.response_status,
        done.response_ms, done.response_body, done.ordering_key, done.sequence
    ) ON CONFLICT (event_id, subscription) DO UPDATE SET
        mode = EXCLUDED.mode, status = EXCLUDED.status, attempts = EXCLUDED.attempts,
        uncounted = COALESCE(done.uncounted, django_events_delivery.uncounted),
        last_error = EXCLUDED.last_error,
        traceback = EXCLUDED.traceback, updated_at = EXCLUDED.updated_at,
        retry_at = EXCLUDED.retry_at, duration_ms = EXCLUDED.duration_ms,
        response_status = EXCLUDED.response_status, response_ms = EXCLUDED.response_ms,
        response_body = EXCLUDED.response_body;
    -- The hand-on: the key's first unfinished delivery, if it is held, made pending (due for
    -- the relay in case its message is never sent).
    UPDATE django_events_delivery d SET status = 'pending', retry_at = p_due,
        updated_at = done.updated_at
    WHERE d.id = (
        SELECT u.id FROM django_events_delivery u
        WHERE u.subscription = done.subscription AND u.ordering_key = p_key
            AND u.sequence IS NOT NULL AND NOT (u.status IN ('succeeded', 'resolved'))
        ORDER BY u.sequence LIMIT 1
    ) AND d.status = 'held'
    RETURNING d.id INTO handed;
    RETURN handed;
END
$$
"""


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FINISH_ORDERED)


def restore(apps: Any, schema_editor: Any) -> None:
    """Back to 0011's function, which does not know the column."""
    import_module("django_events.migrations.0011_finish_ordered_function").create(
        apps, schema_editor
    )


class Migration(migrations.Migration):
    dependencies = [
        ("django_events", "0011_finish_ordered_function"),
    ]

    operations = [
        migrations.AddField(
            model_name="delivery",
            name="uncounted",
            field=models.PositiveIntegerField(
                db_default=0,
                default=0,
                help_text=(
                    "Of the attempts, the runs not counted towards max_attempts: those that raised "
                    "RetryLater(counts=False), and those before a replay."
                ),
                verbose_name="uncounted runs",
            ),
        ),
        migrations.RunPython(create, restore, elidable=False),
    ]
