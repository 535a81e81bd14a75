"""The statements written by hand, all of them: PostgreSQL's, where they buy a figure.

Every other backend (and every other statement) goes through the ORM. These are on the
hot paths (a publish, a delivery, an ordered delivery's turn) and cost a fraction of the
ORM's client CPU there (figures 2-4 and 16, docs/performance-log.md): the rows of a batch
travel as one JSON parameter that ``jsonb_to_recordset`` unpacks, and the ids of an update
as one ``uuid[]`` literal, because psycopg adapts a JSON string or an array literal in C and
other parameters one by one in Python; a single row (the ``publish()`` of one event) as
plain ``VALUES``, which PostgreSQL plans and runs in well under half the time. They go
through Django's cursor, so query logging and ``execute_wrapper`` hooks see them.
tests/test_storage.py checks that each writes exactly the rows the ORM would, and reads what
the ORM reads. Two are functions: an ordered delivery's finish (migration 0011, created again
by 0012), one statement instead of a transaction of five, and its turn (0013), planned once
a session.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import DatabaseError
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

from django_events.events import Event
from django_events.models import Delivery, EventRecord, OrderingGate

# The columns a new record is written with (the others take their NULL).
RECORD_FIELDS = (
    "id",
    "name",
    "payload",
    "version",
    "headers",
    "occurred_at",
    "correlation_id",
    "causation_id",
    "status",
)
# What a delivery's outcome replaces on an existing (event, subscription) row; retry_at too:
# a new outcome replaces a retry the relay was to send.
OUTCOME_FIELDS = (
    "mode",
    "status",
    "attempts",
    "uncounted",
    "last_error",
    "traceback",
    "updated_at",
    "retry_at",
    "duration_ms",
    "response_status",
    "response_ms",
    "response_body",
)
# What every batched success says: a first attempt that succeeded. Literals of the statement,
# they take no parameter.
SUCCESS_LITERALS: tuple[tuple[str, str | int], ...] = (
    ("status", Delivery.Status.SUCCEEDED.value),
    ("attempts", 1),
    ("uncounted", 0),
    ("last_error", ""),
    ("traceback", ""),
)


def answer_fields(answer: tuple[int | None, int, str] | None) -> dict[str, Any]:
    """The `Delivery` fields of a batched success that differ between an async delivery
    (``answer`` None) and a webhook (its answer: status, milliseconds, body start)."""
    if answer is None:
        return {"mode": "async", "response_body": ""}
    status, milliseconds, body = answer
    return {
        "mode": "webhook",
        "response_status": status,
        "response_ms": milliseconds,
        "response_body": body,
    }


def insert_records(connection: BaseDatabaseWrapper, records: Sequence[tuple[Event, str]]) -> None:
    """``INSERT`` the `EventRecord` of each (event, status), in one statement.

    Several as one JSON document that ``jsonb_to_recordset`` unpacks (psycopg adapts one
    parameter, not nine a row); one, the ``publish()`` of figure 2, as plain ``VALUES``,
    which PostgreSQL runs in a third of the time (docs/performance-log.md, "Figure 2: one
    record's `INSERT` as plain `VALUES`").
    """
    rows = [
        {
            "id": str(event.id),
            "name": event.name,
            "payload": event.data,
            "version": event.version,
            "headers": event.headers,
            "occurred_at": event.occurred_at.isoformat(),
            "correlation_id": str(event.correlation_id),
            "causation_id": None if event.causation_id is None else str(event.causation_id),
            "status": status,
        }
        for event, status in records
    ]
    with connection.cursor() as cursor:
        if len(rows) == 1:
            (row,) = rows
            values: list[Any] = [
                json.dumps(row[name]) if name in ("payload", "headers") else row[name]
                for name in RECORD_FIELDS
            ]
            cursor.execute(_record_sql(connection), values)
        else:
            cursor.execute(_records_sql(connection), [json.dumps(rows)])


def mark_dispatched(
    connection: BaseDatabaseWrapper, ids: Sequence[UUID], dispatched_at: datetime
) -> None:
    """``UPDATE`` the records of ``ids`` to dispatched (the SQL `QuerySet.update` writes)."""
    with connection.cursor() as cursor:
        cursor.execute(
            _dispatched_sql(connection),
            [
                EventRecord.Status.DISPATCHED.value,
                dispatched_at,
                "{" + ",".join(str(i) for i in ids) + "}",
            ],
        )


def share_record(connection: BaseDatabaseWrapper, event_id: UUID) -> bool:
    """Lock the record of ``event_id`` ``FOR KEY SHARE`` till the transaction ends; whether it
    is there.

    What a foreign key check takes, now rather than at the commit its constraint is deferred
    to: a ``DELETE`` (events_prune's ``FOR UPDATE`` first) waits for this transaction, while
    other deliveries of the event and the ``UPDATE`` that marks it dispatched do not. The ORM
    has no such lock.
    """
    with connection.cursor() as cursor:
        cursor.execute(_once("share", lambda: _build_share_sql(connection)), [event_id])
        return cursor.fetchone() is not None


def upsert_delivery(connection: BaseDatabaseWrapper, row: Delivery) -> None:
    """``INSERT`` one `Delivery`, or replace the outcome of its (event, subscription) row.

    The SQL ``bulk_create(update_conflicts=True)`` writes, without its transaction: BEGIN and
    COMMIT are round trips of their own, on the worker's path for every delivery.
    """
    fields = _delivery_fields()
    values = [f.get_db_prep_save(f.pre_save(row, add=True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(_upsert_sql(connection), values)


def turn(
    connection: BaseDatabaseWrapper,
    event_id: UUID,
    subscription: str,
    finished: Sequence[str],
    run_lock: int | None = None,
) -> tuple[str | None, int | None, str, bool, bool | None] | None:
    """An ordered delivery's key, number and status, and whether an unfinished delivery of
    its key comes before it (statuses other than ``finished``): what a worker reads for its
    turn, in the SQL the ORM writes for it (`ordering.claim`). Then, if it is numbered,
    unfinished and nothing before it is, whether it took the session-level advisory lock
    ``run_lock`` (``pg_try_advisory_lock``); None if it did not try (or no ``run_lock``)."""
    with connection.cursor() as cursor:
        cursor.execute(
            _turn_sql(connection, len(finished)),
            [*finished, run_lock, *finished, event_id, subscription],
        )
        row: tuple[str | None, int | None, str, bool, bool | None] | None = cursor.fetchone()
        return row


def ordered_turn(
    connection: BaseDatabaseWrapper, event_id: UUID, subscription: str, run_lock: int | None
) -> tuple[str | None, int | None, str, bool, bool | None] | None:
    """`turn` through the function of migration 0013, which keeps its plan for the session:
    sent as text, the statement was planned for every message, which cost the server five
    times running it (figure 16). Its finished statuses are `recording.FINISHED`. Raises
    ``ProgrammingError`` (`is_missing_function`) before that migration."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT * FROM django_events_ordered_turn(%s, %s, %s::bigint)",
            [event_id, subscription, run_lock],
        )
        row: tuple[str | None, int | None, str, bool, bool | None] | None = cursor.fetchone()
        return row


def hold(
    connection: BaseDatabaseWrapper,
    event_id: UUID,
    subscription: str,
    key: str,
    number: int,
    finished: Sequence[str],
    now: datetime,
) -> bool:
    """Mark the ordered delivery of (``event_id``, ``subscription``) held if a delivery of its
    key numbered before ``number`` is unfinished (a status other than ``finished``), in one
    ``UPDATE``, the one the ORM writes for it (`ordering.claim`); whether it did."""
    with connection.cursor() as cursor:
        cursor.execute(
            _hold_sql(connection, len(finished)),
            [now, event_id, subscription, subscription, key, number, *finished],
        )
        return bool(cursor.rowcount)


def first_unfinished(
    connection: BaseDatabaseWrapper, subscription: str, key: str, finished: Sequence[str]
) -> tuple[int, str] | None:
    """The id and status of the first delivery of ``key`` (lowest number) whose status is
    not one of ``finished``, if any."""
    with connection.cursor() as cursor:
        cursor.execute(
            _first_unfinished_sql(connection, len(finished)), [subscription, key, *finished]
        )
        row: tuple[int, str] | None = cursor.fetchone()
        return row


def finish_ordered(
    connection: BaseDatabaseWrapper,
    row: Delivery,
    key: str,
    lock_id: int,
    due: datetime,
    unlock: int | None = None,
) -> int | None:
    """Record an ordered delivery's outcome ``row`` and hand its key on, in one statement:
    the key's lock, the row's upsert and `hand_on`, in the function of migration 0012 (a
    statement of its own in autocommit: its own transaction), then the release of the
    session-level advisory lock ``unlock`` (the run's), if given. The id of the delivery it
    made pending, if any; its message is the caller's to send."""
    values = {
        str(f.column): f.get_db_prep_save(f.pre_save(row, add=True), connection)
        for f in _delivery_fields()
    }
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT django_events_finish_ordered(%s, %s, %s::jsonb, %s), "
            "pg_advisory_unlock(%s::bigint)",
            [lock_id, key, json.dumps(values, default=str), due, unlock],
        )
        handed: int | None = cursor.fetchone()[0]
        return handed


