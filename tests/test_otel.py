"""OpenTelemetry tracing and metrics (django_events.interceptors.otel, the `otel` extra)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from django.conf import settings
from django.db import connection, connections, transaction
from django.db.backends.signals import connection_created
from django.test import override_settings
from django.utils import timezone
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.semconv._incubating.attributes import messaging_attributes as msg
from opentelemetry.semconv._incubating.metrics import messaging_metrics
from opentelemetry.semconv.attributes import (
    error_attributes,
    exception_attributes,
    server_attributes,
)
from opentelemetry.trace import StatusCode

from django_events import publish
from django_events.events import Event
from django_events.interceptors.otel import (
    SEMCONV_VERSION,
    Metrics,
    broker_attributes,
    record_masked,
)
from django_events.models import EventRecord
from django_events.wiring.redaction import MASK
from tests import brokers
from tests.app import otel
from tests.conftest import wiring
from tests.test_import_safety import run_without_settings
from tests.worker import start_worker, wait_for

MANIFESTS = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "otel.yaml")]
PAYLOAD = {"order_id": 1, "total": 12.5}
CHAIN = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.chain_next",
    "mode": "sync",
    "name": "chain",
}
SHIPPED = {"event": "orders.shipped", "handler": "tests.app.handlers.record", "mode": "sync"}
RECORD = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "sync"}
FAILS = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.always_fails",
    "mode": "sync",
    "name": "fails",
}
ASYNC = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.record",
    "mode": "async",
    "name": "async-record",
}


def spans_by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        found.setdefault(span["name"], []).append(span)
    return found


def memory_spans() -> list[dict[str, Any]]:
    return [otel.span_record(s) for s in otel.memory.get_finished_spans()]


def test_the_conventions_version_is_the_installed_one() -> None:
    from opentelemetry.semconv.schemas import Schemas

    assert f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}" == max(
        (s.value for s in Schemas), key=lambda url: tuple(map(int, url.rsplit("/")[-1].split(".")))
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "amqp://guest:secret@rabbit.internal:5672//",
            {
                "messaging.system": "rabbitmq",
                "server.address": "rabbit.internal",
                "server.port": 5672,
            },
        ),
        (
            "redis://:secret@cache:6380/0;redis://other:6379/0",
            {"messaging.system": "redis", "server.address": "cache", "server.port": 6380},
        ),
        (
            "sentinel+redis://s1:26379/0",
            {"messaging.system": "redis", "server.address": "s1", "server.port": 26379},
        ),
        ("sqs://", {"messaging.system": "aws_sqs"}),
        ("filesystem://", {"messaging.system": "filesystem"}),
        (None, {"messaging.system": "rabbitmq", "server.address": "localhost"}),
    ],
)
def test_broker_attributes_name_the_broker_never_its_credentials(url, expected) -> None:
    from celery import Celery

    app = Celery("broker-attributes", broker=url, set_as_current=False)
    with override_settings(DJANGO_EVENTS={"CELERY_APP": "tests.test_otel.broker_app"}):
        globals()["broker_app"] = app
        try:
            assert broker_attributes() == expected
        finally:
            del globals()["broker_app"]


@pytest.mark.django_db(transaction=True)
def test_send_and_process_spans_share_one_trace_along_a_chain() -> None:
    otel.memory.clear()
    with wiring(CHAIN, SHIPPED, PIPELINE=["tests.app.otel.tracing"]), transaction.atomic():
        placed = publish("orders.placed", PAYLOAD)

    spans = spans_by_name(memory_spans())
    [send_placed] = spans["send orders.placed"]
    [process_placed] = spans["process orders.placed"]
    [send_shipped] = spans["send orders.shipped"]
    [process_shipped] = spans["process orders.shipped"]
    assert send_placed["parent_id"] is None and send_placed["kind"] == "PRODUCER"
    assert process_placed["parent_id"] == send_placed["span_id"]
    assert send_shipped["parent_id"] == process_placed["span_id"]
    assert process_shipped["parent_id"] == send_shipped["span_id"]
    assert {s["trace_id"] for s in (send_shipped, process_shipped)} == {send_placed["trace_id"]}
    # tests.celery_app.app's broker is memory:// here (no host).
    assert send_placed["attributes"] == {
        msg.MESSAGING_SYSTEM: "memory",
        msg.MESSAGING_OPERATION_TYPE: "send",
        msg.MESSAGING_OPERATION_NAME: "send",
        msg.MESSAGING_DESTINATION_NAME: "orders.placed",
        msg.MESSAGING_MESSAGE_ID: str(placed.id),
        msg.MESSAGING_MESSAGE_CONVERSATION_ID: str(placed.id),
    }
    # A sync handler runs in the publisher's process: no broker, an INTERNAL span.
    assert process_placed["kind"] == "INTERNAL"
    assert process_placed["attributes"] == {
        msg.MESSAGING_SYSTEM: "django_events",
        msg.MESSAGING_OPERATION_TYPE: "process",
        msg.MESSAGING_OPERATION_NAME: "process",
        msg.MESSAGING_DESTINATION_NAME: "orders.placed",
        msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME: "chain",
        msg.MESSAGING_MESSAGE_ID: str(placed.id),
        msg.MESSAGING_MESSAGE_CONVERSATION_ID: str(placed.id),
        "django_events.delivery.mode": "sync",
        "django_events.delivery.attempt": 1,
    }
    shipped_id = send_shipped["attributes"][msg.MESSAGING_MESSAGE_ID]
    assert send_shipped["attributes"][msg.MESSAGING_MESSAGE_CONVERSATION_ID] == str(placed.id)
    assert send_shipped["attributes"]["django_events.event.causation_id"] == str(placed.id)
    assert shipped_id != str(placed.id)
    # The trace context travels (and is stored) in the event's headers, W3C format.
    traceparent = EventRecord.objects.get(pk=placed.id).headers["traceparent"]
    assert traceparent.startswith(f"00-{send_placed['trace_id']}-{send_placed['span_id']}-")


@pytest.mark.parametrize(
    ("declared", "system"),
    [
        # The worker takes a webhook's message off the broker, as an async one's.
        (
            {"mode": "webhook", "url": "https://hooks.example.com/in", "secret": "WH_SECRET"},
            "memory",
        ),
        # Django's Tasks framework carries a `via: tasks` one: no broker to name.
        ({"mode": "async", "via": "tasks", "handler": "tests.app.handlers.record"}, "django_tasks"),
    ],
)
def test_a_worker_runs_webhook_and_task_deliveries_in_consumer_spans(
    declared: dict[str, str], system: str
) -> None:
    import uuid

    from django.utils import timezone

    from django_events import Event
    from django_events.wiring.registry import get_registry

    otel.memory.clear()
    subscription = {"event": "orders.placed", "name": "worked", **declared}
    with (
        wiring(subscription, PIPELINE=["tests.app.otel.tracing"], TASKS_BACKEND="default"),
        override_settings(WH_SECRET="whsec_c2VjcmV0"),
    ):
        worked = get_registry().subscriptions["worked"]
        event_id = uuid.uuid4()
        event = Event(
            event_id, "orders.placed", PAYLOAD, {}, timezone.now(), event_id, None, PAYLOAD
        )
        assert otel.tracing.handle(event, worked, lambda e: "ran") == "ran"

    [process] = spans_by_name(memory_spans())["process orders.placed"]
    assert process["kind"] == "CONSUMER"
    attributes = process["attributes"]
    assert attributes[msg.MESSAGING_SYSTEM] == system
    assert attributes["django_events.delivery.queue"] == worked.queue
    assert attributes["django_events.delivery.mode"] == declared["mode"]


def _rabbitmq_app() -> Any:
    from celery import Celery

    return Celery("otel-rabbitmq", broker="amqp://rabbit.internal:5672//", set_as_current=False)


RABBITMQ_APP = _rabbitmq_app()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("declared", "keys"),
    [
        # The event's only worker subscription goes through Django's Tasks framework.
        ({"mode": "async", "via": "tasks"}, {}),
        # Every async delivery goes through it; this event has only a sync subscription.
        ({"mode": "sync"}, {"DELIVERY": "tasks"}),
    ],
)
def test_an_event_no_broker_carries_names_no_broker_in_its_send_span_and_metric(
    monkeypatch, declared: dict[str, str], keys: dict[str, str]
) -> None:
    otel.memory.clear()
    reader = InMemoryMetricReader()
    monkeypatch.setattr(otel, "metrics", Metrics(meter_provider=MeterProvider([reader])))
    subscription = {"event": "orders.placed", "handler": "tests.app.handlers.record", **declared}
    pipeline = ["tests.app.otel.tracing", "tests.app.otel.metrics"]
    # A Celery app is configured (RabbitMQ): it carries none of this event's messages.
    celery_app = "tests.test_otel.RABBITMQ_APP"
    with wiring(subscription, PIPELINE=pipeline, CELERY_APP=celery_app, **keys):
        with transaction.atomic():
            publish("orders.placed", PAYLOAD)
            transaction.set_rollback(True)  # nothing enqueued: only the send side is looked at
        data = reader.get_metrics_data()

    [send] = spans_by_name(memory_spans())["send orders.placed"]
    assert send["attributes"][msg.MESSAGING_SYSTEM] == "django_tasks"
    assert server_attributes.SERVER_ADDRESS not in send["attributes"]
    [sent] = [
        dict(point.attributes or {})
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == messaging_metrics.MESSAGING_CLIENT_SENT_MESSAGES
        for point in metric.data.data_points
    ]
    assert sent[msg.MESSAGING_SYSTEM] == "django_tasks"
    assert server_attributes.SERVER_ADDRESS not in sent


@pytest.mark.django_db(transaction=True)
def test_a_failing_handler_sets_error_type() -> None:
    otel.memory.clear()
    with wiring(FAILS, PIPELINE=["tests.app.otel.tracing"]), transaction.atomic():
        publish("orders.placed", PAYLOAD)

    [process] = spans_by_name(memory_spans())["process orders.placed"]
    assert process["status"] == "ERROR"
    assert process["attributes"][error_attributes.ERROR_TYPE] == "RuntimeError"


@pytest.mark.django_db(transaction=True)
def test_a_failing_handlers_exception_is_recorded_with_redacted_values_masked() -> None:
    # orders.placed redacts `email` (base.yaml); the handler's error quotes it.
    otel.memory.clear()
    quoting = {**FAILS, "handler": "tests.app.handlers.fails_quoting_email"}
    with wiring(quoting, PIPELINE=["tests.app.otel.tracing"]), transaction.atomic():
        publish("orders.placed", {**PAYLOAD, "email": "carol@example.com"})

    [span] = [s for s in otel.memory.get_finished_spans() if s.name.startswith("process")]
    assert "carol@example.com" not in span.to_json()  # events, status, attributes
    [event] = span.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {
        exception_attributes.EXCEPTION_TYPE: "ValueError",
        exception_attributes.EXCEPTION_MESSAGE: f"cannot mail {MASK!r}",
        exception_attributes.EXCEPTION_STACKTRACE: ANY,
    }
    stacktrace = event.attributes[exception_attributes.EXCEPTION_STACKTRACE]
    assert stacktrace.startswith("Traceback (most recent call last):")
    assert stacktrace.endswith(f"ValueError: cannot mail {MASK!r}\n")
    assert (span.status.status_code, span.status.description) == (
        StatusCode.ERROR,
        f"ValueError: cannot mail {MASK!r}",
    )
    assert span.attributes[error_attributes.ERROR_TYPE] == "ValueError"
    # An event without `redact` is recorded as the SDK records it.
    otel.memory.clear()
    shipped = {**FAILS, "event": "orders.shipped"}
    with wiring(shipped, PIPELINE=["tests.app.otel.tracing"]), transaction.atomic():
        publish("orders.shipped", {"order_id": 4})
    [span] = [s for s in otel.memory.get_finished_spans() if s.name.startswith("process")]
    [event] = span.events
    assert event.attributes[exception_attributes.EXCEPTION_MESSAGE] == "boom for 4"
    assert span.status.description == "RuntimeError: boom for 4"
    # A span not sampled records nothing (and formats no traceback).
    unsampled = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    ident = uuid.uuid4()
    nothing = Event(ident, "orders.placed", {}, {}, timezone.now(), ident, None, {})
    record_masked(unsampled, nothing, RuntimeError("unused"))


@pytest.mark.django_db(transaction=True)
def test_metrics_after_one_success_and_one_failure(monkeypatch) -> None:
    reader = InMemoryMetricReader()
    monkeypatch.setattr(otel, "metrics", Metrics(meter_provider=MeterProvider([reader])))
    with wiring(
        RECORD,
        FAILS,
        ASYNC,
        PIPELINE=["tests.app.otel.metrics"],
        CELERY_APP="tests.app.no_such_module.app",  # the event stays pending in the outbox
    ):
        with transaction.atomic():
            publish("orders.placed", PAYLOAD)
        data = reader.get_metrics_data()

    points = {
        metric.name: [(dict(p.attributes or {}), p) for p in metric.data.data_points]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    [(attributes, sent)] = points[messaging_metrics.MESSAGING_CLIENT_SENT_MESSAGES]
    assert sent.value == 1
    assert attributes == {
        msg.MESSAGING_SYSTEM: "django_events",  # CELERY_APP does not import
        msg.MESSAGING_OPERATION_NAME: "send",
        msg.MESSAGING_DESTINATION_NAME: "orders.placed",
    }
    in_process = {
        msg.MESSAGING_SYSTEM: "django_events",
        msg.MESSAGING_OPERATION_NAME: "process",
        msg.MESSAGING_DESTINATION_NAME: "orders.placed",
        "django_events.delivery.mode": "sync",
    }
    consumed = {
        a[msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME]: (a, p.value)
        for a, p in points[messaging_metrics.MESSAGING_CLIENT_CONSUMED_MESSAGES]
    }
    record = "orders.placed:tests.app.handlers.record"
    assert consumed == {
        record: ({**in_process, msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME: record}, 1),
        "fails": ({**in_process, msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME: "fails"}, 1),
    }
    durations = {
        a[msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME]: (a, p)
        for a, p in points[messaging_metrics.MESSAGING_PROCESS_DURATION]
    }
    assert durations[record][0] == consumed[record][0]
    assert durations["fails"][0] == {
        **consumed["fails"][0],
        error_attributes.ERROR_TYPE: "RuntimeError",
    }
    assert all(p.count == 1 and p.sum > 0 for _, p in durations.values())
    assert not [
        name
        for name in points
        if name.startswith("django_events.") and "outbox" not in name and "relay" not in name
    ]
    [(_, pending)] = points["django_events.outbox.pending"]
    [(_, lag)] = points["django_events.relay.lag"]
    assert pending.value == 1 == EventRecord.objects.filter(status="pending").count()
    assert 0 < lag.value < 60


def gauges(reader: InMemoryMetricReader) -> dict[str, float]:
    """The outbox gauges' values of one collection (absent: their callback failed)."""
    data = reader.get_metrics_data()
    return {
        metric.name: point.value
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if metric.name.startswith("django_events.")
    }


