"""OpenTelemetry tracing and metrics, as interceptors (the ``otel`` extra).

Add either or both to ``PIPELINE``::

    DJANGO_EVENTS = {"PIPELINE": [
        "django_events.interceptors.otel.Tracing",
        "django_events.interceptors.otel.Metrics",
    ]}

This is the only module of the package that imports ``opentelemetry``; without it in
``PIPELINE``, nothing is imported and nothing changes. Spans and instruments go to the global
tracer and meter providers unless others are passed in.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the extra
    raise ImportError(
        "django_events.interceptors.otel needs OpenTelemetry: "
        f"pip install 'django-event-wiring[otel]' ({exc})"
    ) from exc

from django_events.conf import conf
from django_events.events import Event, current_attempt
from django_events.wiring.compiled import Subscription
from django_events.wiring.redaction import redact_text
from django_events.wiring.registry import get_registry

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

INSTRUMENTATION = "django_events"
# The version of the OpenTelemetry semantic conventions the names below follow.
SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

# Messaging conventions (https://opentelemetry.io/docs/specs/semconv/messaging/).
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
SUBSCRIPTION_NAME = "messaging.destination.subscription.name"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
ERROR_TYPE = "error.type"
# The exception event's attributes (https://opentelemetry.io/docs/specs/semconv/exceptions/).
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"
EXCEPTION_STACKTRACE = "exception.stacktrace"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
# What the conventions lack, under the package's prefix.
CAUSATION_ID = "django_events.event.causation_id"
MODE = "django_events.delivery.mode"
ATTEMPT = "django_events.delivery.attempt"
QUEUE = "django_events.delivery.queue"

# messaging.system of a handler run in the publisher's process (inline, sync): no broker.
IN_PROCESS = "django_events"
# `messaging.system` of `via: tasks` deliveries: Django's Tasks framework, not a broker.
TASKS = "django_tasks"
# kombu transport -> messaging.system: the conventions' value where they have one.
_SYSTEMS = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "pyamqp": "rabbitmq",
    "librabbitmq": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "sentinel": "redis",
    "sqs": "aws_sqs",
    "azureservicebus": "servicebus",
    "gcpubsub": "gcp_pubsub",
    "confluentkafka": "kafka",
}


def broker_attributes() -> dict[str, str | int]:
    """``messaging.system`` and ``server.*`` of the broker the Celery app talks to."""
    try:
        if conf.CELERY_APP:
            from django.utils.module_loading import import_string

            app: Any = import_string(conf.CELERY_APP)
        else:
            from celery import current_app as app
        url = app.conf.broker_url
    except (ImportError, AttributeError):
        # No Celery app to ask (the publisher logs that when it sends): say nothing false.
        return {SYSTEM: IN_PROCESS}
    return dict(_parse_broker(url if isinstance(url, str) else ""))


@cache
def _parse_broker(url: str) -> tuple[tuple[str, str | int], ...]:
    from urllib.parse import urlsplit

    first = url.split(";")[0].strip() or "amqp://localhost"  # Celery's default broker
    parts = urlsplit(first if "://" in first else f"{first}://")
    scheme = parts.scheme.split("+")[-1]  # "sentinel+redis", "redis+socket"
    found: list[tuple[str, str | int]] = [(SYSTEM, _SYSTEMS.get(scheme, scheme))]
    if parts.hostname:
        found.append((SERVER_ADDRESS, parts.hostname))  # never the user or password
        if parts.port:
            found.append((SERVER_PORT, parts.port))
    return tuple(found)


def send_attributes(name: str) -> dict[str, str | int]:
    """``messaging.system`` and ``server.*`` of what carries the event ``name``'s messages.

    The Celery broker when a subscription of the event goes through Celery; Django's Tasks
    framework when they all go ``via: tasks`` (or, for an event with no worker subscription,
    when ``DELIVERY`` is ``"tasks"``: run-time webhook endpoints go that way). A project
    that delivers through its task backend has no broker to name, only Celery's default.
    """
    compiled = get_registry().events.get(name)
    if compiled is None or compiled.async_:  # Celery carries some (or it is unknown)
        return broker_attributes()
    return {SYSTEM: TASKS} if compiled.tasks or conf.DELIVERY == "tasks" else broker_attributes()


def message_attributes(event: Event) -> dict[str, str | int]:
    """The attributes that name an event as a message, in both spans."""
    attributes: dict[str, str | int] = {
        DESTINATION: event.name,
        MESSAGE_ID: str(event.id),
        CONVERSATION_ID: str(event.correlation_id),
    }
    if event.causation_id is not None:
        attributes[CAUSATION_ID] = str(event.causation_id)
    return attributes


def _process_attributes(subscription: Subscription) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        OPERATION_TYPE: "process",
        OPERATION_NAME: "process",
        SUBSCRIPTION_NAME: subscription.name,
        MODE: subscription.mode,
    }
    if not subscription.is_queued:
        attributes[SYSTEM] = IN_PROCESS
    elif subscription.via == "tasks":  # a task backend's queue, no broker
        attributes[SYSTEM] = TASKS
        attributes[QUEUE] = subscription.queue
    else:  # async and webhook: a Celery worker took the message off the broker
        attributes.update(broker_attributes())
        attributes[QUEUE] = subscription.queue
    return attributes


def error_type(exc: BaseException) -> str:
    """``error.type`` of an exception: its fully qualified class name."""
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


class Tracing:
    """A ``send <event>`` span per published event and a ``process <event>`` span around
    each handler run, linked by W3C trace context carried in the event's headers.

    ``send`` starts the send span as a child of the current span (or of the trace context
    already in the headers) and writes its context into ``event.headers`` (``traceparent``,
    ``tracestate``), which are stored and sent with the event. ``handle`` continues that
    trace in whichever process runs the handler, so events published by a handler stay in the
    same trace; a span already current there (Celery's own ``run`` span, when
    opentelemetry-instrumentation-celery is on) becomes a link of the process span.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer(
            INSTRUMENTATION, tracer_provider=tracer_provider, schema_url=SCHEMA_URL
        )

    def send(self, event: Event) -> None:
        current = trace.get_current_span().get_span_context()
        parent = None if current.is_valid else propagate.extract(event.headers)
        span = self.tracer.start_span(
            f"send {event.name}",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                **send_attributes(event.name),
                OPERATION_TYPE: "send",
                OPERATION_NAME: "send",
                **message_attributes(event),
            },
        )
        try:
            propagate.inject(event.headers, context=trace.set_span_in_context(span))
        finally:
            span.end()

    def handle(
        self, event: Event, subscription: Subscription, call_next: Callable[..., Any]
    ) -> Any:
        kind = trace.SpanKind.CONSUMER if subscription.is_queued else trace.SpanKind.INTERNAL
        attributes = {
            **_process_attributes(subscription),
            **message_attributes(event),
            ATTEMPT: current_attempt(),
        }
        current = trace.get_current_span().get_span_context()
        links = [trace.Link(current)] if current.is_valid and subscription.is_queued else []
        # Not the SDK's own recording of the exception: its event and the status description
        # quote the exception's text and traceback, redacted values included.
        with self.tracer.start_as_current_span(
            f"process {event.name}",
            context=propagate.extract(event.headers),
            kind=kind,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return call_next(event)
            except BaseException as exc:
                span.set_attribute(ERROR_TYPE, error_type(exc))
                if isinstance(exc, Exception):  # as the SDK: SystemExit & co. are no errors
                    record_masked(span, event, exc)
                raise


def record_masked(span: trace.Span, event: Event, exc: Exception) -> None:
    """Record ``exc`` on ``span`` as the SDK would (an ``exception`` event, status ERROR), with
    the values of the event's ``redact`` fields masked in its message and stack trace."""
    if not span.is_recording():
        return
    compiled = get_registry().events.get(event.name)
    redact = compiled.declaration.redact if compiled is not None else ()

    def mask(text: str) -> str:
        return redact_text(text, event.data, redact) if redact else text

    message = mask(str(exc))
    span.add_event(
        "exception",
        {
            EXCEPTION_TYPE: error_type(exc),
            EXCEPTION_MESSAGE: message,
            EXCEPTION_STACKTRACE: mask("".join(traceback.format_exception(exc))),
        },
    )
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"))


class _Instruments:
    def __init__(self, meter: metrics.Meter, observe_outbox: bool) -> None:
        self.sent = meter.create_counter(
            "messaging.client.sent.messages",
            unit="{message}",
            description="Number of messages producer attempted to send to the broker.",
        )
        self.consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Number of messages that were delivered to the application.",
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Duration of processing operation."
        )
        if observe_outbox:
            meter.create_observable_gauge(
                "django_events.outbox.pending",
                callbacks=[_observe_pending],
                unit="{event}",
                description="Event records waiting to be sent to the broker.",
            )
            meter.create_observable_gauge(
                "django_events.relay.lag",
                callbacks=[_observe_lag],
                unit="s",
                description="Age of the oldest event record waiting to be sent (0 if none).",
            )


