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
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from django.db import DatabaseError, IntegrityError, connections

from .models import Delivery

logger = logging.getLogger("django_events.worker")

FLUSH_INTERVAL = 0.2  # seconds a success row may wait before it is written
MAX_BATCH = 500  # rows that wake the writer before the interval is up
MAX_WAITING = 50_000  # rows kept while the database cannot be written; older ones are dropped


class BatchedRecorder:
    """Gathers delivery rows per database alias and writes them from a background thread."""

    def __init__(
        self,
        interval: float = FLUSH_INTERVAL,
        max_batch: int = MAX_BATCH,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.interval, self.max_batch, self.max_waiting = interval, max_batch, max_waiting
        self._waiting: dict[str, list[Delivery]] = {}
        self._count = 0
        self._lock = threading.Lock()  # guards _waiting and _count
        self._flushing = threading.Lock()  # one flush at a time (thread or exit)
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, alias: str, row: Delivery) -> None:
        """Queue one row for the next batch (written at once after `stop`)."""
        if self._stopped.is_set():  # a thread pool's task finishing during shutdown
            _write(alias, [row])
            return
        with self._lock:
            self._waiting.setdefault(alias, []).append(row)
            self._count += 1
            full = self._count >= self.max_batch
            if self._thread is None:
                self._start()
        if full:
            self._wake.set()

    def waiting(self) -> int:
        """Rows queued and not yet written."""
        with self._lock:
            return self._count

    def flush(self) -> int:
        """Write every queued row now; return how many were written."""
        with self._flushing:
            with self._lock:
                batches, self._waiting, self._count = self._waiting, {}, 0
            written = 0
            for alias, rows in batches.items():
                try:
                    written += _write(alias, rows)
                except DatabaseError:
                    logger.exception(
                        "Could not record %d successful deliveries; trying again in %.1f s",
                        len(rows),
                        self.interval,
                    )
                    connections[alias].close()  # a broken connection is opened anew next time
                    self._requeue(alias, rows)
            return written

    def stop(self) -> None:
        """Write what is queued and end the background thread."""
        self._stopped.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, 4 * self.interval))
        self.flush()

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
        while not self._stopped.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a bug, not the database: keep the writer alive for the next
                logger.exception("Lost a batch of success records")
        for connection in connections.all(initialized_only=True):
            connection.close()  # this thread's own connections

    def _requeue(self, alias: str, rows: list[Delivery]) -> None:
        with self._lock:
            waiting = self._waiting.setdefault(alias, [])
            waiting[:0] = rows
            self._count += len(rows)
            excess = self._count - self.max_waiting
            if excess > 0:
                del waiting[:excess]
                self._count -= excess
        if excess > 0:
            logger.error(
                "Dropped %d success records: more than %d waited for the database",
                excess,
                self.max_waiting,
            )


def _write(alias: str, rows: Sequence[Delivery]) -> int:
    connections[alias].close_if_unusable_or_obsolete()
    try:
        # DO NOTHING: a row already there was written by a later run (a retry, a replay), and
        # one statement may not update a row twice (a redelivered message in the same batch).
        Delivery.objects.using(alias).bulk_create(rows, ignore_conflicts=True)
    except IntegrityError:
        # Some row's event record is gone (pruned, or in another database): save the others.
        return sum(_write_one(alias, row) for row in rows)
    return len(rows)


def _write_one(alias: str, row: Delivery) -> int:
    try:
        Delivery.objects.using(alias).bulk_create([row], ignore_conflicts=True)
    except IntegrityError:
        logger.exception(
            "Could not record the successful delivery of event %s to %s",
            row.event_id,
            row.subscription,
            extra={"event_id": str(row.event_id), "subscription": row.subscription},
        )
        return 0
    return 1


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
