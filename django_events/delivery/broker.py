"""Handing async deliveries to Celery: one task message per (event, subscription)."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit
from uuid import UUID

from django.utils.module_loading import import_string

from django_events.conf import conf
from django_events.delivery import broadcast, webhooks
from django_events.delivery.confirms import PublisherConfirms
from django_events.delivery.marking import HandOns, Marker, Marks
from django_events.delivery.messages import (
    NO_RUNS,
    TASK_NAME,
    PriorRuns,
    build_message,
    event_body,
    summary,
)
from django_events.delivery.sealing import seal_event
from django_events.events import Event
from django_events.logs import batch_log_extra, log_extra
from django_events.wiring.compiled import Subscription
from django_events.wiring.registry import get_registry

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger("django_events.broker")

# Seconds of extra hard limit after a subscription's soft ``timeout``.
HARD_LIMIT_GRACE = 5.0
# Phases of a webhook call its ``timeout`` bounds one by one (connect, send, read).
WEBHOOK_PHASES = 3
# Seconds to wait for the publisher confirms of a batch after its last message: the relay's,
# and a committing publisher's (which is waiting in a request).
CONFIRM_TIMEOUT = 30.0
COMMIT_CONFIRM_TIMEOUT = 5.0


def soft_limit(subscription: Subscription) -> float | None:
    """Celery's soft time limit of a subscription's messages: its ``timeout``.

    A webhook's ``timeout`` (declared or not: the HTTP client's default) bounds each phase of
    the call, and the HTTP client reports one that expires (with the time it took); the limit
    stops a call slower than all its phases together, such as an answer trickled a byte at a
    time, which no phase's timeout ends. Celery's own prefork pool applies a limit to the
    millisecond: equal to the HTTP timeout, it would expire first.
    """
    timeout = subscription.declaration.timeout
    if subscription.mode == "webhook":
        return WEBHOOK_PHASES * (timeout or webhooks.DEFAULT_TIMEOUT) + HARD_LIMIT_GRACE
    return timeout


def delivery_message(
    event: Event, subscription: str, alias: str, prior: PriorRuns = NO_RUNS
) -> dict[str, Any]:
    """The task argument `send_deliveries` sends for one delivery sent again from its row
    (``prior``: the runs it records), its payload sealed where the event redacts fields."""
    return build_message(
        _sealed_body(event), subscription, alias, prior.attempts, True, prior.uncounted
    )


def celery_app() -> Celery | None:
    """The Celery app that sends deliveries: ``CELERY_APP``, else the project's app."""
    path = conf.CELERY_APP
    if path:
        try:
            app: Celery = import_string(path)
        except ImportError:
            if _is_module(path):
                raise ImportError(
                    f"{path!r} is a module: name the Celery app in it, such as {path + '.app'!r}"
                ) from None
            raise
        from celery.local import Proxy

        # `celery.current_app` and the like: the app behind it, which a process's broker state
        # (its outage, its transport) is kept for.
        if issubclass(type(app), Proxy):
            return cast("Proxy[Celery]", app)._get_current_object()
        return app
    # Celery's private state holds every app the process made, the thread's current one and
    # its default one: the project's once Celery's Django fixup ran (the first app made), or
    # an unconfigured fallback Celery makes when asked, which is never the one.
    from celery import _state

    state: Any = _state
    apps: list[Celery] = [a for a in list(state._apps) if not _is_celery_fallback(a)]
    if len(apps) == 1:
        return apps[0]
    # Several: the default one, the same in every thread; else this thread's current one.
    candidates: tuple[Celery | None, ...] = (state.default_app, state._tls.current_app)
    return next((a for a in candidates if a is not None and not _is_celery_fallback(a)), None)


def _is_module(path: str) -> bool:
    try:
        return importlib.util.find_spec(path) is not None
    except ImportError:  # its parent package does not import
        return False


def _is_celery_fallback(app: Any) -> bool:
    """Whether ``app`` is the unconfigured app Celery makes when a current app is asked for
    and none exists (``celery._state._get_current_app``): "default", never current, no fixups."""
    return app.main == "default" and not app.set_as_current and not app.fixups