@cache
def _instruments(
    meter_provider: metrics.MeterProvider | None, observe_outbox: bool
) -> _Instruments:
    # Once per provider: the registry is rebuilt on settings changes, the instruments are not.
    meter = metrics.get_meter(INSTRUMENTATION, meter_provider=meter_provider, schema_url=SCHEMA_URL)
    return _Instruments(meter, observe_outbox)


class Metrics:
    """The messaging metrics of the conventions (messages sent, messages consumed, processing
    duration, per event and subscription, ``error.type`` on failures) and gauges of the outbox.

    The outbox gauges query the event log of the default database when the meter provider
    collects; every process that has this interceptor reports them. Subclass with
    ``observe_outbox = False`` for the processes that should not.
    """

    observe_outbox = True

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self.instruments = _instruments(meter_provider, self.observe_outbox)

    def send(self, event: Event) -> None:
        attributes = {
            **send_attributes(event.name),
            OPERATION_NAME: "send",
            DESTINATION: event.name,
        }
        self.instruments.sent.add(1, attributes)

    def handle(
        self, event: Event, subscription: Subscription, call_next: Callable[..., Any]
    ) -> Any:
        attributes = _process_attributes(subscription)
        del attributes[OPERATION_TYPE]  # a span attribute only: the metric says it
        attributes[DESTINATION] = event.name
        self.instruments.consumed.add(1, attributes)
        started = time.perf_counter()
        try:
            result = call_next(event)
        except BaseException as exc:
            attributes[ERROR_TYPE] = error_type(exc)
            self.instruments.duration.record(time.perf_counter() - started, attributes)
            raise
        self.instruments.duration.record(time.perf_counter() - started, attributes)
        return result