def pending_record(age: timedelta) -> EventRecord:
    ident = uuid.uuid4()
    return EventRecord.objects.create(
        id=ident,
        name="orders.placed",
        payload=PAYLOAD,
        correlation_id=ident,
        status="pending",
        occurred_at=timezone.now() - age,
    )


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    return int(pid)


def backend_alive(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone() is not None


class HeldExporter(MetricExporter):
    """Holds the SDK reader's thread after each collection until the test has looked, and
    notes then whether that thread's database connection is open."""

    def __init__(self) -> None:
        super().__init__()
        self.turn = threading.Barrier(2, timeout=30)  # reader and test meet twice an export
        self.open: list[bool] = []
        self.thread: int | None = None

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.thread = threading.get_ident()
        self.open.append(connection.connection is not None)  # this thread's connection
        try:
            self.turn.wait()  # collected: the test looks
            self.turn.wait()  # the test has looked
        except threading.BrokenBarrierError:  # the test is done (the reader's last export)
            connections.close_all()
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Nothing to release (the test lets the reader's thread go)."""


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("max_age", [0, 60])
def test_the_readers_thread_keeps_its_connection_as_long_as_conn_max_age_says(
    max_age: int, monkeypatch
) -> None:
    """The SDK's PeriodicExportingMetricReader collects in a thread no request starts or
    ends: its connection is closed after each collection with CONN_MAX_AGE = 0 (Django's
    default), kept for the next ones with a CONN_MAX_AGE that keeps it."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", max_age)  # every thread's
    exporter = HeldExporter()
    opened: list[tuple[int, int | None]] = []  # (thread, backend pid) of each new connection

    def note(sender: Any, connection: Any, **kwargs: Any) -> None:
        pid = None
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                [pid] = cursor.fetchone()
        opened.append((threading.get_ident(), pid))

    connection_created.connect(note)
    provider = MeterProvider([PeriodicExportingMetricReader(exporter, 50)])
    Metrics(meter_provider=provider)
    kept = 0 if max_age == 0 else 1  # connections the reader's thread keeps between collections
    postgresql = connection.vendor == "postgresql"
    looks = []  # at each look: the connections the reader's thread opened so far, those alive
    try:
        for _ in range(3):
            exporter.turn.wait()  # a collection is done; the reader waits
            pids = [pid for thread, pid in opened if thread == exporter.thread]
            looks.append((len(pids), live_backends(pids, kept) if postgresql else kept))
            exporter.turn.wait()
    finally:
        exporter.turn.abort()  # lets the reader's thread go, to its end
        provider.shutdown()
        connection_created.disconnect(note)

    assert exporter.open[:3] == [bool(kept)] * 3
    opened_by_then = [count for count, _ in looks]
    if max_age == 0:  # new connections each collection, closed by its end
        assert opened_by_then[0] > 0 and opened_by_then == sorted(set(opened_by_then))
    else:  # one connection for every collection
        assert opened_by_then == [1] * 3
    assert [alive for _, alive in looks] == [kept] * 3


def live_backends(pids: list[int | None], expected: int) -> int:
    """How many of the backends ``pids`` are alive, once ``expected`` are (a backend ends a
    moment after its client closed the connection), or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids])
            [count] = cursor.fetchone()
        if count == expected or time.monotonic() > deadline:
            return int(count)
        time.sleep(0.05)


