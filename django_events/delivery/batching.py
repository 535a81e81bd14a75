"""Success records of async deliveries written in batches (``SUCCESS_RECORDS = "batched"``).

A worker process hands each first-attempt success row to one `BatchedRecorder`; a background
thread writes what has gathered every `FLUSH_INTERVAL` seconds (sooner once `MAX_BATCH` rows
wait) with one ``INSERT ... ON CONFLICT DO NOTHING``, and the process writes the rest when it
exits. The message is acknowledged before its row is written: a process killed with SIGKILL
loses the rows of its last interval, never an event, a failure or a retry's outcome (those are
written before the acknowledgement whatever this setting says).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.constants import OnConflict

from django_events.delivery.recording import (
    delivery_fields,
    insert_deliveries_sql,
    json_rows_insert_sql,
    sql_literal,
)
from django_events.logs import log_extra
from django_events.models import Delivery

logger = logging.getLogger("django_events.worker")

FLUSH_INTERVAL = 0.2  # seconds a success row may wait before it is written
MAX_BATCH = 500  # rows that wake the writer before the interval is up
MAX_WAITING = 50_000  # rows kept while the database cannot be written; older ones are dropped

# One success: event id, subscription name, when the handler finished (``time.time()``). A
# plain tuple: a `Delivery` instance and its field-by-field adaptation would cost the worker
# ~50 us each.
Success = tuple[UUID, str, float]


class BatchedRecorder:
    """Gathers success rows per database alias and writes them from a background thread."""

    def __init__(
        self,
        interval: float = FLUSH_INTERVAL,
        max_batch: int = MAX_BATCH,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.interval, self.max_batch, self.max_waiting = interval, max_batch, max_waiting
        self._waiting: dict[str, list[Success]] = {}
        self._count = 0
        self._stopped = False
        self._lock = threading.Lock()  # guards _waiting, _count and _stopped
        self._flushing = threading.Lock()  # one flush at a time (thread or exit)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = os.getpid()  # a forked child inherits the exit hooks, not the thread

    def add(self, alias: str, event_id: UUID, subscription: str) -> None:
        """Queue the success of a first attempt, now, for the next batch (at once after `stop`)."""
        row = (event_id, subscription, time.time())
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._waiting.setdefault(alias, []).append(row)
                self._count += 1
                full = self._count >= self.max_batch
                if self._thread is None:
                    self._start()
        if stopped:  # a thread pool's task finishing during shutdown
            try:
                _write(alias, [row])
            except DatabaseError:
                logger.exception(
                    "Could not record a successful delivery", extra=log_extra(None, subscription)
                )
        elif full:
            self._wake.set()

    def waiting(self) -> int:
        """Rows queued and not yet written."""
        with self._lock:
            return self._count

    def flush(self) -> int:
        """Write every queued row now; return how many went to the database (rows already
        there are skipped by it); rows the database refused wait for the next flush."""
        with self._flushing:
            return self._flush()

    def stop(self) -> None:
        """Write what is queued and end the background thread (in the process that made it)."""
        if os.getpid() != self._owner:
            return
        with self._lock:
            self._stopped = True
        self._wake.set()
        patience = max(5.0, 4 * self.interval)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=patience)
        # A write hanging on a lock or a dead network must not hang the process's exit.
        if self._flushing.acquire(timeout=patience):
            try:
                self._flush()
            finally:
                self._flushing.release()
        lost = self.waiting()
        if lost:
            logger.error(
                "Dropped %d success records at exit: the database could not be written",
                lost,
                extra=log_extra(),
            )

    def _flush(self) -> int:
        with self._lock:
            batches, self._waiting, self._count = self._waiting, {}, 0
        written = 0
        for alias, rows in batches.items():
            try:
                written += _write(alias, rows)
            except DatabaseError:
                logger.exception(
                    "Could not record %d successful deliveries; they wait for the next try",
                    len(rows),
                    extra=log_extra(),
                )
                connections[alias].close()  # a broken connection is opened anew next time
                self._requeue(alias, rows)
        return written

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="django_events-success-records", daemon=True
        )
        self._thread.start()
        # A prefork pool child leaves through Celery's worker_process_shutdown, not atexit.
        atexit.register(self.stop)
        from celery.signals import worker_process_shutdown

        worker_process_shutdown.connect(self._on_process_shutdown, weak=False)

    def _on_process_shutdown(self, **kwargs: Any) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            with self._lock:
                if self._stopped:
                    break
            try:
                self.flush()
            except Exception:  # a bug, not the database: keep the writer alive for the next
                logger.exception("Lost a batch of success records", extra=log_extra())
        for connection in connections.all(initialized_only=True):
            connection.close()  # this thread's own connections

    def _requeue(self, alias: str, rows: list[Success]) -> None:
        with self._lock:
            waiting = self._waiting.setdefault(alias, [])
            waiting[:0] = rows
            self._count += len(rows)
            dropped = min(max(0, self._count - self.max_waiting), len(waiting))
            del waiting[:dropped]  # the oldest
            self._count -= dropped
        if dropped:
            logger.error(
                "Dropped %d success records: more than %d waited for the database",
                dropped,
                self.max_waiting,
                extra=log_extra(),
            )


def _write(alias: str, rows: Sequence[Success]) -> int:
    connection = connections[alias]
    connection.close_if_unusable_or_obsolete()
    try:
        _insert(connection, rows)
    except IntegrityError:
        # Some row's event record is gone (pruned, or in another database): save the others.
        return sum(_write_one(connection, row) for row in rows)
    return len(rows)


def _write_one(connection: BaseDatabaseWrapper, row: Success) -> int:
    try:
        _insert(connection, [row])
    except IntegrityError:
        logger.exception(
            "Could not record the successful delivery of event %s to %s",
            row[0],
            row[1],
            extra={**log_extra(None, row[1]), "event_id": str(row[0])},
        )
        return 0
    return 1


# What every batched row says: a first attempt that succeeded. Written into the statement,
# these take no parameter (a row has 4 instead of 9, and the database driver's cost is per
# parameter).
_SUCCESS_LITERALS: tuple[tuple[str, str | int], ...] = (
    ("mode", "async"),
    ("status", Delivery.Status.SUCCEEDED.value),
    ("attempts", 1),
    ("last_error", ""),
    ("traceback", ""),
    ("response_body", ""),  # no webhook's: their successes are never batched
)


def _insert(connection: BaseDatabaseWrapper, rows: Sequence[Success]) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING`` (the backend's form) of ``rows``.

    DO NOTHING: a row already there was written by a later run (a retry, a replay), and one
    statement may not update a row twice (a redelivered message in the same batch).
    """
    if connection.vendor == "postgresql":
        # One statement, the same text for every batch, the rows in one JSON parameter: a
        # statement with parameters per row costs the writer 2-6x the CPU (psycopg parses
        # the text of every new batch size and adapts each parameter in Python).
        document = json.dumps(
            [{"event": str(event), "subscription": name, "at": at} for event, name, at in rows]
        )
        with connection.cursor() as cursor:
            cursor.execute(_successes_sql(connection), [document])
        return
    literal = dict(_SUCCESS_LITERALS)
    fields = [f for f in delivery_fields() if f.name not in literal]
    event_field = Delivery._meta.get_field("event")
    ops = connection.ops
    size = max(1, ops.bulk_batch_size(fields, list(rows)))
    tz = UTC if settings.USE_TZ else None  # what timezone.now() would give
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            params: list[Any] = []
            for event_id, subscription, finished in chunk:
                at = ops.adapt_datetimefield_value(datetime.fromtimestamp(finished, tz))
                values = {
                    "event": event_field.get_db_prep_value(event_id, connection),
                    "subscription": subscription,
                    "created_at": at,
                    "updated_at": at,
                }
                params += [values.get(f.name) for f in fields]  # the others: NULL
            sql = insert_deliveries_sql(
                connection, len(chunk), OnConflict.IGNORE, _SUCCESS_LITERALS
            )
            cursor.execute(sql, params)