def _sealed_body(event: Event) -> dict[str, Any]:
    """``event``'s message body (`event_body`), its payload sealed where it redacts fields."""
    compiled = get_registry().events.get(event.name)
    redacted = compiled.declaration.redact if compiled is not None else ()
    return seal_event(event_body(event), redacted)


@dataclass
class _Outage:
    """One Celery app's outage: when its publishers may try the broker next, the interval,
    the fates already logged at ERROR (`BrokerHealth.failed`'s ``sent_again``), the error."""

    next_try: float
    interval: float
    error: BaseException
    told: set[bool] = field(default_factory=set)


class BrokerHealth:
    """Remembers an outage so it is logged once, not once per event: once for the events a
    publisher leaves pending, once for the deliveries not sent again (each says its fate).

    During an outage publishers try the broker at most once per probe interval (from 0.5 s,
    doubling up to 10 s while it lasts); the others leave their events pending at once
    instead of each waiting out a connect timeout against a broker that does not answer. The
    relay always tries. Kept per Celery app (the app that sends): an app's outage, its
    probes, its log lines and its end are its own; another app's sends neither wait for it
    nor end it, even on the same broker.
    """

    first_probe = 0.5
    max_probe = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # An app -> its outage, while it lasts (weak: a dropped app's outage is not taken for
        # a later app that reuses its id).
        self._outages: weakref.WeakKeyDictionary[Celery, _Outage] = weakref.WeakKeyDictionary()

    def reset(self) -> None:
        """Forget every outage (tests)."""
        with self._lock:
            self._outages.clear()

    def is_down(self, app: Celery) -> bool:
        """Whether ``app``'s last send failed (its outage is known)."""
        return app in self._outages

    def may_try(self, app: Celery) -> bool:
        """Whether a publisher should try the broker now (if so, later ones wait)."""
        if not self._outages:  # no outage: every publish passes here, so no lock
            return True
        with self._lock:
            outage = self._outages.get(app)
            if outage is None:
                return True
            now = time.monotonic()
            if now < outage.next_try:
                return False
            outage.next_try = now + outage.interval
            return True

    def failed(
        self,
        exc: BaseException,
        events: Sequence[Event],
        app: Celery,
        *,
        sent_again: bool = False,
    ) -> None:
        """The broker of ``app`` failed a send of ``events``; ``sent_again``: deliveries sent
        again from their rows (a retry, replay or resume, the relay's), whose caller says what
        becomes of them (recorded failed, or left due for the relay), not new events left
        pending. No ``events`` (a connection lost while reading confirms, which its caller
        logs): the outage is noted, and the first send that leaves events behind says so at
        ERROR."""
        with self._lock:
            outage = self._outages.get(app)
            if outage is None:
                outage = _Outage(time.monotonic() + self.first_probe, self.first_probe, exc)
                self._outages[app] = outage
            else:
                outage.interval = min(outage.interval * 2, self.max_probe)
                outage.next_try, outage.error = time.monotonic() + outage.interval, exc
        if events:
            self._report(events, outage, sent_again, tried=True)

    def passed_over(
        self, events: Sequence[Event], app: Celery, *, sent_again: bool = False
    ) -> None:
        """A send of ``events`` not tried (``app``'s probe interval); as `failed`."""
        self._report(events, self._outages.get(app), sent_again, tried=False)

    def _report(
        self, events: Sequence[Event], outage: _Outage | None, sent_again: bool, *, tried: bool
    ) -> None:
        # A resend's failure says "not sent again": the first events a publisher then leaves
        # pending are said at ERROR too, or the log would hide that they wait for the relay.
        # No outage: a send that succeeded ended it since this one was passed over.
        with self._lock:
            first = outage is not None and sent_again not in outage.told
            if outage is not None:
                outage.told.add(sent_again)
        error = outage.error if outage is not None else None
        extra = batch_log_extra(events)
        fate = (
            "delivery(ies) not sent again"
            if sent_again
            else "event(s) stay pending for events_relay"
        )
        if first:
            logger.error(
                "Broker unreachable; %d %s: %s",
                len(events),
                fate,
                error,
                exc_info=error if tried else None,
                extra=extra,
            )
        elif tried:
            logger.debug("Broker still unreachable; %d more %s", len(events), fate, extra=extra)
        else:
            logger.debug("Broker down; %d %s without trying", len(events), fate, extra=extra)

    def succeeded(self, app: Celery) -> None:
        """The broker of ``app`` took a send: its outage, if any, is over."""
        if not self._outages:  # no outage: every send passes here, so no lock
            return
        with self._lock:
            outage = self._outages.pop(app, None)
        if outage is not None:
            logger.warning("Broker reachable again", extra=log_extra())


