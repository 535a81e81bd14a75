# An ordered delivery's turn (`ordering.claim`, PostgreSQL) read through a function: PL/pgSQL
# keeps its statement's plan for the session, where the statement sent as text was planned
# again for every message, five times the cost of running it (docs/performance-log.md,
# "Figure 16: the PostgreSQL server's CPU counted whole"). The statuses are written out, as
# the turn index's condition is (0010), so that the plan reads that index; they are
# `recording.FINISHED` (tests/test_storage.py compares the function with the statement).

from __future__ import annotations

from typing import Any

from django.db import migrations

ORDERED_TURN = """
CREATE OR REPLACE FUNCTION django_events_ordered_turn(
    p_event uuid, p_subscription varchar, p_lock bigint
) RETURNS TABLE (turn_key varchar, turn_number bigint, turn_status varchar, waits boolean,
                 locked boolean)
LANGUAGE plpgsql AS $$
BEGIN
    -- The row's key, number and status; whether an unfinished delivery of its key comes
    -- before it; then, if it runs now, whether it took its run's lock (none without p_lock).
    RETURN QUERY SELECT t.k, t.n, t.s, t.w, CASE WHEN t.n IS NOT NULL AND NOT t.w
        AND NOT (t.s IN ('succeeded', 'resolved')) THEN pg_try_advisory_lock(p_lock) END
    FROM (
        SELECT d.ordering_key::varchar AS k, d.sequence AS n, d.status::varchar AS s,
            EXISTS(
                SELECT 1 FROM django_events_delivery u
                WHERE u.subscription = d.subscription AND u.ordering_key = d.ordering_key
                    AND u.sequence < d.sequence AND NOT (u.status IN ('succeeded', 'resolved'))
            ) AS w
        FROM django_events_delivery d
        WHERE d.event_id = p_event AND d.subscription = p_subscription
        OFFSET 0
    ) t;
END
$$
"""


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(ORDERED_TURN)


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "DROP FUNCTION IF EXISTS django_events_ordered_turn(uuid, varchar, bigint)"
        )


class Migration(migrations.Migration):
    dependencies = [
        ("django_events", "0012_delivery_uncounted"),
    ]

    operations = [migrations.RunPython(create, drop, elidable=False)]
