"""OpenTelemetry SDK set-up of the observability tests.

Spans go to memory, and also to the JSON-lines file named by ``DJANGO_EVENTS_TEST_SPANS``:
that is how a worker subprocess reports its spans to the test. ``metrics`` reads into an
in-memory reader (tests replace it with a fresh one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from django_events.interceptors.otel import Metrics, Tracing


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