health = BrokerHealth()


SendItem = tuple[Event, bool, Sequence[Subscription]]  # event, durable, subscriptions


@dataclass(frozen=True)
class Unsent:
    """The events of a send the broker is not known to have taken.

    ``refused``: a message of the event was not published, or the broker refused it (nack):
    no worker gets it from this send. ``unconfirmed``: its messages went out but a confirm
    did not come in time: the broker may hold them, and a worker may still run them.
    """

    refused: frozenset[UUID] = frozenset()
    unconfirmed: frozenset[UUID] = frozenset()

    @property
    def ids(self) -> set[UUID]:
        """Every event of the send not known to be taken."""
        return {*self.refused, *self.unconfirmed}

    def __bool__(self) -> bool:
        return bool(self.refused or self.unconfirmed)


def _refused(items: Sequence[SendItem]) -> Unsent:
    return Unsent(refused=frozenset(event.id for event, _, _ in items))


def send_deliveries(
    items: Sequence[SendItem],
    alias: str,
    *,
    app: Celery | None = None,
    confirm: bool | None = None,
    always_try: bool = False,
    prior_attempts: Mapping[tuple[UUID, str], PriorRuns] | None = None,
    marker: Marker | None = None,
    hand_ons: Mapping[UUID, tuple[int, datetime]] | None = None,
) -> Unsent:
    """Send one message per (event, subscription); return the events not known to be taken.

    With ``confirm`` (default: ``PUBLISHER_CONFIRMS``), the batch waits for the broker's
    publisher confirms (RabbitMQ), so "sent" means "accepted"; events with a message nacked
    or unconfirmed count as unsent (`Unsent` tells the two apart). Never raises: an
    unreachable broker leaves unsent events for the relay. ``always_try`` (the relay) tries
    the broker even during a known outage. ``prior_attempts`` maps (event id, subscription)
    to the runs already recorded, for deliveries sent again (attempts never reset).

    With a ``marker`` (the commit path) the events the broker takes are handed to it, to be
    marked dispatched in the background: with confirms, once they come (the send does not
    wait for them); without, at once. The events returned are those not even published.
    ``hand_ons`` (deliveries an ordered key handed on, by event id: their `Delivery` row's id
    and relay due time): the marker clears those due times instead.
    """
    marks: Marks = alias if hand_ons is None else HandOns(alias, hand_ons)
    sendable, messages, unsealed = _messages(items)
    if not sendable:
        return Unsent(refused=unsealed)
    unsent, deferred = _send_deliveries(
        sendable, messages, alias, app, confirm, always_try, prior_attempts, marker, marks
    )
    if marker is not None and not deferred:
        left = unsent.ids
        marker.taken(marks, [event.id for event, _, _ in sendable if event.id not in left])
    if unsealed:
        return Unsent(unsent.refused | unsealed, unsent.unconfirmed)
    return unsent