def is_missing_function(error: DatabaseError) -> bool:
    """Whether ``error`` says a function does not exist (SQLSTATE 42883): a worker whose code
    is newer than the database's migrations."""
    return getattr(error.__cause__, "sqlstate", None) == "42883"


def is_unmigrated(error: DatabaseError) -> bool:
    """Whether ``error`` says a column or table does not exist (SQLSTATE 42703, 42P01): code
    newer than the database's migrations (SQLite says so with an `OperationalError`)."""
    return getattr(error.__cause__, "sqlstate", None) in ("42703", "42P01")


def hand_on(
    connection: BaseDatabaseWrapper,
    subscription: str,
    key: str,
    finished: Sequence[str],
    due: datetime,
    now: datetime,
) -> int | None:
    """Make the key's first unfinished delivery pending if it is held (due for the relay at
    ``due``), in one ``UPDATE``; the id of the row it changed, if any."""
    with connection.cursor() as cursor:
        cursor.execute(
            _hand_on_sql(connection, len(finished)),
            [Delivery.Status.PENDING.value, due, now, subscription, key, *finished],
        )
        row = cursor.fetchone()
        return None if row is None else int(row[0])


def take_numbers(
    connection: BaseDatabaseWrapper, counts: Sequence[tuple[str, str, int]]
) -> dict[tuple[str, str], int]:
    """Add each count to its (subscription, key) gate's counter, creating the gates, in one
    statement that locks them in (subscription, key) order; return each gate's new value.

    One gate (the ``publish()`` of one ordered event) as plain ``VALUES``, as
    `insert_records` writes one record."""
    with connection.cursor() as cursor:
        if len(counts) == 1:
            cursor.execute(_number_sql(connection), list(counts[0]))
        else:
            document = json.dumps([{"s": s, "k": k, "n": n} for s, k, n in counts])
            cursor.execute(_numbers_sql(connection), [document])
        return {(s, k): int(last) for s, k, last in cursor.fetchall()}


