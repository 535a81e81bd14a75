"""Ordered delivery per key (``ordering_key``): a gate per (subscription, key) in the database.

- At publish, in the publisher's transaction, each ordered delivery takes the next number of
  its gate (`assign`): an upsert that locks the gate row until that transaction ends, so
  concurrent publishers of one key get their numbers in commit order ("recorded order"), and
  a rolled-back publish gives its number back. Its `Delivery` row is written then, pending.
- A worker that gets the message looks for an unfinished delivery of the key with a lower
  number (`claim`). If there is none, the handler runs; if there is one, it locks the key's
  turn (`_lock`), looks again, and leaves the delivery ``held`` (the message acknowledged).
- The worker that finishes a delivery (`finish`, in the transaction that records its success)
  finds the key's first unfinished delivery; if it is held, it marks it pending and sends its
  message again after the commit, unless the task that finished it keeps its hand-ons to run
  them itself (`hand_ons_kept`, `continuing`). A failed delivery is unfinished: it holds its
  key until a retry succeeds or it is marked resolved (`release`).
- On PostgreSQL the claim that lets a delivery run also takes a session-level advisory lock
  of that delivery (`RunLock`), in the same statement; the claiming connection holds it while
  the handler runs. A copy of its message claimed meanwhile (a broker's redelivery, the
  relay's resend) cannot take it: `Turn.RUNNING`, it runs nothing. `finish` releases it in
  its own statement, `end_run` after a run that did not finish (a failure, a retry), and
  PostgreSQL when the connection closes (its worker died). SQLite and other databases have no
  such lock, nor do databases behind a pooler in transaction mode (`DISABLE_SERVER_SIDE_CURSORS`)
  or Django's pool (``OPTIONS["pool"]``): there such a copy runs beside the delivery
  (docs/ordering.md, "Duplicates").

The broker is not involved (RabbitMQ, Redis and the filesystem transport alike), nor is the
number of workers and hosts. Its cost: at publish, the gates' upsert and the `Delivery`
rows' insert (on PostgreSQL two statements a transaction, elsewhere one upsert per key and
one insert), and the gate rows locked until the publisher commits; at the worker, one read
before each run (a transaction only to hold it) and one transaction after, on PostgreSQL
one statement: a function of migrations 0011 and 0012 (tests/test_ordering.py counts the
statements).
docs/ordering.md says why this over the brokers' own tools. Webhook deliveries
(``mode: webhook``) use the same three calls around their send.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from functools import cache, partial
from typing import Any
from uuid import UUID

from django.db import DatabaseError, ProgrammingError, connections, transaction
from django.db.models import Exists, F, OuterRef, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone

from django_events.delivery import postgresql
from django_events.delivery.marking import marker, marks_later
from django_events.delivery.messages import PriorRuns
from django_events.delivery.migration_state import migrate_command
from django_events.delivery.recording import (
    FINISHED,
    clear_due,
    delivery,
    event_of,
    save_deliveries,
)
from django_events.events import Event
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord, OrderingGate
from django_events.wiring.compiled import Subscription
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.ordering")

#: Seconds before events_relay sends a handed-on delivery whose send did not happen (the
#: worker died between its commit and the send, or the broker refused it).
HAND_ON_GRACE = 30.0
KEY_LENGTH = 255  # OrderingGate.key, Delivery.ordering_key


class Turn(Enum):
    """What `claim` decided for a message."""

    RUN = "run"  # its turn (or not ordered): run the handler
    HELD = "held"  # an earlier delivery of its key is unfinished: left held
    DONE = "done"  # already succeeded or resolved: a duplicate message, run nothing
    RUNNING = "running"  # another worker runs it right now (PostgreSQL): a copy, run nothing


@dataclass
class RunLock:
    """The lock of a delivery that runs (PostgreSQL): session-level, held by the connection
    that claimed it until `finish` or `end_run` releases it, or that connection closes."""

    alias: str
    id: int
    holder: Any  # that DB-API connection: one opened since (after an outage) does not hold it
    held: bool = True

    def to_release(self) -> int | None:
        """Its id, if the alias's connection holds it now (None: released, or gone with the
        connection that held it)."""
        if self.held and connections[self.alias].connection is self.holder:
            return self.id
        return None


@dataclass(frozen=True)
class HandedOn:
    """A held delivery a hand-on made pending: its database, subscription, `Delivery` row id
    and the time events_relay sends it unless its message went out (or it ran) before."""

    alias: str
    subscription: str
    pk: int
    due: datetime


# The hand-ons a task keeps to run itself (`hand_ons_kept`); None: each is sent at once.
_kept_hand_ons: ContextVar[list[HandedOn] | None] = ContextVar(
    "django_events_kept_hand_ons", default=None
)


@contextmanager
def hand_ons_kept() -> Iterator[list[HandedOn]]:
    """Keep the hand-ons made in this context instead of sending their messages: the list
    yielded, for the caller to run (`continuing`, taking them off it). Those still on it at
    the end are sent then, as they would have been."""
    kept: list[HandedOn] = []
    token = _kept_hand_ons.set(kept)
    try:
        yield kept
    finally:
        _kept_hand_ons.reset(token)
        while kept:
            send_handed_on(kept.pop(0))


@dataclass(frozen=True)
class Claim:
    """What `claim` decided, the delivery's key (for `finish`; None: not numbered), and the
    lock its run holds (`Turn.RUN` on PostgreSQL), for `finish` or `end_run` to release."""

    turn: Turn
    key: str | None = None
    lock: RunLock | None = None


def key_value(data: dict[str, Any], path: str) -> str:
    """The key of a payload: the value at ``path`` (dots for nesting), as text.

    Strings as they are, other values as JSON; a missing value is ``""``. Two values with
    one text (``"1"`` and ``1``) share a key: more order than asked for, never less.
    """
    value: Any = data
    for step in path.split("."):
        if not isinstance(value, dict) or step not in value:
            return ""
        value = value[step]
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > KEY_LENGTH:
        text = "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return text


def ordered(subscriptions: Sequence[Subscription]) -> list[Subscription]:
    """Those of ``subscriptions`` with an ``ordering_key``."""
    return [s for s in subscriptions if s.declaration.ordering_key is not None]


def assign(alias: str, items: Sequence[tuple[Event, Sequence[Subscription]]]) -> None:
    """Number the ordered deliveries of new events and write their pending `Delivery` rows.

    Runs in the publisher's transaction (after the event records are inserted). The gates are
    locked in one order, (subscription, key), so two publishers never wait on each other in
    a cycle.
    """
    wanted: dict[tuple[str, str], list[UUID]] = {}
    modes: dict[str, str] = {}
    for event, subscriptions in items:
        for subscription in subscriptions:
            path = subscription.declaration.ordering_key
            assert path is not None
            wanted.setdefault((subscription.name, key_value(event.data, path)), []).append(event.id)
            modes[subscription.name] = subscription.queued_mode
    connection = connections[alias]
    with transaction.mark_for_rollback_on_error(alias):
        if connection.vendor == "postgresql":  # two statements, whatever the count
            counts = [(name, key, len(ids)) for (name, key), ids in sorted(wanted.items())]
            last = postgresql.take_numbers(connection, counts)
            postgresql.insert_numbered(
                connection,
                [
                    (event_id, name, modes[name], key, number)
                    for (name, key), ids in wanted.items()
                    for number, event_id in enumerate(ids, start=last[name, key] - len(ids) + 1)
                ],
                timezone.now(),
            )
            return
        rows = []
        for (subscription_name, key), event_ids in sorted(wanted.items()):
            mode = modes[subscription_name]
            last_number = _take(alias, subscription_name, key, len(event_ids))
            first_number = last_number - len(event_ids) + 1
            for number, event_id in enumerate(event_ids, start=first_number):
                row = delivery(event_id, subscription_name, mode, Delivery.Status.PENDING, 0)
                row.ordering_key, row.sequence = key, number
                rows.append(row)
        Delivery.objects.using(alias).bulk_create(rows)


def _take(alias: str, subscription: str, key: str, count: int) -> int:
    """Add ``count`` to the gate's counter (creating the gate); return its new value."""
    connection = connections[alias]
    if connection.vendor in ("postgresql", "sqlite"):
        quote = connection.ops.quote_name
        meta = OrderingGate._meta
        table = quote(meta.db_table)
        column = {f.name: quote(str(f.column)) for f in meta.concrete_fields}
        last = column["last_sequence"]
        sql = (
            f"INSERT INTO {table} ({column['subscription']}, {column['key']}, {last}) "
            f"VALUES (%s, %s, %s) ON CONFLICT ({column['subscription']}, {column['key']}) "
            f"DO UPDATE SET {last} = {table}.{last} + excluded.{last} RETURNING {last}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [subscription, key, count])
            value: int = cursor.fetchone()[0]
        return value
    gates = OrderingGate.objects.using(alias)  # pragma: no cover - other backends
    gates.get_or_create(subscription=subscription, key=key)  # pragma: no cover
    gate = gates.select_for_update().get(subscription=subscription, key=key)  # pragma: no cover
    gate.last_sequence += count  # pragma: no cover
    gate.save(update_fields=["last_sequence"])  # pragma: no cover
    return gate.last_sequence  # pragma: no cover


def _lock(alias: str, subscription: str, key: str, run: RunLock | None = None) -> None:
    """Lock the key's turn until the transaction ends: `claim` holding a delivery and
    `finish` handing on wait for each other.

    On PostgreSQL a transaction-level advisory lock on the key, not the gate row: a publisher
    holds the gate row from its numbering to its commit, and a worker waiting for that would
    run no faster than the publishers commit (figure 16). Elsewhere an ``UPDATE`` of the gate
    row, not ``SELECT ... FOR UPDATE``: on SQLite a transaction that reads first and writes
    later can fail at once with "database is locked"; one that writes first waits. ``run``:
    the lock of the run that finishes, released in the same statement (a session lock: at
    once, whatever becomes of the transaction).
    """
    connection = connections[alias]
    if connection.vendor == "postgresql":
        unlock = None if run is None else run.to_release()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s), pg_advisory_unlock(%s::bigint)",
                [_lock_id(subscription, key), unlock],
            )
        if run is not None:
            run.held = False
        return
    OrderingGate.objects.using(alias).filter(subscription=subscription, key=key).update(
        last_sequence=F("last_sequence")
    )


