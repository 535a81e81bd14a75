"""The compiled registry: events and subscriptions ready for the hot path."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from difflib import get_close_matches
from functools import cached_property
from types import FunctionType, MethodType
from typing import Any, cast

from asgiref.sync import iscoroutinefunction
from django.utils.module_loading import import_string

from django_events.conf import conf
from django_events.events import Event
from django_events.exceptions import InvalidPayload, NewerVersion, PayloadProblem, UnknownEvent
from django_events.wiring import typed
from django_events.wiring.declarations import (
    EventDeclaration,
    Problem,
    RetryPolicy,
    SourceDeclaration,
    SubscriptionDeclaration,
)
from django_events.wiring.filters import Predicate
from django_events.wiring.redaction import redact_text, stale_payload_error
from django_events.wiring.upcasting import Chain, Upcaster, invalid_result, resolve_chain, run_chain
from django_events.wiring.validation import PayloadValidator, json_problems, plain_json_copy

Handler = Callable[[Event], Any]
WEBHOOK_SENDER = "django_events.delivery.webhooks.sender_for"  # (subscription) -> handler


def exchange_name(queue: str) -> str:
    """The fanout exchange of the broadcast subscriptions on ``queue``."""
    return f"{queue}.broadcast"


class HandlerImportError(ImportError):
    """A subscription's handler path does not import or is not callable."""


class HandlerWithoutHandle(HandlerImportError):
    """A handler class that has no ``handle(self, event)`` method."""


class HandlerInitError(HandlerImportError):
    """A handler class that cannot be instantiated with no arguments (its ``__init__`` raised)."""


@dataclass(eq=False)
class Subscription:
    """A subscription ready to run: filter compiled, retry policy merged, handler lazy."""

    declaration: SubscriptionDeclaration
    retry: RetryPolicy
    accepts: Predicate | None = None
    queue: str = ""  # the declared queue, or DEFAULT_QUEUE as it was at build time
    _handler: Handler | None = field(default=None, repr=False)
    is_async: bool = field(default=False, repr=False)  # known once handler() imported it
    via: str = "celery"  # async deliveries: "celery" or "tasks" (Django's Tasks framework)

    @property
    def name(self) -> str:
        return self.declaration.name

    @property
    def mode(self) -> str:
        return self.declaration.mode

    @property
    def is_queued(self) -> bool:
        """Run by a worker: ``async``, and ``webhook`` (the worker sends the POST)."""
        return self.declaration.mode in ("async", "webhook")

    @property
    def queued_mode(self) -> str:
        """The `Delivery.mode` of a queued subscription's rows: ``webhook`` or ``async``."""
        return "webhook" if self.declaration.mode == "webhook" else "async"

    def handler(self) -> Handler:
        """Import the handler on first use (a class is instantiated once per process)."""
        if self._handler is None and self.mode == "webhook":
            # The sender lives in the delivery layer, which the wiring does not import.
            self._handler = import_string(WEBHOOK_SENDER)(self)
        if self._handler is None:
            handler = resolve_handler(self.declaration.handler)
            self.is_async = is_async_handler(handler)
            self._handler = handler
        return self._handler