def _messages(
    items: Sequence[SendItem],
) -> tuple[list[SendItem], list[dict[str, Any]], frozenset[UUID]]:
    """The items whose event message was built, those messages, and the ids of the events
    whose payload could not be sealed (logged: they stay pending, and the broker is not
    blamed for them).

    Built, and sealed, before the first send: sealing between two sends costs several times
    as much (figure 9).
    """
    sendable: list[SendItem] = []
    messages: list[dict[str, Any]] = []
    unsealed: list[Event] = []
    error: Exception | None = None
    for item in items:
        event = item[0]
        try:
            messages.append(_sealed_body(event))
        except Exception as exc:  # noqa: BLE001 - logged below; the event stays pending
            unsealed.append(event)
            error = error or exc
            continue
        sendable.append(item)
    if error is not None:
        # An empty SECRET_KEY, say: no send can take these events until it is fixed.
        logger.error(
            "Cannot seal the payload of %d event(s) (%s; the first: %s): they stay pending, "
            "for events_relay to send once it can seal them: %s: %s",
            len(unsealed),
            ", ".join(sorted({event.name for event in unsealed})),
            unsealed[0].id,
            type(error).__name__,
            error,
            exc_info=error,
            extra=batch_log_extra(unsealed),
        )
    return sendable, messages, frozenset(event.id for event in unsealed)


def _send_deliveries(
    items: Sequence[SendItem],
    messages: Sequence[dict[str, Any]],
    alias: str,
    app: Celery | None,
    confirm: bool | None,
    always_try: bool,
    prior_attempts: Mapping[tuple[UUID, str], PriorRuns] | None,
    marker: Marker | None,
    marks: Marks,
) -> tuple[Unsent, bool]:
    """`send_deliveries` of ``items`` and their ``messages`` (`_messages`): the events not
    sent, and whether their confirms went to ``marker`` (for ``marks``)."""
    if confirm is None:
        confirm = conf.PUBLISHER_CONFIRMS
    try:
        app = app or celery_app()
    except ImportError:
        logger.exception(
            "DJANGO_EVENTS['CELERY_APP'] does not import; events stay pending",
            extra=batch_log_extra([event for event, _, _ in items]),
        )
        return _refused(items), False
    if app is None:
        logger.error(
            "No Celery app: set DJANGO_EVENTS['CELERY_APP']; events stay pending",
            extra=batch_log_extra([event for event, _, _ in items]),
        )
        return _refused(items), False
    try:
        confirms_transport = _confirms_transport(app)
    except Exception as exc:  # noqa: BLE001 - logged; the events stay pending for the relay
        # kombu cannot load the broker URL's transport: a scheme it does not know (KeyError),
        # or the transport's client library missing (ImportError; AttributeError for redis in
        # kombu 5.7). No send can succeed until a deploy fixes it (E208 says so).
        _log_unloadable(app, exc, [event for event, _, _ in items])
        return _refused(items), False
    # The relay always tries: it is what finds the broker back.
    if not always_try and not health.may_try(app):
        not_sent = [event for event, _, _ in items]
        health.passed_over(not_sent, app, sent_again=prior_attempts is not None)
        return _refused(items), False
    # One reconnect for a stale pooled connection; none during a known outage, so that
    # publishers fail fast (each attempt is bounded by Celery's broker_connection_timeout).
    policy = {
        "max_retries": 0 if health.is_down(app) else 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    }
    wait = CONFIRM_TIMEOUT if always_try else COMMIT_CONFIRM_TIMEOUT
    later = marker if confirm and confirms_transport else None
    for last_try in (False, True):
        try:
            unsent, silent = _send(
                app, items, messages, alias, confirm, wait, policy, prior_attempts, later, marks
            )
        except _StaleConnection:
            if last_try:
                raise  # pragma: no cover - a new connection is never stale
            continue  # a kept connection the broker had dropped: once more on a new one
        except _SendFailed as failed:
            not_sent = [event for event, _, _ in items[failed.sent :]]
            health.failed(failed.error, not_sent, app, sent_again=prior_attempts is not None)
            return failed.unsent, False
        break
    if later is not None:
        return Unsent(), True
    left = unsent.ids
    if silent:  # confirms that never came: treated as an outage, the others wait a probe
        error = TimeoutError(f"no publisher confirm within {wait:g} s")
        unconfirmed = [event for event, _, _ in items if event.id in left]
        health.failed(error, unconfirmed, app, sent_again=prior_attempts is not None)
        return unsent, False
    health.succeeded(app)
    if left:
        logger.warning(
            "The broker did not confirm %d event(s); they stay pending",
            len(left),
            extra=batch_log_extra([event for event, _, _ in items if event.id in left]),
        )
    return unsent, False


