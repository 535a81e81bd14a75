"""``publish()`` and ``publish_many()``: validate, record in the caller's transaction,
deliver on commit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from os import urandom
from typing import Any, TypeVar, overload
from uuid import UUID

from asgiref.sync import sync_to_async
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS, connections, router, transaction

from django_events.delivery import endpoints, ordering
from django_events.delivery.dispatch import Outgoing, Sender, accepted, dispatch, run_sync
from django_events.delivery.execution import run_handler
from django_events.delivery.recording import insert_records
from django_events.events import Event, current_event
from django_events.exceptions import InterceptorError, InvalidPayload, UnknownEvent
from django_events.interceptors.base import run_send
from django_events.models import EventRecord
from django_events.wiring.compiled import Registry, Subscription
from django_events.wiring.registry import get_registry

_Payload = TypeVar("_Payload")


@overload
def publish(
    event: str,
    payload: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
) -> Event: ...
@overload
def publish(
    event: _Payload,
    payload: None = None,
    *,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
) -> Event[_Payload]: ...


def publish(
    event: Any,
    payload: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
) -> Event:
    """Publish one event: by name with a payload dict, or an instance of an ``@event`` class.

    An instance is its own payload: passing a ``payload`` with it raises ``TypeError``.

    Raises ``UnknownEvent``, ``InvalidPayload`` or ``InterceptorError`` (an interceptor's
    ``send`` raised); nothing is recorded or sent then.
    Inline handlers run now; sync and async deliveries run after the transaction on
    ``using`` commits (at once outside a transaction).
    """
    registry = get_registry()
    try:
        outgoing = _prepare(registry, event, payload, headers)
        _enqueue(registry, [outgoing], using)
    except SynchronousOnlyOperation as exc:
        raise _in_async_code(exc) from exc
    return outgoing.event


def publish_many(items: Iterable[Any], *, using: str | None = None) -> list[Event]:
    """Publish several events with one bulk insert and one on-commit hook.

    Each item is an ``@event`` instance, or a ``(name, payload)`` or
    ``(name, payload, headers)`` tuple (``(instance, None, headers)`` for an instance with
    headers). Every item is validated before anything happens: an ``InvalidPayload``,
    ``UnknownEvent``, ``InterceptorError`` or ``TypeError`` (a malformed item, headers that
    are not strings) names the item by its index.
    """
    registry = get_registry()
    try:
        batch = _prepare_all(registry, items)
        _enqueue(registry, batch, using)
    except SynchronousOnlyOperation as exc:
        raise _in_async_code(exc) from exc
    return [o.event for o in batch]


def _prepare_all(registry: Registry, items: Iterable[Any]) -> list[Outgoing]:
    batch: list[Outgoing] = []
    try:
        for item in items:
            batch.append(_prepare(registry, *_unpack(item)))
    except (InvalidPayload, UnknownEvent, InterceptorError, TypeError) as exc:
        # Items often share an event name: say which one (an index, as items may be a
        # generator). Still the exception raised, with its attributes (name, problems).
        exc.args = (f"publish_many() item at index {len(batch)}: {exc}",)
        raise
    return batch


def _in_async_code(exc: SynchronousOnlyOperation) -> SynchronousOnlyOperation:
    """Django's refusal of the database in async code, with what to call there instead."""
    return SynchronousOnlyOperation(
        f"{exc} In async code (an async view, a coroutine) publish with `await apublish(...)` "
        "or `await apublish_many(...)`, which run publish() where Django runs sync code."
    )


@overload
async def apublish(
    event: str,
    payload: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
) -> Event: ...
@overload
async def apublish(
    event: _Payload,
    payload: None = None,
    *,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
) -> Event[_Payload]: ...


async def apublish(
    event: Any,
    payload: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    using: str | None = None,
) -> Event:
    """``publish()`` for async code (an ``async def`` view or consumer): same arguments,
    validation, errors and semantics.

    It runs ``publish()`` in the thread where Django runs this context's sync code
    (``sync_to_async``): Django's transactions are synchronous, so outside one (the usual
    case in async code) deliveries run at once, before it returns, as with ``publish()``.
    """
    return await _publish_in_thread(event, payload, headers=headers, using=using)