@dataclass(eq=False)
class CompiledEvent:
    """An event ready to publish: validator compiled, subscriptions sorted by mode."""

    declaration: EventDeclaration
    validator: PayloadValidator
    inline: tuple[Subscription, ...] = ()
    sync: tuple[Subscription, ...] = ()
    async_: tuple[Subscription, ...] = ()  # async, through Celery
    tasks: tuple[Subscription, ...] = ()  # async, through Django's Tasks framework
    upcasters: dict[int, Upcaster] = field(default_factory=dict, repr=False)  # imported ones
    chains: dict[int, Chain] = field(default_factory=dict, repr=False)  # by version upgraded

    @property
    def name(self) -> str:
        return self.declaration.name

    @property
    def version(self) -> int:
        return self.declaration.version

    def upgrade(
        self, data: dict[str, Any], version: int, *, validate: bool = True
    ) -> dict[str, Any]:
        """Upcast ``data`` of ``version`` to the declared version (raises ``UpcastError``,
        or ``NewerVersion`` for a version this process does not know yet).

        An upcast result is checked against the schema, unless ``validate`` is false: then
        the caller checks every payload once, and `payload_error` says what is wrong.
        """
        declaration = self.declaration
        if version == declaration.version:
            return data
        chain = self.chains.get(version)
        if chain is None:
            if version > declaration.version:
                raise NewerVersion(declaration.name, version, declaration.version)
            chain = resolve_chain(
                declaration.name, version, declaration.version, declaration.upcast, self.upcasters
            )
            self.chains[version] = chain
        return run_chain(
            declaration.name, data, chain, self.validator.problems if validate else None
        )

    def payload_error(self, version: int, problems: list[PayloadProblem]) -> str:
        """The recorded error of a payload of ``version`` whose current form (`upgrade` with
        ``validate`` false) has schema ``problems`` (masked by path: `PayloadValidator.problems`
        with the ``redact`` list): the last upcaster it went through is named; a payload as
        stored is stale (`stale_payload_error`)."""
        declaration = self.declaration
        error = invalid_result(
            declaration.name, version, declaration.version, declaration.upcast, problems
        )
        return stale_payload_error(self.name, problems) if error is None else str(error)

    @property
    def type(self) -> type | None:
        return self.declaration.type

    @cached_property
    def has_ordered(self) -> bool:
        """Whether an async subscription of this event has an ``ordering_key``."""
        return any(s.declaration.ordering_key is not None for s in (*self.async_, *self.tasks))

    @cached_property
    def has_filters(self) -> bool:
        """Whether a subscription of this event has a ``when`` filter."""
        groups = (self.inline, self.sync, self.async_, self.tasks)
        return any(s.accepts is not None for group in groups for s in group)

    @cached_property  # the registry is rebuilt when DJANGO_EVENTS changes
    def records_all(self) -> bool:
        return (self.declaration.record or conf.RECORD) == "all"

    def to_data(self, payload: Any) -> dict[str, Any]:
        """Validate ``payload`` and return its JSON form (raises ``InvalidPayload``)."""
        tp = self.declaration.type
        if tp is not None and isinstance(payload, tp):
            data = typed.to_data(payload)
        elif isinstance(payload, dict):
            data = payload  # copied (below): later changes to the caller's dict must not reach it
        else:
            raise InvalidPayload(self.name, [_not_an_object(payload, tp)])
        redact = self.declaration.redact
        copied = plain_json_copy(data)
        try:
            problems = self.validator.problems(data, redact)
            if not problems and copied is None:
                problems = json_problems(data, redact)
        except RecursionError:  # a schema validator recursing into a payload nested too deep
            problems = json_problems(data, redact) or [
                PayloadProblem("$", "nested too deep to validate")
            ]
        if problems:
            raise InvalidPayload(self.name, problems)
        if data is not payload:  # a typed payload's JSON form, made here
            return data
        if copied is None:  # JSON all the same (tuples, say): JSON's round trip copies it
            copied = json.loads(json.dumps(data))
        snapshot: dict[str, Any] = copied
        return snapshot

    def typed_payload(self, data: dict[str, Any], given: Any = None) -> Any:
        """Return what handlers get as ``event.payload``.

        ``given`` is what ``publish()`` was given (an instance, or a dict): a string of it
        that does not parse as its dataclass field's type raises ``InvalidPayload``. A stored
        payload (no ``given``) is rebuilt as it is.
        """
        if self.type is None:
            return data
        if given is not None:  # here, not in to_data(): an event without a type skips it
            problems = typed.unparsed(self.type, data, self.declaration.redact)
            if problems:
                raise InvalidPayload(self.name, problems)
            if isinstance(given, self.type):
                return given
        try:
            return typed.from_data(self.type, data)
        except (TypeError, ValueError) as exc:  # a validator or __post_init__ of the class
            redact = self.declaration.redact
            problems = [
                PayloadProblem(path, redact_text(message, data, redact))
                for path, message in typed.problems_of(exc)
            ]
            raise InvalidPayload(self.name, problems) from exc


def _not_an_object(payload: Any, tp: type | None) -> PayloadProblem:
    expected = f"a dict or {tp.__qualname__}" if tp else "a dict"
    return PayloadProblem("$", f"expected {expected}, got {type(payload).__name__}")


