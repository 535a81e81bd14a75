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
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from functools import cache
from typing import Any

try:
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the extra
    raise ImportError(
        "django_events.interceptors.otel needs OpenTelemetry: "
        f"pip install 'django-event-wiring[otel]' ({exc})"
    ) from exc

from django_events.events import Event, current_attempt
from django_events.wiring.compiled import Subscription

INSTRUMENTATION = "django_events"
EVENT_NAME = "django_events.event.name"
EVENT_ID = "django_events.event.id"
CORRELATION_ID = "django_events.correlation_id"
SUBSCRIPTION = "django_events.subscription"
MODE = "django_events.mode"
ATTEMPT = "django_events.attempt"
OUTCOME = "django_events.outcome"


def event_attributes(event: Event) -> dict[str, str]:
    """Span attributes naming an event."""
    return {
        "messaging.system": INSTRUMENTATION,
        "messaging.message.id": str(event.id),
        EVENT_NAME: event.name,
        EVENT_ID: str(event.id),
        CORRELATION_ID: str(event.correlation_id),
    }


class Tracing:
    """A ``publish <event>`` span per published event and a ``deliver <event>`` span around
    each handler run, linked by W3C trace context carried in the event's headers.

    ``send`` starts the publish span as a child of the current span (or of the trace context
    already in the headers) and writes its context into ``event.headers`` (``traceparent``,
    ``tracestate``), which are stored and sent with the event. ``handle`` continues that
    trace in whichever process runs the handler, so events published by a handler stay in the
    same trace.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)

    def send(self, event: Event) -> None:
        current = trace.get_current_span().get_span_context()
        parent = None if current.is_valid else propagate.extract(event.headers)
        span = self.tracer.start_span(
            f"publish {event.name}",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            attributes=event_attributes(event),
        )
        try:
            propagate.inject(event.headers, context=trace.set_span_in_context(span))
        finally:
            span.end()

    def handle(
        self, event: Event, subscription: Subscription, call_next: Callable[..., Any]
    ) -> Any:
        kind = trace.SpanKind.CONSUMER if subscription.mode == "async" else trace.SpanKind.INTERNAL
        attributes: dict[str, str | int] = {
            **event_attributes(event),
            SUBSCRIPTION: subscription.name,
            MODE: subscription.mode,
            ATTEMPT: current_attempt(),
        }
        with self.tracer.start_as_current_span(
            f"deliver {event.name}",
            context=propagate.extract(event.headers),
            kind=kind,
            attributes=attributes,
        ):
            return call_next(event)


class _Instruments:
    def __init__(self, meter: metrics.Meter, observe_outbox: bool) -> None:
        self.published = meter.create_counter(
            "django_events.events.published", unit="{event}", description="Events published."
        )
        self.succeeded = meter.create_counter(
            "django_events.deliveries.succeeded",
            unit="{delivery}",
            description="Handler runs that succeeded.",
        )
        self.failed = meter.create_counter(
            "django_events.deliveries.failed",
            unit="{delivery}",
            description="Handler runs that raised (each failed attempt counts).",
        )
        self.duration = meter.create_histogram(
            "django_events.delivery.duration", unit="s", description="Duration of handler runs."
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
    meter = metrics.get_meter(INSTRUMENTATION, meter_provider=meter_provider)
    return _Instruments(meter, observe_outbox)


class Metrics:
    """Counters of published events and of succeeded and failed handler runs per
    subscription, a histogram of handler durations, and gauges of the outbox.

    The outbox gauges query the event log of the default database when the meter provider
    collects; every process that has this interceptor reports them. Subclass with
    ``observe_outbox = False`` for the processes that should not.
    """

    observe_outbox = True

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self.instruments = _instruments(meter_provider, self.observe_outbox)

    def send(self, event: Event) -> None:
        self.instruments.published.add(1, {EVENT_NAME: event.name})

    def handle(
        self, event: Event, subscription: Subscription, call_next: Callable[..., Any]
    ) -> Any:
        attributes = {
            EVENT_NAME: event.name,
            SUBSCRIPTION: subscription.name,
            MODE: subscription.mode,
        }
        started = time.perf_counter()
        try:
            result = call_next(event)
        except Exception:
            self.instruments.failed.add(1, attributes)
            self._duration(started, attributes, "failed")
            raise
        self.instruments.succeeded.add(1, attributes)
        self._duration(started, attributes, "succeeded")
        return result

    def _duration(self, started: float, attributes: dict[str, str], outcome: str) -> None:
        elapsed = time.perf_counter() - started
        self.instruments.duration.record(elapsed, {**attributes, OUTCOME: outcome})


def _pending_records() -> tuple[int, datetime | None]:
    from django.db.models import Count, Min

    from django_events.models import EventRecord

    found = EventRecord.objects.filter(status=EventRecord.Status.PENDING).aggregate(
        count=Count("pk"), oldest=Min("occurred_at")
    )
    return int(found["count"]), found["oldest"]


def _observe_pending(options: CallbackOptions) -> Iterable[Observation]:
    count, _ = _pending_records()
    yield Observation(count)


def _observe_lag(options: CallbackOptions) -> Iterator[Observation]:
    from django.utils import timezone

    _, oldest = _pending_records()
    yield Observation((timezone.now() - oldest).total_seconds() if oldest else 0.0)