class _SendFailed(Exception):
    """A batch the transport failed: ``sent`` items went out, ``unsent`` events did not."""

    def __init__(self, error: BaseException, sent: int, unsent: Unsent) -> None:
        super().__init__(str(error))
        self.error, self.sent, self.unsent = error, sent, unsent


class _StaleConnection(Exception):
    """A kept confirming connection failed at its first message: the broker had dropped it."""


class _Sent:
    """What ``send_task`` returns for a delivery: its task id. Celery's default, an
    ``AsyncResult``, builds promises nobody waits on here (a fifth of a send, figure 3)."""

    __slots__ = ("id", "ignored")

    def __init__(self, task_id: str) -> None:
        self.id = task_id


def _send(
    app: Celery,
    items: Sequence[SendItem],
    messages: Sequence[dict[str, Any]],
    alias: str,
    confirm: bool,
    confirm_timeout: float,
    policy: dict[str, Any],
    prior_attempts: Mapping[tuple[UUID, str], PriorRuns] | None,
    marker: Marker | None,
    marks: Marks,
) -> tuple[Unsent, bool]:
    """One try at sending the batch (``messages``: its events' messages, in order): the
    events nacked or unconfirmed (see send_deliveries), and whether confirms were still
    missing when the wait ended. With a ``marker`` the batch's confirms are left to it
    instead (nothing is waited for), for ``marks``."""
    sent = 0
    confirms: PublisherConfirms | None = None
    rerun = prior_attempts is not None  # events_retry, events_replay, "Retry selected"
    kept: _Confirming | None = None
    try:
        with _producer(app, confirm, policy) as (producer, confirms, kept):
            declared = kept.declared if kept is not None else set()
            for (event, durable, subscriptions), message in zip(items, messages, strict=True):
                for subscription in subscriptions:
                    limit = soft_limit(subscription)
                    if subscription.declaration.broadcast:
                        route = broadcast.route(subscription.queue)
                    else:
                        # Declared once a batch, or a kept connection: kombu's maybe_declare
                        # copies and binds the queue before it finds it declared (a sixth of
                        # a send, figure 3; a fortieth of a publish(), figure 2).
                        if subscription.queue not in declared:
                            producer.maybe_declare(
                                app.amqp.queues[subscription.queue],
                                retry=confirms is None,
                                on_revive=producer.revive,  # a reconnect rebinds the producer
                                **policy,
                            )
                            declared.add(subscription.queue)
                        route = {"queue": subscription.queue, "declare": []}
                    prior = (
                        prior_attempts.get((event.id, subscription.name), NO_RUNS)
                        if prior_attempts
                        else NO_RUNS
                    )
                    app.send_task(
                        TASK_NAME,
                        args=(
                            build_message(
                                message,
                                subscription.name,
                                alias,
                                prior.attempts,
                                rerun,
                                prior.uncounted,
                            ),
                        ),
                        # Celery would saferepr() the payload into a header (a fifth of the
                        # send, and redacted fields in monitors): name the delivery instead.
                        argsrepr=summary(subscription.name, message["id"]),
                        kwargsrepr="{}",
                        **route,
                        producer=producer,
                        serializer="json",
                        delivery_mode=2 if durable else 1,
                        # A reconnect would restart the confirms' delivery tags: with
                        # confirms a failed batch is left to the next relay pass instead.
                        retry=confirms is None,
                        retry_policy=policy,
                        # Celery takes fractional seconds here; its stubs say int.
                        soft_time_limit=limit,  # type: ignore[arg-type]
                        time_limit=limit + HARD_LIMIT_GRACE if limit else None,  # type: ignore[arg-type]
                        # Celery calls it with the task id; its stubs ask for an AsyncResult.
                        result_cls=_Sent,  # type: ignore[arg-type]
                        # Not a child of the task that publishes (its result is ignored).
                        add_to_parent=False,
                        # As the task says: else send_task has the app's result backend wait
                        # for a result that never comes (Redis subscribes to a channel per
                        # message, which only a dropped AsyncResult, not _Sent, ends).
                        ignore_result=True,
                    )
                    if confirms is not None:
                        confirms.published(event.id)
                sent += 1
            if marker is not None:
                ids = {event.id for event, _, _ in items}
                if kept is not None and kept.confirms is not None:
                    kept.awaiting(marks, ids, confirm_timeout)
                    for done, taken in kept.settle_arrived():
                        marker.taken(done, list(taken))
                    marker.watch(kept)
                    kept.used = True
                else:
                    marker.taken(marks, list(ids))
                return Unsent(), False
            unsent = Unsent()
            if confirms is not None:
                batch = {event.id for event, _, _ in items}
                confirms.wait(confirm_timeout)
                unsent = _unsent_of(confirms, batch)
                confirms.forget(batch)
            silent = confirms is not None and confirms.waiting()
            if silent:
                # A confirm may still come for a tag of this batch: start the next anew.
                kept = None
                _drop_confirming(app)
    except Exception as exc:  # any transport error: the outbox keeps the rest
        if kept is not None and kept.used:
            # Most likely the broker dropped the kept connection while it sat idle (the old
            # pool's "one reconnect"); a message that did get through is sent twice.
            raise _StaleConnection from exc
        unsent = _refused(items[sent:])
        if confirms is not None:  # a kept channel: earlier batches' events are not this one's
            unsent = _unsent_of(confirms, {event.id for event, _, _ in items}, unsent.refused)
        raise _SendFailed(exc, sent, unsent) from exc
    if kept is not None:
        kept.used = True
    return unsent, silent


