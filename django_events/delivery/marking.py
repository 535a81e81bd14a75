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

A handed-on delivery of an ordered key (`ordering`) is sent the same way: its row is due for
the relay 30 s later until the marker clears that due time, once the broker took the message
(`HandOns`).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar
from uuid import UUID

from django.db import DatabaseError, connections

from django_events.delivery.recording import clear_due, mark_dispatched
from django_events.logs import log_extra

logger = logging.getLogger("django_events.dispatch")

INTERVAL = 0.2  # seconds between two rounds of collecting confirms and marking
EXIT_PATIENCE = 5.0  # seconds an exiting process waits for confirms and its last marks
MAX_WAITING = 100_000  # ids kept while the database cannot be written; the relay has them

_T = TypeVar("_T")


@dataclass(frozen=True)
class HandOns:
    """A batch of deliveries handed on by their key (`ordering`): by event id, its `Delivery`
    row's id and relay due time (``retry_at``), cleared once the broker took its message."""

    alias: str
    due: Mapping[UUID, tuple[int, datetime]]


# What a batch the broker took gets: a database alias (its records marked dispatched), or
# the due times of its hand-ons cleared.
Marks = str | HandOns


class Confirming(Protocol):
    """A kept publisher connection with batches still waiting for their confirms."""

    def collect(self, timeout: float) -> list[tuple[Marks, set[UUID]]]:
        """(what its batch marks, ids the broker took) of each batch whose confirms all came,
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


@dataclass(frozen=True)
class _Signals:
    """One marking thread's events: ``wake`` ends its sleep, ``stop`` its loop. A stopped
    thread's are never used again: one whose round outlasted `Marker.stop`'s patience ends
    after that round, and cannot take the wake-ups of the thread started after it."""

    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


class Marker:
    """This process's background marking: ids the broker took, connections to collect from."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._taken: dict[str, list[UUID]] = {}
        self._due: dict[str, list[tuple[int, datetime]]] = {}  # hand-ons' rows, by alias
        self._watched: list[Confirming] = []
        # Guards _taken, _due, _watched, _idle, _thread and _signals.
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one round at a time (the threads, a flush, exit)
        self._idle = False  # the thread waits for something to mark, with no timeout
        self._thread: threading.Thread | None = None
        self._signals = _Signals()  # the current thread's (or the next one's)
        self._exit_hook = False

    def taken(self, marks: Marks, ids: Sequence[UUID]) -> None:
        """Mark ``ids`` dispatched on the database ``marks`` in the next round (the broker took
        their messages); for `HandOns`, clear those hand-ons' relay due times instead."""
        if not ids:
            return
        with self._lock:
            if isinstance(marks, HandOns):
                rows = [marks.due[i] for i in ids if i in marks.due]
                self._due.setdefault(marks.alias, []).extend(rows)
            else:
                self._taken.setdefault(marks, []).extend(ids)
            self._ensure_thread()
            self._wake_idle()

    def watch(self, confirming: Confirming) -> None:
        """Collect the confirms of ``confirming`` in the next rounds, until none is left."""
        with self._lock:
            if confirming not in self._watched:
                self._watched.append(confirming)
            self._ensure_thread()
            self._wake_idle()

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
        exiting; before a test database is dropped). Marking again starts a new one.

        A thread still in a round after ``timeout`` more seconds ends after that round, with
        its connections, beside the new one if marking started again meanwhile (their rounds
        never overlap)."""
        self.flush(timeout)
        with self._lock:
            thread, signals = self._thread, self._signals
            signals.stop.set()
            signals.wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            if self._signals is signals:  # else a stop overlapping this one reset it first
                self._thread, self._signals, self._idle = None, _Signals(), False
            leftover = bool(self._taken or self._due or self._watched)
        if leftover:  # marked meanwhile, from another thread
            with self._lock:
                self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._signals.stop.is_set():
            self._thread = threading.Thread(
                target=self._run,
                args=(self._signals,),
                name="django_events-dispatched",
                daemon=True,
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

    def _wake_idle(self) -> None:
        if self._idle:  # under self._lock
            self._idle = False
            self._signals.wake.set()

    def _rest(self, signals: _Signals) -> None:
        """Sleep until the next round; with nothing to collect or mark, until something
        comes: an idle process's thread does not wake every interval."""
        with self._lock:
            if signals.stop.is_set():  # stopped: `_idle` is the next thread's
                return
            idle = self._idle = not (self._taken or self._due or self._watched)
        if idle:
            signals.wake.wait()
            signals.wake.clear()
        if not signals.stop.is_set():  # `stop` sets it before the wake
            signals.wake.wait(self.interval)
            signals.wake.clear()

    def _run(self, signals: _Signals) -> None:
        while True:
            self._rest(signals)
            if signals.stop.is_set():
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
            for marks, ids in confirming.collect(timeout):
                self.taken(marks, list(ids))
        with self._lock:
            self._watched = [c for c in self._watched if c.outstanding()]

    def _write(self) -> None:
        with self._lock:
            taken, self._taken = self._taken, {}
            due, self._due = self._due, {}
        for alias, ids in taken.items():
            self._write_one(alias, mark_dispatched, ids, self._taken, "mark %d event(s) dispatched")
        for alias, rows in due.items():
            what = "clear the relay due time of %d handed-on delivery(ies)"
            self._write_one(alias, clear_due, rows, self._due, what)

    def _write_one(
        self,
        alias: str,
        write: Callable[[str, Sequence[_T]], None],
        values: list[_T],
        waiting: dict[str, list[_T]],
        what: str,
    ) -> None:
        """``write`` ``values`` on ``alias``; if the database cannot take them, put them back
        in ``waiting`` for the next round."""
        try:
            connections[alias].close_if_unusable_or_obsolete()
            write(alias, values)
        except DatabaseError:
            logger.exception(
                "Could not %s; they wait for the next round", what % len(values), extra=log_extra()
            )
            connections[alias].close()  # a broken connection is opened anew next time
            with self._lock:
                kept = waiting.setdefault(alias, [])
                kept[:0] = values[-MAX_WAITING:]  # beyond that, the relay sends them again
                # Put back by a flush of another thread's, or by a thread `stop` left in its
                # round: a thread must try them again.
                self._ensure_thread()
                self._wake_idle()


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
