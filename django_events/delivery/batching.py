"""Success records of async deliveries written in batches (``SUCCESS_RECORDS = "batched"``).

A worker process hands each first-attempt success row to one `BatchedRecorder`; a background
thread writes what has gathered every `FLUSH_INTERVAL` seconds (sooner once `MAX_BATCH` rows
wait) with one ``INSERT ... ON CONFLICT DO NOTHING``, and the process writes the rest when it
exits. The message is acknowledged before its row is written: a process killed with SIGKILL
loses the rows of its last interval, never an event, a failure or a retry's outcome (those are
written before the acknowledgement whatever this setting says). While a database cannot be
written the recorder `takes` no more of its rows: the worker writes them before the
acknowledgement, waiting for the database, so a kill never loses more than one interval's.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from django_events.delivery import postgresql
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord

logger = logging.getLogger("django_events.worker")

FLUSH_INTERVAL = 0.2  # seconds a success row may wait before it is written
MAX_BATCH = 500  # rows that wake the writer before the interval is up
MAX_WAITING = 50_000  # rows kept while the database cannot be written; older ones are dropped

# A webhook's answer, kept on its success row: status, milliseconds, the start of the body
# (storable: see `recording.storable`).
Answer = tuple[int | None, int, str]
# One success: event id, subscription name, when the handler finished (``time.time()``), the
# answer of a webhook (None for any other delivery) and the handler's run time in ms. A plain
# tuple: a `Delivery` instance and its field-by-field adaptation would cost the worker ~50 us.
Success = tuple[UUID, str, float, Answer | None, float | None]


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
        self._failing: set[str] = set()  # aliases whose last write failed
        self._lock = threading.Lock()  # guards _waiting, _count, _stopped, _failing and _idle
        self._flushing = threading.Lock()  # one flush at a time (thread or exit)
        self._wake = threading.Event()
        self._idle = False  # the thread waits for a first row, with no timeout
        self._thread: threading.Thread | None = None
        self._owner = os.getpid()  # a forked child inherits the exit hooks, not the thread

    def add(
        self,
        alias: str,
        event_id: UUID,
        subscription: str,
        answer: Answer | None = None,
        duration_ms: float | None = None,
    ) -> None:
        """Queue the success of a first attempt, now, for the next batch (at once after `stop`).

        ``answer``: a webhook's (its row is a ``webhook`` delivery that keeps it);
        ``duration_ms``: the handler's run time.
        """
        row = (event_id, subscription, time.time(), answer, duration_ms)
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._waiting.setdefault(alias, []).append(row)
                self._count += 1
                full = self._count >= self.max_batch
                self._wake_idle()
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

    def takes(self, alias: str) -> bool:
        """Whether a success row of ``alias`` may wait for a batch: not while that database
        could not be written (its waiting rows would grow, and die with a killed worker)."""
        with self._lock:
            return alias not in self._failing

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
                with self._lock:
                    self._failing.add(alias)
                logger.exception(
                    "Could not record %d successful deliveries; they wait for the next try",
                    len(rows),
                    extra=log_extra(),
                )
                connections[alias].close()  # a broken connection is opened anew next time
                self._requeue(alias, rows)
            else:
                with self._lock:
                    self._failing.discard(alias)
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
            self._gather()
            with self._lock:
                if self._stopped:
                    break
            try:
                self.flush()
            except Exception:  # a bug, not the database: keep the writer alive for the next
                logger.exception("Lost a batch of success records", extra=log_extra())
        for connection in connections.all(initialized_only=True):
            connection.close()  # this thread's own connections

    def _wake_idle(self) -> None:
        if self._idle:  # under self._lock
            self._idle = False
            self._wake.set()

    def _gather(self) -> None:
        """Sleep while the interval's rows gather (a full batch or `stop` ends it sooner); with
        none waiting, until the first comes: an idle process's thread does not wake."""
        with self._lock:
            idle = self._idle = not self._count and not self._stopped
        if idle:
            self._wake.wait()
            self._wake.clear()
        if not self._stopped:  # read unlocked: `stop` sets it before the event
            self._wake.wait(self.interval)
            self._wake.clear()

    def _requeue(self, alias: str, rows: list[Success]) -> None:
        with self._lock:
            waiting = self._waiting.setdefault(alias, [])
            waiting[:0] = rows
            self._count += len(rows)
            self._wake_idle()  # put back by a flush of another thread's: try them again
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
        extra = {**log_extra(None, row[1]), "event_id": str(row[0])}
        if EventRecord.objects.using(connection.alias).filter(pk=row[0]).exists():
            logger.exception(
                "Could not record the successful delivery of event %s to %s",
                row[0],
                row[1],
                extra=extra,
            )
        else:  # the usual cause, said plainly: the database's own error adds nothing
            logger.error(
                "Could not record the successful delivery of event %s to %s: the event's "
                "record is gone (events_prune deleted it while the message waited, or it is "
                "in another database); the handler ran",
                row[0],
                row[1],
                extra=extra,
            )
        return 0
    return 1


def _insert(connection: BaseDatabaseWrapper, rows: Sequence[Success]) -> None:
    """Insert first-attempt successes; a row already there (a later run wrote it) stays."""
    if connection.vendor == "postgresql":
        postgresql.insert_successes(connection, rows)
        return
    tz = UTC if settings.USE_TZ else None  # what timezone.now() would give
    literal = dict(postgresql.SUCCESS_LITERALS)
    Delivery.objects.using(connection.alias).bulk_create(
        [
            Delivery(
                event_id=event_id,
                subscription=subscription,
                created_at=datetime.fromtimestamp(finished, tz),
                updated_at=datetime.fromtimestamp(finished, tz),
                duration_ms=duration_ms,
                **literal,
                **postgresql.answer_fields(answer),
            )
            for event_id, subscription, finished, answer, duration_ms in rows
        ],
        ignore_conflicts=True,
    )


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