def insert_numbered(
    connection: BaseDatabaseWrapper,
    rows: Sequence[tuple[UUID, str, str, str, int]],
    created_at: datetime,
) -> None:
    """``INSERT`` the pending `Delivery` rows of ordered deliveries ((event id, subscription,
    mode, key, number) each), in one statement; one row as plain ``VALUES``."""
    with connection.cursor() as cursor:
        if len(rows) == 1:
            event_id, subscription, mode, key, number = rows[0]
            named: dict[str, Any] = {
                "e": event_id,
                "s": subscription,
                "m": mode,
                "k": key,
                "n": number,
                "at": created_at,
            }
            cursor.execute(_one_numbered_sql(connection), named)
            return
        document = json.dumps(
            [{"e": str(e), "s": s, "m": m, "k": k, "n": n} for e, s, m, k, n in rows]
        )
        cursor.execute(_numbered_sql(connection), [created_at, created_at, document])


def insert_successes(
    connection: BaseDatabaseWrapper,
    rows: Sequence[tuple[UUID, str, float, tuple[int | None, int, str] | None, float | None]],
) -> None:
    """``INSERT`` first-attempt successes ((event id, subscription, unix time, a webhook's
    answer or None, the handler's milliseconds or None) each).

    ``ON CONFLICT DO NOTHING``: a row already there was written by a later run (a retry, a
    replay), and one statement may not update a row twice (a message redelivered in a batch).
    """
    document = json.dumps([_success(*row) for row in rows])
    with connection.cursor() as cursor:
        cursor.execute(_successes_sql(connection), [document])