def _lock_id(subscription: str, key: str) -> int:
    """The advisory lock of a key's turn on PostgreSQL (a shared id, a hash collision, only
    waits)."""
    digest = hashlib.sha256(f"django_events.ordering\0{subscription}\0{key}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def _run_lock_id(event_id: UUID, subscription: str) -> int:
    """The advisory lock of a delivery's run on PostgreSQL (`RunLock`)."""
    digest = hashlib.sha256(f"django_events.ordering.run\0{event_id}\0{subscription}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def locks_runs(alias: str) -> bool:
    """Whether a claim on ``alias`` locks the run it lets go: on PostgreSQL, unless a pool
    outlives its connections' sessions. A pooler in transaction mode hands a session's server
    connection (and the locks it holds) to other clients between transactions: Django asks
    for ``DISABLE_SERVER_SIDE_CURSORS`` there, which is what is read. Django's own pool
    (``OPTIONS["pool"]``) takes a connection back, its locks held, where Django closes it."""
    connection = connections[alias]
    settings = connection.settings_dict
    pooled = bool((settings.get("OPTIONS") or {}).get("pool"))
    return (
        connection.vendor == "postgresql"
        and not settings.get("DISABLE_SERVER_SIDE_CURSORS")
        and not pooled
    )


def first_unfinished(alias: str, subscription: str, key: str) -> tuple[int, str] | None:
    """The id and status of the key's first unfinished delivery (lowest number), if any."""
    connection = connections[alias]
    if connection.vendor == "postgresql":
        return postgresql.first_unfinished(connection, subscription, key, FINISHED)
    return (
        Delivery.objects.using(alias)
        .filter(subscription=subscription, ordering_key=key, sequence__isnull=False)
        .exclude(status__in=FINISHED)
        .order_by("sequence")
        .values_list("pk", "status")
        .first()
    )


def first_unfinished_of(alias: str, rows: QuerySet[Delivery]) -> RawSQL:
    """The ids of the first unfinished delivery of each key of the ordered ``rows``, as a
    subquery (for ``pk__in``): one read of the index of unfinished deliveries a key, however
    many of ``rows`` a key has.

    Not through the ORM, which can only look a row's key up again for each row: a key's
    backlog is thousands of rows. The statuses are written out, as the index's condition is,
    so that SQLite reads that index too (it does not match a partial index to a bound
    parameter).
    """
    connection = connections[alias]
    quote = connection.ops.quote_name
    keys, params = (
        rows.order_by()
        .values("subscription", "ordering_key")
        .distinct()
        .query.get_compiler(alias)
        .as_sql()
    )
    table = quote(Delivery._meta.db_table)
    column = {f.name: quote(str(f.column)) for f in Delivery._meta.concrete_fields}
    subscription, key, number = column["subscription"], column["ordering_key"], column["sequence"]
    finished = ", ".join("'" + status + "'" for status in FINISHED)  # our constants
    first = (
        f"SELECT u.{column['id']} FROM {table} u WHERE u.{subscription} = k.{subscription} "
        f"AND u.{key} = k.{key} AND u.{number} IS NOT NULL "
        f"AND NOT (u.{column['status']} IN ({finished})) ORDER BY u.{number} LIMIT 1"
    )
    return RawSQL(f"SELECT ({first}) FROM ({keys}) k", params)


def claim(alias: str, event_id: UUID, subscription: str) -> Claim:
    """Decide whether the delivery of ``event_id`` may run now (see the module docstring).

    Its turn is read without a lock, with the row, in one query: every earlier delivery of
    the key finished (committed) stays finished, and a later one that looks now sees this
    one unfinished. Only holding locks the key's turn, so that the worker finishing the
    delivery before it cannot miss the hold. On PostgreSQL the query also takes the lock of
    the run it lets go (`RunLock`): a `Turn.RUN` claim's is the caller's to release, through
    `finish` or `end_run`.
    """
    connection = connections[alias]
    lock_id = _run_lock_id(event_id, subscription) if locks_runs(alias) else None
    locked: bool | None = None  # whether the lock was taken (None: not tried)
    row: tuple[str | None, int | None, str, bool] | None
    if connection.vendor == "postgresql":
        turn = _turn(alias, event_id, subscription, lock_id)
        row, locked = (None, None) if turn is None else (turn[:4], turn[4])
    else:
        row = (
            Delivery.objects.using(alias)
            .filter(event_id=event_id, subscription=subscription)
            .annotate(waits=Exists(_unfinished_before(alias, subscription)))
            .values_list("ordering_key", "sequence", "status", "waits")
            .first()
        )
    if row is None or row[1] is None:  # published before the subscription was ordered
        return Claim(Turn.RUN)
    key, number, status, waits = row
    assert key is not None
    assert number is not None
    if status in FINISHED:
        return Claim(Turn.DONE, key)
    if not waits:
        return _run_turn(alias, key, lock_id, locked)
    with transaction.atomic(using=alias):
        _lock(alias, subscription, key)
        held = _hold(alias, event_id, subscription, key, number)
    if held:
        return Claim(Turn.HELD, key)
    if lock_id is not None:  # after the commit: a transaction that failed leaves it untaken
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [lock_id])
            locked = cursor.fetchone()[0]
    return _run_turn(alias, key, lock_id, locked)


def _turn(
    alias: str, event_id: UUID, subscription: str, lock_id: int | None
) -> tuple[str | None, int | None, str, bool, bool | None] | None:
    """`postgresql.turn`: outside a transaction (a worker) through migration 0013's function,
    whose plan PostgreSQL keeps; inside one, or before that migration, the statement."""
    connection = connections[alias]
    if not connection.in_atomic_block:  # a missing function would break the transaction
        try:
            return postgresql.ordered_turn(connection, event_id, subscription, lock_id)
        except ProgrammingError as exc:
            if not postgresql.is_missing_function(exc):
                raise
            _warn_missing_function(alias, "0013", "read their turn")
    return postgresql.turn(connection, event_id, subscription, FINISHED, lock_id)


def _hold(alias: str, event_id: UUID, subscription: str, key: str, number: int) -> bool:
    """Mark the delivery held if an earlier one of its key (numbered before ``number``) is
    still unfinished: it may have finished since the claim's read. Whether it did.

    Inside a transaction that locked the key's turn (`_lock`). On PostgreSQL one statement
    written by hand: building and compiling it through the ORM was more than half of the
    claim's CPU for a message held (a py-spy profile of figure 16's one key, where nearly
    every message is held).
    """
    connection = connections[alias]
    now = timezone.now()
    if connection.vendor == "postgresql":
        return postgresql.hold(connection, event_id, subscription, key, number, FINISHED, now)
    return _held_if_waiting(alias, event_id, subscription, key, number, now)


def _held_if_waiting(
    alias: str, event_id: UUID, subscription: str, key: str, number: int, now: datetime
) -> bool:
    """`postgresql.hold` through the ORM."""
    earlier = Exists(_unfinished_before(alias, subscription, key, number))
    rows = Delivery.objects.using(alias).filter(event_id=event_id, subscription=subscription)
    held = rows.filter(earlier).update(status=Delivery.Status.HELD, updated_at=now, retry_at=None)
    return bool(held)


def _run_turn(alias: str, key: str, lock_id: int | None, locked: bool | None) -> Claim:
    """The claim of a delivery whose turn it is: run it, unless another worker's claim holds
    its run's lock (``lock_id``, None: no lock on this database; ``locked``: taken here)."""
    if lock_id is None:
        return Claim(Turn.RUN, key)
    if not locked:
        return Claim(Turn.RUNNING, key)
    return Claim(Turn.RUN, key, RunLock(alias, lock_id, connections[alias].connection))


def end_run(claim: Claim) -> None:
    """Release the lock of ``claim``'s run unless `finish` did (its handler failed, it was
    skipped, its outcome could not be recorded). A no-op without one.

    A lock left held would make every later copy of the delivery, its retries included, look
    running (on a connection kept for the next delivery): if it cannot be released, the
    connection is closed, which releases it.
    """
    run = claim.lock
    lock_id = None if run is None else run.to_release()
    if run is None or lock_id is None:
        return
    connection = connections[run.alias]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [lock_id])
    except DatabaseError:
        logger.warning(
            "Cannot release the lock of an ordered delivery's run; closing its connection",
            exc_info=True,
            extra=log_extra(),
        )
        connection.close()
    run.held = False


