# Ordered deliveries: a worker's finish in one statement on PostgreSQL (issue 19, figure 16).
# The function is written for the schema of this migration: a migration that changes the
# Delivery columns it writes must create it again (tests/test_storage.py compares its writes
# with the ORM's).

from __future__ import annotations

from typing import Any

from django.db import migrations

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
        event_id, subscription, mode, status, attempts, last_error, traceback, created_at,
        updated_at, retry_at, duration_ms, response_status, response_ms, response_body,
        ordering_key, sequence
    ) VALUES (
        done.event_id, done.subscription, done.mode, done.status, done.attempts,
        done.last_error, done.traceback, done.created_at, done.updated_at, done.retry_at,
        done.duration_ms, done.response_status, done.response_ms, done.response_body,
        done.ordering_key, done.sequence
    ) ON CONFLICT (event_id, subscription) DO UPDATE SET
        mode = EXCLUDED.mode, status = EXCLUDED.status, attempts = EXCLUDED.attempts,
        last_error = EXCLUDED.last_error, traceback = EXCLUDED.traceback,
        updated_at = EXCLUDED.updated_at, retry_at = EXCLUDED.retry_at,
        duration_ms = EXCLUDED.duration_ms, response_status = EXCLUDED.response_status,
        response_ms = EXCLUDED.response_ms, response_body = EXCLUDED.response_body;
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


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "DROP FUNCTION IF EXISTS django_events_finish_ordered(bigint, varchar, jsonb, timestamptz)"
        )


class Migration(migrations.Migration):
    dependencies = [
        ("django_events", "0010_delivery_turn_index"),
    ]

    operations = [migrations.RunPython(create, drop, elidable=False)]