@dataclass
class Registry:
    """Everything declared, merged; ``problems`` lists what is wrong with it."""

    events: dict[str, CompiledEvent] = field(default_factory=dict)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    interceptors: list[Any] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # the manifest files read
    inbound_sources: dict[str, SourceDeclaration] = field(default_factory=dict)  # `sources:`
    # The zone of `occurred_at`, as `timezone.now()` gives it: UTC, or None (local time)
    # without USE_TZ. Read when the registry is built (a change of USE_TZ rebuilds it): the
    # setting's lookup would be a tenth of a publish() (figure 1).
    clock: tzinfo | None = UTC
    # What the system checks read when a manifest has a schema error (E103): this registry
    # plus that file's declarations that match the schema, so their own problems are
    # reported in the same run; publishing uses none of that file's declarations.
    checked: Registry | None = field(default=None, repr=False)

    def now(self) -> datetime:
        """``timezone.now()``, with USE_TZ as it was when this registry was built."""
        return datetime.now(self.clock)

    def event(self, name: str) -> CompiledEvent:
        """Return the compiled event ``name`` (raises ``UnknownEvent``)."""
        try:
            return self.events[name]
        except KeyError:
            raise UnknownEvent(name, self._unknown_detail(name)) from None

    def _unknown_detail(self, name: str) -> str:
        """What may explain an unknown event: a close name, or declarations left out."""
        parts = [f"Did you mean {m!r}?" for m in get_close_matches(name, self.events, n=1)]
        errors = [p for p in self.problems if p.is_error]
        if errors:
            parts.append(
                f"The configuration has {len(errors)} error(s), and a declaration with an "
                f"error is left out (the first: {errors[0]}): run manage.py events_check."
            )
        return " ".join(parts)

    def resolve(self, name_or_instance: Any) -> CompiledEvent:
        """Find the event for a name or an instance of an ``@event`` class."""
        if isinstance(name_or_instance, str):
            return self.event(name_or_instance)
        declaration = typed.declaration_of(type(name_or_instance))
        if declaration is not None:
            return self.event(declaration.name)
        for compiled in self.events.values():  # a manifest's `type:` class
            if compiled.type is type(name_or_instance):
                return compiled
        if isinstance(name_or_instance, type):
            raise TypeError(
                f"Publish an instance of {name_or_instance.__name__}, not the class itself: "
                f"publish({name_or_instance.__name__}(...))"
            )
        if name_or_instance is None or isinstance(
            name_or_instance, (Mapping, list, tuple, bytes, int, float)
        ):  # the name left out (a payload first), or a value that is none
            raise TypeError(
                "The event to publish is its name (str) or an instance of an @event class "
                f"(or a manifest's type:), got {type(name_or_instance).__name__}"
            )
        raise UnknownEvent(
            repr(type(name_or_instance)),
            "Its class is neither an @event class nor the type: of a declared event.",
        )

    def queues(self) -> list[str]:
        """Queues a worker must consume to run every async subscription."""
        return sorted({s.queue for s in self.subscriptions.values() if s.is_queued})


def is_async_handler(handler: Handler) -> bool:
    """Whether calling ``handler`` returns a coroutine: ``async def`` (or ``handle``)."""
    if iscoroutinefunction(handler):
        return True
    if isinstance(handler, FunctionType | MethodType):
        return False
    return iscoroutinefunction(type(handler).__call__)  # an instance with async def __call__


def resolve_handler(path: str) -> Handler:
    """Import a handler: a function ``f(event)`` or a class with ``handle(self, event)``."""
    try:
        target = import_string(path)
    except ImportError as exc:
        raise HandlerImportError(f"Handler {path!r} does not import: {exc}") from exc
    except Exception as exc:  # its module raised while importing: it does not import either
        raise HandlerImportError(
            f"Handler {path!r} does not import: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(target, type):
        handle = getattr(target, "handle", None)
        if not callable(handle):
            raise HandlerWithoutHandle(f"Handler class {path!r} has no handle(self, event) method")
        try:
            instance = target()
        except Exception as exc:  # whatever its __init__ raised: kept as the cause
            raise HandlerInitError(
                f"Handler class {path!r} cannot be instantiated with no arguments: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        handler: Handler = instance.handle
        return handler
    if not callable(target):
        raise HandlerImportError(f"Handler {path!r} is not callable")
    return cast(Handler, target)