def _unfinished_before(
    alias: str, subscription: str, key: str | None = None, number: int | None = None
) -> QuerySet[Delivery]:
    """The unfinished deliveries of the key numbered before ``number``; without them, before
    the row of the outer query (`claim`'s)."""
    outer = {"ordering_key": OuterRef("ordering_key"), "sequence__lt": OuterRef("sequence")}
    where = outer if key is None else {"ordering_key": key, "sequence__lt": number}
    return (
        Delivery.objects.using(alias)
        .filter(subscription=subscription, **where)
        .exclude(status__in=FINISHED)
    )


def finish(
    alias: str,
    event_id: UUID,
    subscription: str,
    row: Delivery | None = None,
    key: str | None = None,
    run: RunLock | None = None,
) -> None:
    """Record a delivery's outcome ``row`` and hand its key on, in one transaction.

    The key's turn is locked before the row is written, as `claim` locks it before its
    writes: the same order everywhere, so no two workers wait on each other. Without ``row``
    (inside a transaction that recorded the outcome already: an idempotent run) only hands
    on. ``key``: the delivery's, as `claim` returned it (read here if None). The next
    delivery's message is sent after the commit. On PostgreSQL outside a transaction all of
    it is one statement (figure 16), which also releases the run's lock ``run``, as claimed
    (in a transaction, the key's lock's statement does).
    """
    if key is None:
        key = (
            Delivery.objects.using(alias)
            .filter(event_id=event_id, subscription=subscription)
            .values_list("ordering_key", flat=True)
            .first()
        )
    connection = connections[alias]
    if key is None:  # published before the subscription was ordered: nothing to hand on
        if row is not None:
            save_deliveries(alias, [row])
        return
    if row is not None and connection.vendor == "postgresql" and not connection.in_atomic_block:
        due = timezone.now() + timedelta(seconds=HAND_ON_GRACE)
        lock_id = _lock_id(subscription, key)
        unlock = None if run is None else run.to_release()
        try:
            handed = postgresql.finish_ordered(connection, row, key, lock_id, due, unlock)
        except ProgrammingError as exc:
            if not postgresql.is_missing_function(exc):
                raise
            # Nothing was written (one statement in autocommit): the transaction below does
            # the same, slower.
            _warn_missing_function(alias, "0011", "are recorded")
        else:
            if run is not None:
                run.held = False
            _send_handed(alias, subscription, handed, due)
            return
    with transaction.atomic(using=alias):
        _lock(alias, subscription, key, run)
        if row is not None:
            save_deliveries(alias, [row])
        transaction.on_commit(_hand_on(alias, subscription, key), using=alias)