def _success(
    event: UUID,
    name: str,
    at: float,
    answer: tuple[int | None, int, str] | None,
    took: float | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"event": str(event), "subscription": name, "at": at, "took": took}
    if answer is not None:  # a webhook's: the keys an async delivery's row goes without
        row["mode"] = "webhook"
        row["status"], row["ms"], row["body"] = answer
    return row


def _quote(connection: BaseDatabaseWrapper, name: str) -> str:
    quoted: str = connection.ops.quote_name(name)
    return quoted


def _column(model: type[Model], name: str) -> str:
    return str(model._meta.get_field(name).column)  # type: ignore[union-attr]


def _delivery_fields() -> list[Field[Any, Any]]:
    return [f for f in Delivery._meta.concrete_fields if not f.primary_key]


def _literal(value: str | int) -> str:
    """An SQL literal of a constant of ours (never user input)."""
    return str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


def _json_rows_insert_sql(
    connection: BaseDatabaseWrapper,
    model: type[Model],
    values: Mapping[str, str],
    keys: Mapping[str, str],
    suffix: str = "",
) -> str:
    """``INSERT`` the rows of one JSON parameter (an array of objects).

    ``keys`` maps each object key to its SQL type; ``values`` maps each field name written to
    its SQL expression over ``rows`` (the unpacked objects).
    """
    quote = connection.ops.quote_name
    columns = ", ".join(quote(_column(model, name)) for name in values)
    types = ", ".join(f"{quote(key)} {sql_type}" for key, sql_type in keys.items())
    return (
        f"INSERT INTO {quote(model._meta.db_table)} ({columns}) "
        f"SELECT {', '.join(values.values())} FROM jsonb_to_recordset(%s::jsonb) AS rows({types})"
        + (f" {suffix}" if suffix else "")
    )


# Each statement is built once a process (the same text every time: psycopg parses it once).
_built: dict[str, str] = {}


def _once(name: str, build: Callable[[], str]) -> str:
    sql = _built.get(name)
    if sql is None:
        sql = _built[name] = build()
    return sql


def _records_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("records", lambda: _build_records_sql(connection))


def _record_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("record", lambda: _build_record_sql(connection))


def _dispatched_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("dispatched", lambda: _build_dispatched_sql(connection))


def _upsert_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("upsert", lambda: _build_upsert_sql(connection))


def _numbers_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("numbers", lambda: _build_numbers_sql(connection))


def _number_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("number", lambda: _build_number_sql(connection))


def _numbered_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("numbered", lambda: _build_numbered_sql(connection))


def _one_numbered_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("one numbered", lambda: _build_one_numbered_sql(connection))


def _successes_sql(connection: BaseDatabaseWrapper) -> str:
    return _once("successes", lambda: _build_successes_sql(connection))