def _pending_records() -> tuple[int, datetime | None]:
    from django.db import connections, router

    from django_events.models import EventRecord

    # The SDK's reader collects in a thread of its own, which no request starts or ends: its
    # connection is closed here as Django closes a request's, before and after each query.
    alias = router.db_for_read(EventRecord)
    connection = connections[alias]
    _close_if_unusable_or_obsolete(connection)
    try:
        return _pending_records_on(connection, alias)
    finally:
        _close_if_unusable_or_obsolete(connection)


def _pending_records_on(connection: BaseDatabaseWrapper, alias: str) -> tuple[int, datetime | None]:
    from django.db import DatabaseError

    reused = connection.connection is not None
    try:
        return _count_pending(alias)
    except DatabaseError:
        # Not inside a transaction (a test's, when the test collects in its own thread):
        # that connection is the transaction owner's.
        if connection.in_atomic_block:
            raise
        connection.close()
        if not reused:  # a new connection failed: the database is down, no use trying again
            raise
    # The connection broke since the last collection (a restart, a failover): once more, on
    # a new one, so that this collection reports if the database is back.
    return _count_pending(alias)


def _close_if_unusable_or_obsolete(connection: BaseDatabaseWrapper) -> None:
    """What `django.db.close_old_connections` does at the start and end of each request, to
    this one connection: close it if it failed or ``CONN_MAX_AGE`` has passed (0: at once).
    Not while the thread holds a transaction on it: the gauges may be collected in a thread
    doing other work (a test's transaction, collecting in the test's thread)."""
    if (
        connection.in_atomic_block
        or connection.autocommit != connection.settings_dict["AUTOCOMMIT"]
    ):
        return
    connection.close_if_unusable_or_obsolete()


def _count_pending(alias: str) -> tuple[int, datetime | None]:
    from django.db.models import Count, Min

    from django_events.models import EventRecord

    found = (
        EventRecord.objects.using(alias)
        .filter(status=EventRecord.Status.PENDING)
        .aggregate(count=Count("pk"), oldest=Min("occurred_at"))
    )
    return int(found["count"]), found["oldest"]


def _observe_pending(options: CallbackOptions) -> Iterable[Observation]:
    count, _ = _pending_records()
    yield Observation(count)


def _observe_lag(options: CallbackOptions) -> Iterator[Observation]:
    from django.utils import timezone

    _, oldest = _pending_records()
    yield Observation((timezone.now() - oldest).total_seconds() if oldest else 0.0)