@cache  # once a process, database and migration
def _warn_missing_function(alias: str, migration: str, slower: str) -> None:
    logger.error(
        "Run %s: django_events migration %s is not applied on database %r; ordered "
        "deliveries %s the slower way until it is",
        migrate_command(alias),
        migration,
        alias,
        slower,
        extra=log_extra(),
    )


def _hand_on(alias: str, subscription: str, key: str) -> Callable[[], None]:
    """If the key's first unfinished delivery is held, make it pending; return what sends it
    once the transaction commits.

    Inside a transaction that locked the key's turn (`_lock`). The row is due for events_relay
    in `HAND_ON_GRACE` seconds in case this process never sends it; a sent message clears
    that. Only a row still held is handed on: a worker running a duplicate of its message (no
    key lock while it runs) may have finished it since; it is not made pending again nor
    resent.
    """
    handed, due = _head_to_pending(alias, subscription, key)
    return partial(_send_handed, alias, subscription, handed, due)


def _head_to_pending(alias: str, subscription: str, key: str) -> tuple[int | None, datetime]:
    """Make the key's first unfinished delivery pending if it is held, due for events_relay
    in `HAND_ON_GRACE` seconds: the id of the row it changed (if any), and that due time."""
    connection = connections[alias]
    now = timezone.now()
    due = now + timedelta(seconds=HAND_ON_GRACE)
    if connection.vendor == "postgresql":
        return postgresql.hand_on(connection, subscription, key, FINISHED, due, now), due
    return _held_to_pending(alias, subscription, key, due, now), due