@pytest.mark.postgresql  # one connection ending another's
@pytest.mark.django_db(transaction=True)
def test_the_outbox_gauges_report_again_once_the_collecting_threads_connection_broke(
    monkeypatch,
) -> None:
    """The SDK's reader collects in a thread of its own: when the database ends the
    connection that thread keeps (a restart, a failover), the next collection opens a new
    one."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 60)  # every thread's
    reader = InMemoryMetricReader()
    Metrics(meter_provider=MeterProvider([reader]))
    pending_record(timedelta(hours=1))
    collector = ThreadPoolExecutor(1)  # one thread, as the SDK's PeriodicExportingMetricReader
    try:
        before = collector.submit(gauges, reader).result()
        pid = collector.submit(backend_pid).result()
        with connection.cursor() as cursor:  # what a database restart does to that thread
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        wait_for(lambda: not backend_alive(pid), what="the collecting thread's backend to end")
        after = collector.submit(gauges, reader).result()
        again = collector.submit(gauges, reader).result()
    finally:
        collector.submit(connections.close_all).result()
        collector.shutdown()

    for collected in (before, after, again):
        assert collected.keys() == {"django_events.outbox.pending", "django_events.relay.lag"}
        assert collected["django_events.outbox.pending"] == 1
        assert 3600 <= collected["django_events.relay.lag"] < 3660


@pytest.mark.django_db(transaction=True)
def test_the_outbox_gauges_report_again_once_the_database_is_back() -> None:
    """A collection while the database cannot be reached reports no gauge; the first one
    after it is back reports both."""
    reader = InMemoryMetricReader()
    Metrics(meter_provider=MeterProvider([reader]))
    pending_record(timedelta(hours=1))
    reachable = connection.settings_dict

    def reach(settings_dict: dict[str, Any]) -> None:
        connection.close()
        connection.settings_dict = settings_dict  # this thread's connection only

    collector = ThreadPoolExecutor(1)
    try:
        collector.submit(reach, {**reachable, "NAME": "no-such-directory/database"}).result()
        down = collector.submit(gauges, reader).result()
        collector.submit(reach, reachable).result()
        back = collector.submit(gauges, reader).result()
    finally:
        collector.submit(connections.close_all).result()
        collector.shutdown()

    assert down == {}
    assert back.keys() == {"django_events.outbox.pending", "django_events.relay.lag"}
    assert back["django_events.outbox.pending"] == 1


@pytest.mark.django_db(transaction=True)
def test_the_outbox_gauges_leave_a_broken_transactions_connection_to_its_owner() -> None:
    """Collected in a thread inside a transaction that can run no more queries (a test's,
    collecting in the main thread): no gauge, and the transaction keeps its connection."""
    reader = InMemoryMetricReader()
    Metrics(meter_provider=MeterProvider([reader]))
    with transaction.atomic():
        pending_record(timedelta(hours=1))
        with transaction.atomic():
            transaction.set_rollback(True)  # no more queries until this block ends
            assert gauges(reader) == {}
        pending_record(timedelta(hours=2))  # the transaction goes on: its connection is open
    assert gauges(reader)["django_events.outbox.pending"] == 2


def test_without_the_extra_nothing_is_imported_and_publishing_works() -> None:
    run = run_without_settings("""
        import sys

        class NoOpenTelemetry:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "opentelemetry":
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoOpenTelemetry())

        import django
        from django.conf import settings
        from django.core.management import call_command
        from django.test.utils import override_settings

        settings.configure(
            INSTALLED_APPS=["django.contrib.contenttypes", "django_events"],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            USE_TZ=True,
            DJANGO_EVENTS={
                "AUTODISCOVER": False,
                "EVENTS": {"shop.sold": None},
                "SUBSCRIPTIONS": [{"event": "shop.sold", "handler": "builtins.print"}],
            },
        )
        django.setup()
        call_command("migrate", verbosity=0)
        from django_events import publish
        from django_events.checks import check_configuration
        from django_events.models import EventRecord
        from django_events.wiring.registry import reset_registry

        publish("shop.sold", {"sku": "a"})
        assert EventRecord.objects.count() == 1
        assert check_configuration() == []
        assert not [m for m in sys.modules if m.startswith("opentelemetry")]
        pipeline = ["django_events.interceptors.otel.Tracing"]
        with override_settings(DJANGO_EVENTS={**settings.DJANGO_EVENTS, "PIPELINE": pipeline}):
            reset_registry()
            [problem] = check_configuration()
            print(problem.id, problem.msg)
    """)

    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Event(id=")
    assert (
        "django_events.E002 PIPELINE entry 'django_events.interceptors.otel.Tracing' "
        "does not import" in run.stdout
    )
    assert "pip install 'django-event-wiring[otel]'" in run.stdout


@pytest.mark.servers
@pytest.mark.postgresql  # tracing does not depend on the database: one pass is enough
@pytest.mark.django_db(transaction=True)
def test_one_trace_across_a_real_worker_and_a_chain_of_events(tmp_path: Path) -> None:
    spans_file = tmp_path / "worker-spans.jsonl"
    metrics_files = tmp_path / "worker-metrics"
    env = {
        "DJANGO_EVENTS_TEST_PIPELINE": "tests.app.otel.tracing,tests.app.otel.file_metrics",
        "DJANGO_EVENTS_TEST_SPANS": str(spans_file),
        "DJANGO_EVENTS_TEST_METRICS": str(metrics_files),
        # The worker's own publishes (the chain) go through its CELERY_APP: same broker.
        "CELERY_BROKER_URL": brokers.AMQP_URL,
    }
    otel.memory.clear()

    def worker_spans() -> list[dict[str, Any]]:
        if not spans_file.exists():
            return []
        return [json.loads(line) for line in spans_file.read_text().splitlines()]

    def finished() -> bool:
        names = [s["name"] for s in worker_spans()]
        return "process orders.shipped" in names and names.count("process otel.placed") >= 3

    with start_worker("amqp", tmp_path, prefix="it-otel", manifest="otel.yaml", env=env) as worker:
        queue = worker.queue
        value = {
            **settings.DJANGO_EVENTS,
            "MANIFESTS": MANIFESTS,
            "CELERY_APP": "tests.brokers.amqp",
            "DEFAULT_QUEUE": queue,
            "PIPELINE": ["tests.app.otel.tracing"],
        }
        with override_settings(DJANGO_EVENTS=value):
            with transaction.atomic():
                placed = publish("otel.placed", {"order_id": 5})
            failing = publish("otel.placed", {"order_id": 6, "fail": True})
            try:
                wait_for(finished, timeout=30, what="the worker's process spans")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; worker log:\n{worker.log()[-3000:]}") from None

    sent = spans_by_name(memory_spans())["send otel.placed"]
    in_worker = spans_by_name(worker_spans())
    by_event = {s["attributes"][msg.MESSAGING_MESSAGE_ID]: s for s in sent}
    root = by_event[str(placed.id)]
    rabbitmq = {
        msg.MESSAGING_SYSTEM: "rabbitmq",
        server_attributes.SERVER_ADDRESS: "127.0.0.1",
        server_attributes.SERVER_PORT: 5672,
    }
    assert root["kind"] == "PRODUCER"
    assert root["attributes"] == {
        **rabbitmq,
        msg.MESSAGING_OPERATION_TYPE: "send",
        msg.MESSAGING_OPERATION_NAME: "send",
        msg.MESSAGING_DESTINATION_NAME: "otel.placed",
        msg.MESSAGING_MESSAGE_ID: str(placed.id),
        msg.MESSAGING_MESSAGE_CONVERSATION_ID: str(placed.id),
    }
    [process] = [
        s
        for s in in_worker["process otel.placed"]
        if s["attributes"][msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] == "otel-chain"
    ]
    assert process["attributes"] == {
        **rabbitmq,
        msg.MESSAGING_OPERATION_TYPE: "process",
        msg.MESSAGING_OPERATION_NAME: "process",
        msg.MESSAGING_DESTINATION_NAME: "otel.placed",
        msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME: "otel-chain",
        msg.MESSAGING_MESSAGE_ID: str(placed.id),
        msg.MESSAGING_MESSAGE_CONVERSATION_ID: str(placed.id),
        "django_events.delivery.mode": "async",
        "django_events.delivery.queue": queue,
        "django_events.delivery.attempt": 1,
    }
    [chained_send] = in_worker["send orders.shipped"]
    [chained_process] = in_worker["process orders.shipped"]
    # One trace: send (test process) -> process (worker) -> send -> process (worker).
    assert process["pid"] != root["pid"] and process["kind"] == "CONSUMER"
    assert process["parent_id"] == root["span_id"]
    assert chained_send["parent_id"] == process["span_id"]
    assert chained_process["parent_id"] == chained_send["span_id"]
    assert {process["trace_id"], chained_send["trace_id"], chained_process["trace_id"]} == {
        root["trace_id"]
    }
    assert chained_send["attributes"][msg.MESSAGING_SYSTEM] == "rabbitmq"
    assert chained_process["attributes"][msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] == (
        "otel-shipped"
    )
    assert chained_process["attributes"][msg.MESSAGING_MESSAGE_CONVERSATION_ID] == str(placed.id)
    # The failing subscription: one span per attempt, errors with error.type, in its trace.
    attempts = [
        s
        for s in in_worker["process otel.placed"]
        if s["attributes"][msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME] == "otel-fails"
    ]
    assert sorted(s["attributes"]["django_events.delivery.attempt"] for s in attempts) == [1, 2]
    assert {s["status"] for s in attempts} == {"ERROR"}
    assert {s["attributes"][error_attributes.ERROR_TYPE] for s in attempts} == {"RuntimeError"}
    assert {s["trace_id"] for s in attempts} == {by_event[str(failing.id)]["trace_id"]}

    # The worker's metrics (each pool process reports its own; they add up).
    consumed: dict[tuple[str, str | None], int] = {}
    durations: dict[tuple[str, str | None], int] = {}
    for path in tmp_path.glob("worker-metrics.*.json"):
        points = json.loads(path.read_text())
        for name, into, field in (
            (messaging_metrics.MESSAGING_CLIENT_CONSUMED_MESSAGES, consumed, "value"),
            (messaging_metrics.MESSAGING_PROCESS_DURATION, durations, "count"),
        ):
            for point in points.get(name, []):
                attributes = point["attributes"]
                assert (
                    attributes.items()
                    >= {**rabbitmq, msg.MESSAGING_OPERATION_NAME: "process"}.items()
                )
                key = (
                    attributes[msg.MESSAGING_DESTINATION_SUBSCRIPTION_NAME],
                    attributes.get(error_attributes.ERROR_TYPE),
                )
                into[key] = into.get(key, 0) + point[field]
    assert consumed == {("otel-chain", None): 1, ("otel-fails", None): 2, ("otel-shipped", None): 1}
    assert durations == {
        ("otel-chain", None): 1,
        ("otel-fails", "RuntimeError"): 2,
        ("otel-shipped", None): 1,
    }
