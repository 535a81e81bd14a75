"""Handing async deliveries to Celery: one task message per (event, subscription)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from uuid import UUID

from django.utils.module_loading import import_string

from django_events.conf import conf
from django_events.delivery import broadcast
from django_events.delivery.confirms import PublisherConfirms
from django_events.delivery.messages import TASK_NAME, build_message, event_body, summary
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
# Seconds to wait for the publisher confirms of a batch after its last message.
CONFIRM_TIMEOUT = 30.0


def celery_app() -> Celery | None:
    """The Celery app that sends deliveries: ``CELERY_APP``, else the project's app."""
    path = conf.CELERY_APP
    if path:
        app: Celery = import_string(path)
        return app
    # Celery keeps its current app per thread and falls back to an unconfigured default app;
    # read its private state to tell "the project's app" from that fallback.
    from celery import _state

    state: Any = _state
    current: Celery | None = state._tls.current_app
    if current is not None:
        return current
    apps = [a for a in list(state._apps) if a is not state.default_app]
    return apps[0] if len(apps) == 1 else None


def _redacted(event_name: str) -> tuple[str, ...]:
    compiled = get_registry().events.get(event_name)
    return compiled.declaration.redact if compiled is not None else ()


class BrokerHealth:
    """Remembers an outage so it is logged once, not once per event.

    During an outage publishers try the broker at most once per probe interval (per Celery
    app; from 0.5 s, doubling up to 10 s while it lasts); the others leave their events
    pending at once instead of each waiting out a connect timeout against a broker that does
    not answer. The relay always tries.
    """

    first_probe = 0.5
    max_probe = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down = False
        self._probes: dict[int, tuple[float, float]] = {}  # id(app) -> (next try, interval)

    def reset(self) -> None:
        """Forget any outage (tests)."""
        with self._lock:
            self.down = False
            self._probes.clear()

    def may_try(self, app: object) -> bool:
        """Whether a publisher should try the broker now (if so, later ones wait)."""
        if not self._probes:  # no outage: every publish passes here, so no lock
            return True
        with self._lock:
            probe = self._probes.get(id(app))
            if probe is None:
                return True
            now = time.monotonic()
            if now < probe[0]:
                return False
            self._probes[id(app)] = (now + probe[1], probe[1])
            return True

    def failed(self, exc: BaseException, events: Sequence[Event], app: object = None) -> None:
        with self._lock:
            first, self.down = not self.down, True
            if app is not None:
                previous = self._probes.get(id(app))
                interval = min(previous[1] * 2, self.max_probe) if previous else self.first_probe
                self._probes[id(app)] = (time.monotonic() + interval, interval)
        extra = batch_log_extra(events)
        if first:
            logger.error(
                "Broker unreachable; %d event(s) stay pending for events_relay: %s",
                len(events),
                exc,
                exc_info=exc,
                extra=extra,
            )
        else:
            logger.debug(
                "Broker still unreachable; %d more event(s) pending", len(events), extra=extra
            )

    def succeeded(self, app: object = None) -> None:
        if self.down or self._probes:
            with self._lock:
                was_down, self.down = self.down, False
                self._probes.pop(id(app), None)
            if was_down:
                logger.warning("Broker reachable again", extra=log_extra())


health = BrokerHealth()


SendItem = tuple[Event, bool, Sequence[Subscription]]  # event, durable, subscriptions


def send_deliveries(
    items: Sequence[SendItem],
    alias: str,
    *,
    app: Celery | None = None,
    confirm: bool = False,
    prior_attempts: Mapping[tuple[UUID, str], int] | None = None,
) -> set[UUID]:
    """Send one message per (event, subscription); return ids of events not fully sent.

    With ``confirm``, the batch waits for the broker's publisher confirms (RabbitMQ), so
    "sent" means "accepted"; events with a message nacked or unconfirmed count as unsent.
    Never raises: an unreachable broker leaves unsent events for the relay.
    ``prior_attempts`` maps (event id, subscription) to the runs already recorded, for
    manual retries and replays (attempts never reset).
    """
    try:
        app = app or celery_app()
    except ImportError:
        logger.exception(
            "DJANGO_EVENTS['CELERY_APP'] does not import; events stay pending",
            extra=batch_log_extra([event for event, _, _ in items]),
        )
        return {event.id for event, _, _ in items}
    if app is None:
        logger.error(
            "No Celery app: set DJANGO_EVENTS['CELERY_APP']; events stay pending",
            extra=batch_log_extra([event for event, _, _ in items]),
        )
        return {event.id for event, _, _ in items}
    # The relay (confirm) always tries: it is what finds the broker back.
    if not confirm and not health.may_try(app):
        logger.debug(
            "Broker down; %d event(s) left pending without trying",
            len(items),
            extra=batch_log_extra([event for event, _, _ in items]),
        )
        return {event.id for event, _, _ in items}
    # One reconnect for a stale pooled connection; none during a known outage, so that
    # publishers fail fast (each attempt is bounded by Celery's broker_connection_timeout).
    policy = {
        "max_retries": 0 if health.down else 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    }
    sent = 0
    confirms: PublisherConfirms | None = None
    declared: set[str] = set()
    rerun = prior_attempts is not None  # events_retry, events_replay, "Retry selected"
    try:
        with _producer(app, confirm) as producer:
            confirms = PublisherConfirms.start(producer.channel) if confirm else None
            for event, durable, subscriptions in items:
                message = seal_event(event_body(event), _redacted(event.name))
                for subscription in subscriptions:
                    timeout = subscription.declaration.timeout
                    if subscription.declaration.broadcast:
                        route = broadcast.route(subscription.queue)
                    else:
                        # Declared once a batch: kombu's per-message maybe_declare copies and
                        # binds the queue each time (a sixth of a send, figure 3).
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
                        prior_attempts.get((event.id, subscription.name), 0)
                        if prior_attempts
                        else 0
                    )
                    app.send_task(
                        TASK_NAME,
                        args=(build_message(message, subscription.name, alias, prior, rerun),),
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
                        soft_time_limit=timeout,  # type: ignore[arg-type]
                        time_limit=timeout + HARD_LIMIT_GRACE if timeout else None,  # type: ignore[arg-type]
                    )
                    if confirms is not None:
                        confirms.published(event.id)
                sent += 1
            unconfirmed = confirms.wait(CONFIRM_TIMEOUT) if confirms is not None else set()
    except Exception as exc:  # noqa: BLE001 - any transport error: the outbox keeps the rest
        health.failed(exc, [event for event, _, _ in items[sent:]], app)
        unsent = {event.id for event, _, _ in items[sent:]}
        return unsent | (confirms.unconfirmed() if confirms is not None else set())
    health.succeeded(app)
    if unconfirmed:
        logger.warning(
            "The broker did not confirm %d event(s); they stay pending",
            len(unconfirmed),
            extra=batch_log_extra([event for event, _, _ in items if event.id in unconfirmed]),
        )
    return unconfirmed


@contextmanager
def _producer(app: Celery, confirm: bool) -> Iterator[Any]:
    if not confirm:
        with app.producer_or_acquire() as producer:
            yield producer
        return
    # A connection of its own: its channel goes into confirm mode (PublisherConfirms).
    # py-amqp's per-message confirms (`confirm_publish`, if the app sets it) would take the
    # acks that PublisherConfirms counts: every message would look unconfirmed.
    options = {**(app.conf.broker_transport_options or {}), "confirm_publish": False}
    with app.connection_for_write(transport_options=options) as connection:
        yield app.amqp.Producer(connection)