_successes: dict[str, str] = {}


def _successes_sql(connection: BaseDatabaseWrapper) -> str:
    """PostgreSQL's statement of a batch: rows of {"event", "subscription", "at"} objects."""
    sql = _successes.get(connection.vendor)
    if sql is None:
        at = 'to_timestamp(rows."at")'
        subscription = Delivery._meta.get_field("subscription")
        sql = _successes[connection.vendor] = json_rows_insert_sql(
            connection,
            Delivery,
            {
                "event": 'rows."event"',
                "subscription": 'rows."subscription"',
                **{name: sql_literal(value) for name, value in _SUCCESS_LITERALS},
                "created_at": at,
                "updated_at": at,
            },
            {
                "event": "uuid",
                "subscription": str(subscription.db_type(connection)),
                "at": "float8",
            },
            connection.ops.on_conflict_suffix_sql([], OnConflict.IGNORE, [], []),
        )
    return sql


_recorder: BatchedRecorder | None = None
_recorder_pid = 0
_recorder_lock = threading.Lock()


def recorder() -> BatchedRecorder:
    """This process's recorder (a forked child builds its own: threads do not survive fork)."""
    global _recorder, _recorder_pid
    with _recorder_lock:
        if _recorder is None or _recorder_pid != os.getpid():
            _recorder, _recorder_pid = BatchedRecorder(FLUSH_INTERVAL), os.getpid()
        return _recorder


def reset_recorder() -> None:
    """Write what waits and forget the recorder (tests; a worker process shutting down)."""
    global _recorder
    with _recorder_lock:
        current, _recorder = _recorder, None
    if current is not None and _recorder_pid == os.getpid():
        current.stop()
