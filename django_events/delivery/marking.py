"""Marking committed events dispatched off the publisher's path.

After commit a publisher sends its messages and returns: it neither waits for RabbitMQ's
publisher confirms nor writes ``UPDATE ... dispatched`` itself. One background thread per
process collects the confirms of what was sent (draining each kept confirming connection while
its own thread is not publishing on it; a thread that keeps publishing takes the confirms that
arrived itself, after each batch) and marks the events whose every message the broker took,
with one ``UPDATE`` per database every `INTERVAL` seconds.

Nothing committed is lost by it: until that ``UPDATE`` the record is ``pending``, so an event
whose message was refused or never confirmed, or whose mark was never written (the process
died, the database was away), is sent by ``events_relay`` once it is ``--min-age`` old (10 s
by default, far longer than the interval). What it can cost is a second message for an event
the broker did take (at least once, as ever).

Used on databases with row locks (PostgreSQL, MySQL, Oracle). On SQLite a second writer
thread would contend for the database's single write lock: the publisher marks at once there,
as it does when its batch is delivered inside a transaction still open (tests).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

from django.db import DatabaseError, connections

from django_events.delivery.recording import mark_dispatched
from django_events.logs import log_extra

logger = logging.getLogger("django_events.dispatch")

INTERVAL = 0.2  # seconds between two rounds of collecting confirms and marking
EXIT_PATIENCE = 5.0  # seconds an exiting process waits for confirms and its last marks
MAX_WAITING = 100_000  # ids kept while the database cannot be written; the relay has them


class Confirming(Protocol):
    """A kept publisher connection with batches still waiting for their confirms."""

    def collect(self, timeout: float) -> list[tuple[str, set[UUID]]]:
        """(database alias, ids the broker took) of each batch whose confirms all came,
        reading what the broker sent for up to ``timeout`` seconds; empty while its thread
        is publishing on it."""

    def outstanding(self) -> bool:
        """Whether a batch still waits for confirms (false once the connection failed)."""


def marks_later(alias: str) -> bool:
    """Whether events committed on ``alias`` are marked dispatched by the background thread.

    Not while ``alias`` is still inside a transaction (on-commit callbacks run by hand, as
    tests do with ``captureOnCommitCallbacks``): the thread's own connection cannot see rows
    that are not committed, so they would stay pending.
    """
    connection = connections[alias]
    return bool(connection.features.has_select_for_update_skip_locked) and not (
        connection.in_atomic_block
    )


class Marker:
    """This process's background marking: ids the broker took, connections to collect from."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._taken: dict[str, list[UUID]] = {}
        self._watched: list[Confirming] = []
        self._lock = threading.Lock()  # guards _taken and _watched
        self._flushing = threading.Lock()  # one round at a time (the thread, a flush, exit)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exit_hook = False

    def taken(self, alias: str, ids: Sequence[UUID]) -> None:
        """Mark ``ids`` dispatched in the next round (the broker took their messages)."""
        if not ids:
            return
        with self._lock:
            self._taken.setdefault(alias, []).extend(ids)
            self._ensure_thread()

    def watch(self, confirming: Confirming) -> None:
        """Collect the confirms of ``confirming`` in the next rounds, until none is left."""
        with self._lock:
            if confirming not in self._watched:
                self._watched.append(confirming)
            self._ensure_thread()

    def flush(self, timeout: float = EXIT_PATIENCE) -> None:
        """Wait up to ``timeout`` seconds for the confirms outstanding, then write every mark
        (tests; a process exiting)."""
        deadline = time.monotonic() + timeout
        with self._flushing:
            while True:
                self._collect(0.05)
                with self._lock:
                    waiting = any(c.outstanding() for c in self._watched)
                if not waiting or time.monotonic() >= deadline:
                    break
            self._write()

    def stop(self, timeout: float = EXIT_PATIENCE) -> None:
        """`flush`, then end the thread, which closes its database connections (a process
        exiting; before a test database is dropped). Marking again starts a new one."""
        self.flush(timeout)
        with self._lock:
            thread, self._stopping = self._thread, True
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            self._thread, self._stopping = None, False
            self._wake.clear()
            leftover = bool(self._taken or self._watched)
        if leftover:  # marked meanwhile, from another thread
            with self._lock:
                self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(
                target=self._run, name="django_events-dispatched", daemon=True
            )
            self._thread.start()
            if not self._exit_hook:
                atexit.register(self.stop)
                # A prefork pool child (a handler that publishes) leaves through this, not atexit.
                from celery.signals import worker_process_shutdown

                worker_process_shutdown.connect(self._on_process_shutdown, weak=False)
                self._exit_hook = True

    def _on_process_shutdown(self, **kwargs: object) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            with self._lock:
                if self._stopping:
                    break
            try:
                with self._flushing:
                    self._collect(0.001)
                    self._write()
            except Exception:  # a bug, not the database: keep marking (the relay covers)
                logger.exception("Could not mark a batch of events dispatched", extra=log_extra())
        for connection in connections.all(initialized_only=True):
            connection.close()  # this thread's own connections

    def _collect(self, timeout: float) -> None:
        with self._lock:
            watched = list(self._watched)
        for confirming in watched:
            for alias, ids in confirming.collect(timeout):
                self.taken(alias, list(ids))
        with self._lock:
            self._watched = [c for c in self._watched if c.outstanding()]

    def _write(self) -> None:
        with self._lock:
            batches, self._taken = self._taken, {}
        for alias, ids in batches.items():
            try:
                connections[alias].close_if_unusable_or_obsolete()
                mark_dispatched(alias, ids)
            except DatabaseError:
                logger.exception(
                    "Could not mark %d event(s) dispatched; they wait for the next round",
                    len(ids),
                    extra=log_extra(),
                )
                connections[alias].close()  # a broken connection is opened anew next time
                with self._lock:
                    waiting = self._taken.setdefault(alias, [])
                    waiting[:0] = ids[-MAX_WAITING:]  # beyond that, the relay sends them again


_marker: Marker | None = None
_marker_pid = 0
_marker_lock = threading.Lock()


def marker() -> Marker:
    """This process's marker (a forked child builds its own: threads do not survive fork)."""
    global _marker, _marker_pid
    with _marker_lock:
        if _marker is None or _marker_pid != os.getpid():
            _marker, _marker_pid = Marker(), os.getpid()
        return _marker


def flush(timeout: float = EXIT_PATIENCE) -> None:
    """Mark what this process sent and the broker confirmed, now (tests, before a check)."""
    marker().flush(timeout)


def stop(timeout: float = EXIT_PATIENCE) -> None:
    """Flush, and end the background thread with its database connections (see `Marker.stop`)."""
    marker().stop(timeout)