def _unsent_of(
    confirms: PublisherConfirms, batch: set[UUID], unpublished: frozenset[UUID] = frozenset()
) -> Unsent:
    """What the confirms say of ``batch`` (``unpublished``: its events not published)."""
    refused = frozenset(confirms.refused() & batch) | unpublished
    return Unsent(refused, frozenset(confirms.unanswered() & batch) - refused)


class _Confirming:
    """A connection kept for confirmed publishes of one app, in one thread of one process.

    Its own connection, not Celery's pool: its channel is in confirm mode and counts delivery
    tags, so no other code may publish on it. py-amqp's per-message confirms
    (`confirm_publish`, if the app sets it) would take the acks that PublisherConfirms counts.
    """

    def __init__(self, app: Celery, policy: Mapping[str, Any]) -> None:
        options = {**(app.conf.broker_transport_options or {}), "confirm_publish": False}
        self.app = app
        self.connection = app.connection_for_write(transport_options=options)
        self.pid = os.getpid()
        self.used = False
        self.broken = False
        self.declared: set[str] = set()  # the queues declared on it (kombu's cache, by name)
        # Held by its thread while publishing, by the marker's while collecting confirms.
        self.lock = threading.Lock()
        # Batches whose confirms the marker collects: (what they mark, event ids, deadline).
        self.batches: list[tuple[Marks, set[UUID], float]] = []
        try:
            _connect(self.connection, policy)
            self.producer = app.amqp.Producer(self.connection)
            self.confirms = PublisherConfirms.start(self.producer.channel)
        except BaseException:
            self.close()
            raise

    def awaiting(self, marks: Marks, event_ids: set[UUID], timeout: float) -> None:
        """Leave the confirms of a batch just published to the marker (see `collect`)."""
        self.batches.append((marks, event_ids, time.monotonic() + timeout))

    def outstanding(self) -> bool:
        return bool(self.batches) and not self.broken

    def settle_arrived(self) -> list[tuple[Marks, set[UUID]]]:
        """(what they mark, events taken) of the batches whose confirms have all arrived, read
        without waiting, by its own thread while it holds the lock (after each batch it publishes):
        the marker's rounds skip a connection whose thread is publishing, so a thread that
        keeps publishing would leave every batch unconfirmed, for the relay to send again
        should the connection break."""
        if self.confirms is None:
            return []
        try:
            self.confirms.poll()
        except Exception as exc:  # noqa: BLE001 - any transport error; _lost logs it
            return self._lost(exc)
        return self._settled()

    def _settled(self) -> list[tuple[Marks, set[UUID]]]:
        """Take the batches whose confirms all came off the list: (what they mark, events
        taken)."""
        assert self.confirms is not None
        taken: list[tuple[Marks, set[UUID]]] = []
        left = []
        for marks, event_ids, deadline in self.batches:
            settled = self.confirms.settle(event_ids)
            if settled is None:
                left.append((marks, event_ids, deadline))
                continue
            if settled[1]:
                logger.warning(
                    "The broker did not confirm %d event(s); they stay pending",
                    len(settled[1]),
                    extra=log_extra(),
                )
            taken.append((marks, settled[0]))
        self.batches = left
        return taken

    def collect(self, timeout: float) -> list[tuple[Marks, set[UUID]]]:
        """(what it marks, events taken) of each batch whose confirms all came
        (`marking.Confirming`).

        A batch refused, or still unconfirmed at its deadline, leaves its events pending for
        the relay; a deadline missed or a transport error drops the connection (its thread
        opens a new one), as an outage.
        """
        if not self.lock.acquire(blocking=False):
            return []  # its thread is publishing: the next round
        try:
            if self.broken or not self.batches or self.confirms is None:
                return []
            try:
                self.confirms.wait(timeout)
            except Exception as exc:  # noqa: BLE001 - any transport error; _lost logs it
                return self._lost(exc)
            taken, now = self._settled(), time.monotonic()
            if any(deadline <= now for _, _, deadline in self.batches):
                logger.warning(
                    "No publisher confirm in time for %d batch(es); they stay pending",
                    len(self.batches),
                    extra=log_extra(),
                )
                self._fail(TimeoutError("no publisher confirm in time"))
            elif taken:
                health.succeeded(self.app)
            return taken
        finally:
            self.lock.release()

    def _lost(self, exc: Exception) -> list[tuple[Marks, set[UUID]]]:
        """Give the connection up after reading its confirms failed: (alias, events taken) of
        the batches whose confirms all came before; the others stay pending."""
        taken = self._settled()
        logger.warning(
            "Lost the publisher connection with %d batch(es) unconfirmed; they stay pending: %s",
            len(self.batches),
            exc,
            extra=log_extra(),
        )
        logger.debug("Reading publisher confirms failed", exc_info=exc, extra=log_extra())
        self._fail(exc)
        return taken

    def _fail(self, exc: BaseException) -> None:
        self.drop()
        health.failed(exc, [], self.app)

    def drop(self) -> None:
        """Close the connection for good: the marker no longer reads it, and the events of
        the batches still unconfirmed stay pending for the relay."""
        self.broken = True
        self.batches = []
        self.close()

    def close(self) -> None:
        """Drop the connection without the AMQP close handshake: it failed, or stalled, and a
        close would wait for an answer that may never come."""
        try:
            self.connection.collect()
        except Exception:  # a broken connection is dropped all the same
            logger.debug("Closing a publisher connection failed", exc_info=True, extra=log_extra())