async def apublish_many(items: Iterable[Any], *, using: str | None = None) -> list[Event]:
    """``publish_many()`` for async code (see :func:`apublish`)."""
    return await _publish_many_in_thread(list(items), using=using)


_publish_in_thread = sync_to_async(publish, thread_sensitive=True)
_publish_many_in_thread = sync_to_async(publish_many, thread_sensitive=True)


def _unpack(item: Any) -> tuple[Any, Any, Any]:
    if not isinstance(item, tuple):
        return item, None, None
    if len(item) not in (2, 3):
        raise TypeError(f"publish_many() items are (name, payload[, headers]), got {item!r}")
    return item[0], item[1], item[2] if len(item) == 3 else None


def _prepare(registry: Registry, event: Any, payload: Any, headers: Any) -> Outgoing:
    compiled = registry.resolve(event)
    if not isinstance(event, str) and payload is not None:
        # Not quoted: the payload may hold values the declaration redacts.
        raise TypeError(
            f"Event {compiled.name!r}: the {type(event).__name__} instance is the payload, "
            f"so no payload argument is taken (got {type(payload).__name__}); publish the "
            f"instance alone, or the name {compiled.name!r} with a payload dict"
        )
    given = payload if isinstance(event, str) else event
    data = compiled.to_data({} if given is None else given)
    if headers is None:
        header_dict: dict[str, str] = {}
    elif isinstance(headers, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        header_dict = dict(headers)
    else:
        raise TypeError(f"headers of {compiled.name!r} must map str to str, got {headers!r}")
    event_id = new_event_id()
    parent = current_event()
    new = Event(
        event_id,
        compiled.name,
        compiled.typed_payload(data, given),
        header_dict,
        registry.now(),
        parent.correlation_id if parent else event_id,
        parent.id if parent else None,
        data,
        compiled.declaration.version,
    )
    if registry.interceptors:
        run_send(registry.interceptors, new)
    sync: Sequence[Subscription] = compiled.sync
    async_: Sequence[Subscription] = compiled.async_
    tasks: Sequence[Subscription] = compiled.tasks
    if compiled.has_filters:  # else every subscription gets the event: no `when` to run
        sync, async_, tasks = accepted(sync, data), accepted(async_, data), accepted(tasks, data)
    hooks = _outlet.endpoints_for(compiled.name)  # webhook endpoints registered at run time
    if hooks:
        async_ = [*async_, *(h for h in hooks if h.via != "tasks")]
        tasks = [*tasks, *(h for h in hooks if h.via == "tasks")]
    return Outgoing(
        event=new,
        compiled=compiled,
        sync=sync,
        async_=async_,
        # An ordered delivery's row (its place in line) refers to the record.
        recorded=compiled.records_all or (compiled.has_ordered and _any_ordered(async_, tasks)),
        tasks=tasks,
    )


def _any_ordered(*groups: Sequence[Subscription]) -> bool:
    return any(s.declaration.ordering_key is not None for g in groups for s in g)


# uuid4()'s version and variant bits: version 4 (random), the RFC 4122 variant.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (4 << 76) | (0x8000 << 48)


def new_event_id() -> UUID:
    """A new random event id: what ``uuid4()`` returns, built the way it builds it (16 bytes
    of ``os.urandom``, the version and variant bits set) but through ``UUID(int=...)``, whose
    argument checks cost half of ``UUID(bytes=..., version=4)``'s (figure 1)."""
    return UUID(int=int.from_bytes(urandom(16)) & _UUID4_CLEAR | _UUID4_SET)


@dataclass(frozen=True)
class Outlet:
    """Where ``publish()`` hands what it validated: the one seam `django_events.testing` swaps.

    ``capture`` takes each batch instead of recording and delivering it; ``send`` replaces
    the broker for async deliveries (returns the ids of events it did not take); ``robust``
    is ``on_commit(robust=...)``: false lets a delivery's failure raise where the commit was;
    ``endpoints_for`` gives the webhook endpoints registered at run time that receive an event
    (a capture, which sends nothing, asks for none: it needs no database).
    """

    capture: Callable[[Sequence[Outgoing], str], None] | None = None
    endpoints_for: Callable[[str], Sequence[Subscription]] = endpoints.for_event
    send: Sender | None = None
    robust: bool = True


_outlet = Outlet()


@contextmanager
def use_outlet(**changes: Any) -> Iterator[Outlet]:
    """Change the outlet's fields (`Outlet`) in this block (not thread-safe: tests only).

    The fields left out stay as the enclosing block set them: a capture inside which
    `events_eager` is entered still captures, whichever was entered first.
    """
    global _outlet
    previous = _outlet
    _outlet = replace(previous, **changes)
    try:
        yield _outlet
    finally:
        _outlet = previous


def _tasks_in_transaction(alias: str) -> bool:
    from django_events.delivery import tasks_backend

    return tasks_backend.enqueues_in_transaction(alias)


def _enqueue(registry: Registry, batch: list[Outgoing], using: str | None) -> None:
    # Without DATABASE_ROUTERS that is the default database: not asked on each publish.
    alias = using or (router.db_for_write(EventRecord) if router.routers else DEFAULT_DB_ALIAS)
    outlet = _outlet
    if outlet.capture is not None:  # django_events.testing.captured_events()
        outlet.capture(batch, alias)
        return
    if _all_or_nothing(batch, alias):
        with transaction.atomic(using=alias):
            _record_and_hook(registry, batch, alias, outlet)
    else:
        _record_and_hook(registry, batch, alias, outlet)


def _all_or_nothing(batch: list[Outgoing], alias: str) -> bool:
    """Whether publishing ``batch`` needs a transaction (or savepoint) of its own to happen
    whole or not at all.

    With inline handlers, always: one that raises undoes the writes of those that ran before
    it and the publish's own. Outside a transaction, with more than one write to commit
    together: an ordered delivery's number and row (its gate stays locked until its row is
    there, or a later number could run first), task rows beside their record.
    """
    writes = False
    for item in batch:
        if item.compiled.inline:
            return True
        writes = writes or item.compiled.has_ordered or bool(item.tasks)
    return writes and not connections[alias].in_atomic_block


def _record_and_hook(registry: Registry, batch: list[Outgoing], alias: str, outlet: Outlet) -> None:
    records: list[tuple[Event, str]] = []
    in_line: list[tuple[Event, list[Subscription]]] = []  # ordered deliveries to number
    deferred: list[Outgoing] = []
    sends = False  # whether a deferred item has async deliveries
    inline = False  # whether an item has inline subscriptions
    in_transaction: list[tuple[Event, bool, Sequence[Subscription]]] = []
    # One plain loop: this runs for every publish(), mostly with a batch of one.
    for item in batch:
        if item.compiled.inline:
            inline = True
        if item.compiled.has_ordered:
            line = ordering.ordered([*item.async_, *item.tasks])
            if line:
                in_line.append((item.event, line))
        if item.tasks and _tasks_in_transaction(alias):
            # The task rows go in the caller's transaction, beside the event record.
            in_transaction.append((item.event, item.compiled.declaration.durable, item.tasks))
            item.tasks = []
        if item.recorded:
            pending = item.async_ or item.tasks
            status = EventRecord.Status.PENDING if pending else EventRecord.Status.DISPATCHED
            records.append((item.event, status))
        if item.async_ or item.tasks:
            deferred.append(item)
            sends = True
        elif item.sync:
            deferred.append(item)
    deliver: Callable[[], None] | None = None
    if deferred:
        deliver = (
            partial(dispatch, deferred, alias, outlet.send)
            if sends
            else partial(run_sync, deferred, alias)  # nothing to send first (figure 1)
        )
    if inline:
        # In this publish's own atomic block (`_all_or_nothing`), so the deliveries' hook can
        # go first: a hook of an inline handler's that raises at commit cannot keep it from
        # running. (Outside an atomic block a hook runs at once: after the records, below.)
        if deliver is not None:
            transaction.on_commit(deliver, using=alias, robust=outlet.robust)
            deliver = None
        for item in batch:
            for subscription in accepted(item.compiled.inline, item.event.data):
                run_handler(subscription, item.event, registry.interceptors)
    if records:
        insert_records(alias, records)
    if in_line:
        ordering.assign(alias, in_line)
    if in_transaction:
        from django_events.delivery import tasks_backend

        tasks_backend.enqueue(in_transaction, alias)
    if deliver is not None:
        transaction.on_commit(deliver, using=alias, robust=outlet.robust)