def _turn_sql(connection: BaseDatabaseWrapper, statuses: int) -> str:
    return _once(f"turn:{statuses}", lambda: _build_turn_sql(connection, statuses))


def _first_unfinished_sql(connection: BaseDatabaseWrapper, statuses: int) -> str:
    return _once(
        f"first_unfinished:{statuses}", lambda: _build_first_unfinished_sql(connection, statuses)
    )


def _ordering_columns(connection: BaseDatabaseWrapper) -> dict[str, str]:
    quote = connection.ops.quote_name
    names = ("id", "event", "subscription", "ordering_key", "sequence", "status")
    return {"table": quote(Delivery._meta.db_table)} | {
        name: quote(_column(Delivery, name)) for name in names
    }


def _build_turn_sql(connection: BaseDatabaseWrapper, statuses: int) -> str:
    # The status test is written as the index of unfinished deliveries' condition is, so
    # that PostgreSQL reads that index (migration 0010). OFFSET 0 keeps the row's read a
    # subquery: pulled up, its EXISTS would be evaluated twice. The lock is tried only when
    # the row runs now (CASE evaluates lazily); pg_try_advisory_lock(NULL) takes none.
    c = _ordering_columns(connection)
    finished = ", ".join(["%s"] * statuses)
    return (
        f"SELECT t.k, t.n, t.s, t.w, CASE WHEN t.n IS NOT NULL AND NOT t.w "
        f"AND NOT (t.s IN ({finished})) THEN pg_try_advisory_lock(%s::bigint) END FROM ("
        f"SELECT d.{c['ordering_key']} AS k, d.{c['sequence']} AS n, d.{c['status']} AS s, "
        f"EXISTS("
        f"SELECT 1 FROM {c['table']} u WHERE u.{c['subscription']} = d.{c['subscription']} "
        f"AND u.{c['ordering_key']} = d.{c['ordering_key']} "
        f"AND u.{c['sequence']} < d.{c['sequence']} AND NOT (u.{c['status']} IN ({finished}))) "
        f"AS w FROM {c['table']} d WHERE d.{c['event']} = %s AND d.{c['subscription']} = %s "
        f"OFFSET 0) t"
    )


def _build_first_unfinished_sql(
    connection: BaseDatabaseWrapper, statuses: int, *, with_status: bool = True
) -> str:
    c = _ordering_columns(connection)
    finished = ", ".join(["%s"] * statuses)
    columns = f"{c['id']}, {c['status']}" if with_status else c["id"]
    return (
        f"SELECT {columns} FROM {c['table']} "
        f"WHERE {c['subscription']} = %s AND {c['ordering_key']} = %s "
        f"AND {c['sequence']} IS NOT NULL AND NOT ({c['status']} IN ({finished})) "
        f"ORDER BY {c['sequence']} LIMIT 1"
    )


def _hold_sql(connection: BaseDatabaseWrapper, statuses: int) -> str:
    return _once(f"hold:{statuses}", lambda: _build_hold_sql(connection, statuses))


def _build_hold_sql(connection: BaseDatabaseWrapper, statuses: int) -> str:
    c = _ordering_columns(connection)
    quote = connection.ops.quote_name
    retry_at, updated_at = (quote(_column(Delivery, n)) for n in ("retry_at", "updated_at"))
    finished = ", ".join(["%s"] * statuses)
    return (
        f"UPDATE {c['table']} SET {c['status']} = {_literal(Delivery.Status.HELD.value)}, "
        f"{updated_at} = %s, {retry_at} = NULL "
        f"WHERE {c['event']} = %s AND {c['subscription']} = %s AND EXISTS("
        f"SELECT 1 FROM {c['table']} u WHERE u.{c['subscription']} = %s "
        f"AND u.{c['ordering_key']} = %s AND u.{c['sequence']} < %s "
        f"AND NOT (u.{c['status']} IN ({finished})))"
    )