_kept = threading.local()  # .by_app: dict[int, _Confirming] (id of the Celery app)


def _drop_confirming(app: Celery) -> None:
    kept: dict[int, _Confirming] = getattr(_kept, "by_app", {})
    entry = kept.pop(id(app), None)
    if entry is not None:
        # Broken too: the marker reading its closed connection would fail ("'NoneType' object
        # has no attribute 'drain_events'").
        entry.drop()


# A Celery app -> its transport's kind (weak: an app made and dropped, as tests do, is not
# taken for a later one that reuses its id).
_transport_kinds: weakref.WeakKeyDictionary[Celery, str] = weakref.WeakKeyDictionary()
_unloadable: weakref.WeakSet[Celery] = weakref.WeakSet()  # apps whose transport did not load


def _log_unloadable(app: Celery, exc: BaseException, events: Sequence[Event]) -> None:
    """Log, at ERROR once a process and app, that ``app``'s transport does not load."""
    url: Any = app.conf.broker_url  # a string (";" between failover URLs) or a list
    first_url = url.split(";")[0] if isinstance(url, str) else next(iter(url or []), "")
    scheme = app.conf.broker_transport or urlsplit(first_url or "").scheme or "amqp"
    first = app not in _unloadable
    _unloadable.add(app)
    logger.log(
        logging.ERROR if first else logging.DEBUG,
        "Celery's broker transport %r does not load (%s: %s); %d event(s) stay pending for "
        "events_relay until a deploy fixes the broker URL or installs its client library "
        "(events_check reports it)",
        scheme,
        type(exc).__name__,
        exc,
        len(events),
        extra=batch_log_extra(events),
    )