def _send_handed(alias: str, subscription: str, pk: int | None, due: datetime) -> None:
    """Send the delivery ``pk`` a committed hand-on made pending (None: none was), or keep it
    for the task that made it (`hand_ons_kept`)."""
    if pk is None:
        return
    handed = HandedOn(alias, subscription, pk, due)
    kept = _kept_hand_ons.get()
    if kept is not None:
        kept.append(handed)
        return
    send_handed_on(handed)


def send_handed_on(handed: HandedOn) -> None:
    """Send the message of a handed-on delivery."""
    read = _read_handed_on(handed)
    if read is not None:
        _send(handed.alias, handed.subscription, handed.pk, *read, handed.due)


def handed_on_message(handed: HandedOn) -> dict[str, Any] | None:
    """The message a handed-on delivery would be sent (None: it cannot be read, logged)."""
    from django_events.delivery import broker

    read = _read_handed_on(handed)
    if read is None:
        return None
    record, runs = read
    return broker.delivery_message(event_of(record), handed.subscription, handed.alias, runs)


def _read_handed_on(handed: HandedOn) -> tuple[EventRecord, PriorRuns] | None:
    extra = {**log_extra(None, handed.subscription), "delivery_id": handed.pk}
    unread = "Cannot read a handed-on delivery; events_relay sends it"
    try:  # with its event record: what the hand-on sends
        read = _handed_on(handed.alias, handed.pk)
    except DatabaseError:
        logger.warning(unread, exc_info=True, extra=extra)
        return None
    if read is None:  # deleted meanwhile
        logger.warning(unread, extra=extra)
    return read