def _hand_on_sql(connection: BaseDatabaseWrapper, statuses: int) -> str:
    return _once(f"hand_on:{statuses}", lambda: _build_hand_on_sql(connection, statuses))


def _build_hand_on_sql(connection: BaseDatabaseWrapper, statuses: int) -> str:
    c = _ordering_columns(connection)
    quote = connection.ops.quote_name
    retry_at, updated_at = (quote(_column(Delivery, n)) for n in ("retry_at", "updated_at"))
    first = _build_first_unfinished_sql(connection, statuses, with_status=False)
    return (
        f"UPDATE {c['table']} SET {c['status']} = %s, {retry_at} = %s, {updated_at} = %s "
        f"WHERE {c['id']} = ({first}) "
        f"AND {c['status']} = {_literal(Delivery.Status.HELD.value)} RETURNING {c['id']}"
    )


def _build_records_sql(connection: BaseDatabaseWrapper) -> str:
    quote = connection.ops.quote_name
    types = {
        name: str(EventRecord._meta.get_field(name).db_type(connection)) for name in RECORD_FIELDS
    }
    # jsonb_to_recordset matches a row's keys to these names: the field names.
    return _json_rows_insert_sql(
        connection, EventRecord, {name: f"rows.{quote(name)}" for name in RECORD_FIELDS}, types
    )


def _build_record_sql(connection: BaseDatabaseWrapper) -> str:
    quote = connection.ops.quote_name
    columns = ", ".join(quote(_column(EventRecord, name)) for name in RECORD_FIELDS)
    # Not cast: a text parameter goes into each column as a literal would (a name too long
    # for its column is an error, where a cast to varchar(n) would cut it).
    return (
        f"INSERT INTO {quote(EventRecord._meta.db_table)} ({columns}) "
        f"VALUES ({', '.join(['%s'] * len(RECORD_FIELDS))})"
    )


def _build_share_sql(connection: BaseDatabaseWrapper) -> str:
    quote = connection.ops.quote_name
    return (
        f"SELECT 1 FROM {quote(EventRecord._meta.db_table)} "
        f"WHERE {quote(_column(EventRecord, 'id'))} = %s FOR KEY SHARE"
    )


def _build_dispatched_sql(connection: BaseDatabaseWrapper) -> str:
    quote = connection.ops.quote_name
    return (
        f"UPDATE {quote(EventRecord._meta.db_table)} "
        f"SET {quote(_column(EventRecord, 'status'))} = %s, "
        f"{quote(_column(EventRecord, 'dispatched_at'))} = %s "
        f"WHERE {quote(_column(EventRecord, 'id'))} = ANY(%s::uuid[])"
    )


def _build_upsert_sql(connection: BaseDatabaseWrapper) -> str:
    columns = [str(f.column) for f in _delivery_fields()]
    quote = connection.ops.quote_name
    updates = ", ".join(
        f"{quote(_column(Delivery, n))} = EXCLUDED.{quote(_column(Delivery, n))}"
        for n in OUTCOME_FIELDS
    )
    unique = ", ".join(quote(_column(Delivery, n)) for n in ("event", "subscription"))
    return (
        f"INSERT INTO {quote(Delivery._meta.db_table)} ({', '.join(map(quote, columns))}) "
        f"VALUES ({', '.join(['%s'] * len(columns))}) "
        f"ON CONFLICT ({unique}) DO UPDATE SET {updates}"
    )


def _build_numbers_sql(connection: BaseDatabaseWrapper) -> str:
    types = {
        n: OrderingGate._meta.get_field(n).db_type(connection) for n in ("subscription", "key")
    }
    # The rows go in (subscription, key) order, so two publishers never wait on each other
    # in a cycle.
    return _gates_upsert_sql(
        connection,
        'SELECT rows."s", rows."k", rows."n" FROM jsonb_to_recordset(%s::jsonb) '
        f'AS rows("s" {types["subscription"]}, "k" {types["key"]}, "n" bigint) '
        'ORDER BY rows."s", rows."k"',
    )