def _confirms_transport(app: Celery) -> bool:
    """Whether ``app``'s broker has publisher confirms (AMQP). Redis and the filesystem
    transport store a message before the publish returns: there is nothing to wait for."""
    return transport_kind(app) == "amqp"


@contextmanager
def _producer(
    app: Celery, confirm: bool, policy: Mapping[str, Any]
) -> Iterator[tuple[Any, PublisherConfirms | None, _Confirming | None]]:
    if not confirm or not _confirms_transport(app):
        with app.producer_or_acquire() as producer:
            _connect(producer.connection, policy)
            yield producer, None, None
        return
    kept: dict[int, _Confirming] = _kept.__dict__.setdefault("by_app", {})
    entry = kept.get(id(app))
    # One inherited through fork is not ours; a broken one the marker gave up.
    if entry is not None and (entry.pid != os.getpid() or entry.broken):
        kept.pop(id(app))
        entry = None
    if entry is None:
        entry = kept[id(app)] = _Confirming(app, policy)
    with entry.lock:
        try:
            yield entry.producer, entry.confirms, entry
        except BaseException:
            _drop_confirming(app)
            raise


def _connect(connection: Any, policy: Mapping[str, Any]) -> None:
    """Connect ``connection``, unless it is, with the send's retry policy, bounded by one
    connect timeout in all, as kombu's own are: a broker that never answers is not tried twice.

    Left to its channel, the connection would connect with kombu's defaults (tries 2 s, then
    4 s apart until the connect timeout has passed): about 6 s of a commit against a broker
    that refuses connections.
    """
    bound = connection.connect_timeout  # kombu takes fractional seconds; its stubs say int
    connection.ensure_connection(timeout=bound, **policy)


def transport_kind(app: Celery) -> str:
    """The kind of ``app``'s broker transport (kombu's ``driver_type``: amqp, redis, ...),
    read once an app: building the connection that tells it costs ~140 us, on every send
    and every retry's due time (`lost_messages.resend_after`)."""
    kind = _transport_kinds.get(app)
    if kind is None:
        connection = app.connection_for_write()  # not connected: the transport's class only
        try:
            kind = _transport_kinds[app] = str(connection.transport.driver_type)
        finally:
            connection.release()
    return kind


def waiting_messages(queue: str, app: Celery | None = None) -> int | None:
    """Messages waiting in ``queue`` for a consumer (not those a worker holds); 0 for a queue
    that does not exist, None if the broker cannot be asked."""
    app = app or celery_app()
    if app is None:
        return None
    from kombu.exceptions import OperationalError  # what a failed ensure_connection raises

    with app.connection_for_write() as connection:
        channel_errors: tuple[type[BaseException], ...] = tuple(connection.channel_errors)
        errors: tuple[type[BaseException], ...] = (
            *connection.connection_errors,
            *channel_errors,
            OperationalError,
            OSError,
        )
        try:
            _connect(connection, {"max_retries": 0})  # a question, not a send: asked once
            channel: Any = connection.channel()
        except errors:
            logger.warning(
                "Cannot ask the broker about queue %r", queue, exc_info=True, extra=log_extra()
            )
            return None
        try:
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
        except channel_errors:
            return 0  # no such queue (RabbitMQ), or an empty one (Redis drops empty lists)
        except errors:
            logger.warning(
                "Cannot ask the broker about queue %r", queue, exc_info=True, extra=log_extra()
            )
            return None
        finally:
            try:
                channel.close()
            except errors:
                logger.debug("Closing a channel failed", exc_info=True, extra=log_extra())
    return int(count)