def _handed_on(alias: str, pk: int) -> tuple[EventRecord, PriorRuns] | None:
    """The event record of the delivery ``pk`` and its runs so far: what its message needs.

    One raw query, not ``select_related``: compiling that costs twice the whole read, on the
    path from one delivery of a key to the next (figure 16's one key).
    """
    quote = connections[alias].ops.quote_name
    columns = {f.name: quote(str(f.column)) for f in Delivery._meta.concrete_fields}
    sql = (
        f"SELECT e.*, d.{columns['attempts']} AS handed_attempts, d.{columns['uncounted']} "
        f"AS handed_uncounted FROM {quote(Delivery._meta.db_table)} d "
        f"JOIN {quote(EventRecord._meta.db_table)} e "
        f"ON e.{quote(str(EventRecord._meta.pk.column))} = d.{columns['event']} "
        f"WHERE d.{columns['id']} = %s"
    )
    for record in EventRecord.objects.using(alias).raw(sql, [pk]):
        runs = vars(record)  # the query's extra columns
        return record, PriorRuns(runs["handed_attempts"], runs["handed_uncounted"])
    return None


def _held_to_pending(
    alias: str, subscription: str, key: str, due: datetime, now: datetime
) -> int | None:
    """`postgresql.hand_on` through the ORM: the id of the row it made pending, if any."""
    first = first_unfinished(alias, subscription, key)
    if first is None or first[1] != Delivery.Status.HELD:
        return None
    handed = (
        Delivery.objects.using(alias)
        .filter(pk=first[0], status=Delivery.Status.HELD)
        .update(status=Delivery.Status.PENDING, retry_at=due, updated_at=now)
    )
    return first[0] if handed else None


