"""Writing delivery outcomes (and, with RECORD='failures', the record they need)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model
from django.db.models.constants import OnConflict
from django.utils import timezone

from django_events.events import Event
from django_events.models import Delivery, EventRecord
from django_events.wiring.validation import storable_text

UPSERT_FIELDS = [
    "mode",
    "status",
    "attempts",
    "last_error",
    "traceback",
    "updated_at",
    "response_status",
    "response_ms",
    "response_body",
]
UNIQUE_FIELDS = ["event", "subscription"]


def record_for(event: Event, status: str) -> EventRecord:
    """Build (without saving) the `EventRecord` of ``event``."""
    return EventRecord(
        id=event.id,
        name=event.name,
        payload=event.data,
        version=event.version,
        headers=event.headers,
        occurred_at=event.occurred_at,
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        status=status,
    )


# The columns a new record is written with (the others take their NULL).
_RECORD_FIELDS = (
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
_records_sql: dict[str, str] = {}


def insert_records(alias: str, records: Sequence[tuple[Event, str]]) -> None:
    """Insert the records of new (event, status) pairs in one statement.

    On PostgreSQL the rows travel as one JSON document that ``jsonb_to_recordset`` unpacks:
    `bulk_create` spends ~4x the client CPU on the same rows (per-field preparation, then
    psycopg encoding each column as an array literal). Through Django's cursor all the same,
    so query logging and ``execute_wrapper`` hooks see the statement.
    """
    connection = connections[alias]
    if connection.vendor != "postgresql":
        EventRecord.objects.using(alias).bulk_create([record_for(e, s) for e, s in records])
        return
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
        cursor.execute(_insert_records_sql(connection), [json.dumps(rows)])


def _insert_records_sql(connection: BaseDatabaseWrapper) -> str:
    sql = _records_sql.get(connection.vendor)
    if sql is None:
        quote = connection.ops.quote_name
        fields = [f for f in EventRecord._meta.concrete_fields if f.name in _RECORD_FIELDS]
        # jsonb_to_recordset matches a row's keys to these names: the field names above.
        sql = _records_sql[connection.vendor] = json_rows_insert_sql(
            connection,
            EventRecord,
            {f.name: f"rows.{quote(f.name)}" for f in fields},
            {f.name: str(f.db_type(connection)) for f in fields},
        )
    return sql


def json_rows_insert_sql(
    connection: BaseDatabaseWrapper,
    model: type[Model],
    values: Mapping[str, str],
    keys: Mapping[str, str],
    suffix: str = "",
) -> str:
    """PostgreSQL: ``INSERT`` the rows of one JSON parameter (an array of objects).

    ``keys`` maps each object key to its SQL type; ``values`` maps each field name written to
    its SQL expression over ``rows`` (the unpacked objects). One parameter whatever the rows:
    psycopg adapts a JSON string in C, where it adapts other values one by one in Python.
    """
    quote = connection.ops.quote_name
    column = {f.name: str(f.column) for f in model._meta.concrete_fields}
    columns = ", ".join(quote(column[name]) for name in values)
    types = ", ".join(f"{quote(key)} {sql_type}" for key, sql_type in keys.items())
    return (
        f"INSERT INTO {quote(model._meta.db_table)} ({columns}) "
        f"SELECT {', '.join(values.values())} FROM jsonb_to_recordset(%s::jsonb) AS rows({types})"
        + (f" {suffix}" if suffix else "")
    )


def event_of(record: EventRecord, payload: object = None) -> Event:
    """Rebuild the `Event` a stored record holds (``payload``: the typed form, if any)."""
    return Event(
        id=record.pk,
        name=record.name,
        payload=record.payload if payload is None else payload,
        headers=record.headers,
        occurred_at=record.occurred_at,
        correlation_id=record.correlation_id,
        causation_id=record.causation_id,
        data=record.payload,
        version=record.version,
    )


def ensure_records(alias: str, events: Sequence[Event], status: str) -> None:
    """Insert records for events that have none yet (existing ones are left alone)."""
    EventRecord.objects.using(alias).bulk_create(
        [record_for(e, status) for e in events], ignore_conflicts=True
    )


def mark_dispatched(alias: str, ids: Sequence[UUID]) -> None:
    """Mark the records of ``ids`` dispatched, now: one ``UPDATE ... WHERE id IN (...)``."""
    if not ids:
        return
    # The SQL QuerySet.filter(pk__in=ids).update(...) writes, built directly: after every
    # async publish, the ORM's query building cost more client CPU than the statement's round
    # trip (docs/performance.md, figure 2). Like QuerySet.update, no signals.
    connection = connections[alias]
    meta = EventRecord._meta
    pk, status, dispatched_at = meta.pk, meta.get_field("status"), meta.get_field("dispatched_at")
    assert pk is not None  # every concrete model has one; this narrows the type
    quote = connection.ops.quote_name
    params = [
        status.get_db_prep_save(EventRecord.Status.DISPATCHED.value, connection),
        dispatched_at.get_db_prep_save(timezone.now(), connection),
    ]
    if connection.vendor == "postgresql":
        # The ids as one array literal: psycopg adapts each UUID parameter in Python, which
        # costs twice the client CPU of the whole statement at 100 ids (figure 3).
        where = "= ANY(%s::uuid[])"
        params.append("{" + ",".join(str(i) for i in ids) + "}")
    else:
        where = f"IN ({', '.join(['%s'] * len(ids))})"
        params += [pk.get_db_prep_value(i, connection) for i in ids]
    sql = (
        f"UPDATE {quote(meta.db_table)} SET {quote(str(status.column))} = %s, "
        f"{quote(str(dispatched_at.column))} = %s WHERE {quote(str(pk.column))} {where}"
    )
    with transaction.mark_for_rollback_on_error(alias), connection.cursor() as cursor:
        cursor.execute(sql, params)


def save_deliveries(alias: str, deliveries: Sequence[Delivery]) -> None:
    """Insert or update deliveries, keyed by (event, subscription)."""
    connection = connections[alias]
    if len(deliveries) == 1 and connection.features.supports_update_conflicts_with_target:
        _upsert_one(connection, deliveries[0])
        return
    Delivery.objects.using(alias).bulk_create(
        deliveries,
        update_conflicts=True,
        unique_fields=UNIQUE_FIELDS,
        update_fields=UPSERT_FIELDS,
    )


def _upsert_one(connection: BaseDatabaseWrapper, row: Delivery) -> None:
    # The worker writes one row per delivery: one INSERT ... ON CONFLICT statement (the SQL
    # bulk_create writes, from the same backend hook) without bulk_create's transaction costs
    # ~0.4 ms on PostgreSQL against ~1 ms (BEGIN and COMMIT are round trips of their own).
    values = [f.get_db_prep_save(f.pre_save(row, add=True), connection) for f in delivery_fields()]
    with connection.cursor() as cursor:
        cursor.execute(insert_deliveries_sql(connection, 1, OnConflict.UPDATE), values)


def delivery_fields() -> list[Field[Any, Any]]:
    """The columns `insert_deliveries_sql` writes, in its order: every one but the id."""
    return [f for f in Delivery._meta.concrete_fields if not f.primary_key]


_insert_sql: dict[tuple[str, int, OnConflict, tuple[tuple[str, str | int], ...]], str] = {}


def insert_deliveries_sql(
    connection: BaseDatabaseWrapper,
    rows: int,
    on_conflict: OnConflict,
    literals: tuple[tuple[str, str | int], ...] = (),
) -> str:
    """The backend's ``INSERT`` of ``rows`` `Delivery` rows (`delivery_fields` each).

    On an existing (event, subscription) row, ``OnConflict.UPDATE`` replaces its outcome and
    ``OnConflict.IGNORE`` keeps it. ``literals`` ((field name, value) pairs) are written into
    the statement, the same for every row, and take no parameter: the parameters of a row are
    the other fields' values, in `delivery_fields` order. Built once per backend and shape: it
    is on the worker's path for every delivery.
    """
    key = (connection.vendor, rows, on_conflict, literals)
    sql = _insert_sql.get(key)
    if sql is None:
        fields = delivery_fields()
        columns = {f.name: str(f.column) for f in fields}  # concrete fields all have a column
        ops = connection.ops
        update = on_conflict is OnConflict.UPDATE
        suffix = ops.on_conflict_suffix_sql(
            fields,
            on_conflict,
            [columns[name] for name in UPSERT_FIELDS] if update else [],
            [columns[name] for name in UNIQUE_FIELDS] if update else [],
        )
        fixed = dict(literals)
        values = (sql_literal(fixed[f.name]) if f.name in fixed else "%s" for f in fields)
        row = f"({', '.join(values)})"
        sql = _insert_sql[key] = (
            f"{ops.insert_statement(on_conflict=on_conflict)} "
            f"{ops.quote_name(Delivery._meta.db_table)} "
            f"({', '.join(map(ops.quote_name, columns.values()))}) "
            f"VALUES {', '.join([row] * rows)} {suffix}"
        )
    return sql


def sql_literal(value: str | int) -> str:
    """An SQL literal of a constant of ours (never user input): every backend reads these."""
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def delivery(
    event_id: UUID,
    subscription: str,
    mode: str,
    status: str,
    attempts: int,
    error: str = "",
    traceback: str = "",
    response: Any = None,
) -> Delivery:
    """Build (without saving) one `Delivery` row (``response``: a webhook's answer)."""
    now = timezone.now()
    row = Delivery(
        event_id=event_id,
        subscription=subscription,
        mode=mode,
        status=status,
        attempts=attempts,
        last_error=storable(error),
        traceback=storable(traceback),
        created_at=now,
        updated_at=now,
    )
    if response is not None:
        row.response_status = response.status
        row.response_ms = response.milliseconds
        row.response_body = storable(response.body)
    return row


def storable(text: str) -> str:
    """``text`` that every database stores: NUL and lone surrogates written as escapes.

    Handler errors quote what they like (a payload's bytes, a file name), and PostgreSQL
    refuses NUL in text columns.
    """
    if storable_text(text):
        return text
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped.replace("\x00", "\\x00")