def _build_number_sql(connection: BaseDatabaseWrapper) -> str:
    return _gates_upsert_sql(connection, "VALUES (%s, %s, %s)")


def _gates_upsert_sql(connection: BaseDatabaseWrapper, rows: str) -> str:
    """Add the counts of ``rows`` (subscription, key, count) to their gates, creating them."""
    quote = connection.ops.quote_name
    table = quote(OrderingGate._meta.db_table)
    subscription, key, last = (
        quote(_column(OrderingGate, n)) for n in ("subscription", "key", "last_sequence")
    )
    return (
        f"INSERT INTO {table} ({subscription}, {key}, {last}) {rows} "
        f"ON CONFLICT ({subscription}, {key}) DO UPDATE SET {last} = {table}.{last} + "
        f"EXCLUDED.{last} RETURNING {subscription}, {key}, {last}"
    )


def _delivery_type(connection: BaseDatabaseWrapper, name: str) -> str:
    """The SQL type of a `Delivery` field."""
    return str(Delivery._meta.get_field(name).db_type(connection))


def _numbered_values(given: Callable[[str], str], created: str) -> dict[str, str]:
    """The SQL of each column of an ordered delivery's pending row: ``given(key)`` for the
    values of each row (e: event, s: subscription, m: mode, k: key, n: number), ``created``
    for its creation time, constants for the rest."""
    return {
        "event": given("e"),
        "subscription": given("s"),
        "mode": given("m"),
        "status": _literal(Delivery.Status.PENDING.value),
        "attempts": "0",
        "last_error": "''",
        "traceback": "''",
        "response_body": "''",
        "created_at": created,
        "updated_at": created,
        "ordering_key": given("k"),
        "sequence": given("n"),
    }


def _build_numbered_sql(connection: BaseDatabaseWrapper) -> str:
    return _json_rows_insert_sql(
        connection,
        Delivery,
        # The creation time twice, before the document: `insert_numbered` passes it so.
        _numbered_values(lambda key: f'rows."{key}"', "%s"),
        {
            "e": "uuid",
            "s": _delivery_type(connection, "subscription"),
            "m": _delivery_type(connection, "mode"),
            "k": _delivery_type(connection, "ordering_key"),
            "n": "bigint",
        },
    )


def _build_one_numbered_sql(connection: BaseDatabaseWrapper) -> str:
    # Named parameters: the row's values bound by name, whatever the columns' order.
    values = _numbered_values(lambda key: f"%({key})s", "%(at)s")
    quote = connection.ops.quote_name
    columns = ", ".join(quote(_column(Delivery, name)) for name in values)
    return (
        f"INSERT INTO {quote(Delivery._meta.db_table)} ({columns}) "
        f"VALUES ({', '.join(values.values())})"
    )


def _build_successes_sql(connection: BaseDatabaseWrapper) -> str:
    at = 'to_timestamp(rows."at")'

    # A webhook's row has its answer (status, ms, body); an async delivery's has none of them.
    return _json_rows_insert_sql(
        connection,
        Delivery,
        {
            "event": 'rows."event"',
            "subscription": 'rows."subscription"',
            **{name: _literal(value) for name, value in SUCCESS_LITERALS},
            "mode": """COALESCE(rows."mode", 'async')""",
            "response_status": 'rows."status"',
            "response_ms": 'rows."ms"',
            "response_body": """COALESCE(rows."body", '')""",
            "duration_ms": 'rows."took"',
            "created_at": at,
            "updated_at": at,
        },
        {
            "event": "uuid",
            "subscription": _delivery_type(connection, "subscription"),
            "at": "float8",
            "took": _delivery_type(connection, "duration_ms"),
            "mode": _delivery_type(connection, "mode"),
            "status": _delivery_type(connection, "response_status"),
            "ms": _delivery_type(connection, "response_ms"),
            "body": _delivery_type(connection, "response_body"),
        },
        "ON CONFLICT DO NOTHING",
    )