def release(alias: str, keys: Sequence[tuple[str, str]]) -> int:
    """Hand on ``keys``, (subscription, key) pairs, as a finish does: those of deliveries just
    marked resolved, or whose first unfinished delivery is held with nothing before it to
    hand it on (a pause's hold that a resume could not see). How many deliveries it made
    pending; each is sent once its hand-on commits."""
    handed = 0
    for subscription, key in sorted(set(keys)):
        with transaction.atomic(using=alias):
            _lock(alias, subscription, key)
            head, due = _head_to_pending(alias, subscription, key)
            send = partial(_send_handed, alias, subscription, head, due)
            transaction.on_commit(send, using=alias)
        handed += head is not None
    return handed


def _send(
    alias: str,
    subscription_name: str,
    pk: int,
    record: EventRecord,
    runs: PriorRuns,
    due: datetime,
) -> None:
    """Send the message of the handed-on delivery ``pk`` (of ``record``, ``runs`` so far);
    once the broker has it, its relay due time ``due`` is cleared: the relay need not send it.

    Where events are marked dispatched in the background (`marking.marks_later`), the send
    waits neither for the broker's confirm nor for that ``UPDATE``: the marker clears it once
    the confirm comes, and the key's next delivery can start meanwhile (figure 16's one key).
    A message refused or never confirmed leaves the row due, for events_relay.
    """
    from django_events.delivery import broker

    registry = get_registry()
    subscription = registry.subscriptions.get(subscription_name)
    extra = {**log_extra(None, subscription_name), "event_id": str(record.pk)}
    compiled = registry.events.get(record.name)
    if subscription is None or compiled is None:
        logger.error("Cannot hand on the delivery: no longer declared", extra=extra)
        return
    items = [(event_of(record), compiled.declaration.durable, [subscription])]
    prior = {(record.pk, subscription_name): runs}
    later = subscription.via != "tasks" and marks_later(alias)
    if subscription.via == "tasks":
        from django_events.delivery import tasks_backend

        unsent = tasks_backend.send_deliveries(items, alias, prior_attempts=prior)
    elif later:
        hand_on = {record.pk: (pk, due)}
        unsent = broker.send_deliveries(
            items, alias, prior_attempts=prior, marker=marker(), hand_ons=hand_on
        ).ids
    else:
        unsent = broker.send_deliveries(items, alias, prior_attempts=prior).ids
    if unsent:
        logger.warning(
            "The broker did not take a handed-on delivery; events_relay sends it", extra=extra
        )
        return
    if later:
        return
    try:
        clear_due(alias, [(pk, due)])
    except DatabaseError:
        logger.exception("Sent, but could not clear its relay due time", extra=extra)
