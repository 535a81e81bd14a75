"""OpenTelemetry SDK set-up of the observability tests.

Spans go to memory, and also to the JSON-lines file named by ``DJANGO_EVENTS_TEST_SPANS``:
that is how a worker subprocess reports its spans to the test. ``metrics`` reads into an
in-memory reader (tests replace it with a fresh one); ``file_metrics`` also writes this
process's data points, after each handler run, to ``<DJANGO_EVENTS_TEST_METRICS>.<pid>.json``
(how a worker reports its metrics).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from django_events.events import Event
from django_events.interceptors.otel import Metrics, Tracing
from django_events.wiring.compiled import Subscription


class JsonLinesExporter(SpanExporter):
    """Appends one JSON line per span (opened per export, so forked workers can share it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as out:
            for span in spans:
                out.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, object]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
if os.environ.get("DJANGO_EVENTS_TEST_SPANS"):
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesExporter(os.environ["DJANGO_EVENTS_TEST_SPANS"]))
    )
tracing = Tracing(tracer_provider=provider)

reader = InMemoryMetricReader()
metrics = Metrics(meter_provider=MeterProvider(metric_readers=[reader]))


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[dict[str, Any]]]:
    """Instrument name -> its data points (attributes and value, or count and sum)."""
    data = reader.get_metrics_data()
    found: dict[str, list[dict[str, Any]]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    found.setdefault(metric.name, []).append(
                        {
                            "attributes": dict(point.attributes or {}),
                            "value": getattr(point, "value", None),
                            "count": getattr(point, "count", None),
                            "sum": getattr(point, "sum", None),
                        }
                    )
    return found


class FileMetrics(Metrics):
    """`Metrics` that writes what it collected after each handler run (worker processes)."""

    observe_outbox = False

    def __init__(self, path: str) -> None:
        self.reader = InMemoryMetricReader()
        super().__init__(meter_provider=MeterProvider(metric_readers=[self.reader]))
        self.path = path

    def handle(
        self, event: Event, subscription: Subscription, call_next: Callable[..., Any]
    ) -> Any:
        try:
            return super().handle(event, subscription, call_next)
        finally:
            if self.path:
                with open(f"{self.path}.{os.getpid()}.json", "w", encoding="utf-8") as out:
                    json.dump(metric_points(self.reader), out)


file_metrics = FileMetrics(os.environ.get("DJANGO_EVENTS_TEST_METRICS", ""))
