"""OpenTelemetry tracing and metrics (django_events.interceptors.otel, the `otel` extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import transaction
from django.test import override_settings
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from django_events import publish
from django_events.interceptors.otel import Metrics
from django_events.models import EventRecord
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


@pytest.mark.django_db(transaction=True)
def test_publish_and_delivery_spans_share_one_trace_along_a_chain() -> None:
    otel.memory.clear()
    with wiring(CHAIN, SHIPPED, PIPELINE=["tests.app.otel.tracing"]), transaction.atomic():
        placed = publish("orders.placed", PAYLOAD)

    spans = spans_by_name(memory_spans())
    [publish_placed] = spans["publish orders.placed"]
    [deliver_placed] = spans["deliver orders.placed"]
    [publish_shipped] = spans["publish orders.shipped"]
    [deliver_shipped] = spans["deliver orders.shipped"]
    assert publish_placed["parent_id"] is None and publish_placed["kind"] == "PRODUCER"
    assert deliver_placed["parent_id"] == publish_placed["span_id"]
    assert publish_shipped["parent_id"] == deliver_placed["span_id"]
    assert deliver_shipped["parent_id"] == publish_shipped["span_id"]
    assert {s["trace_id"] for s in (publish_shipped, deliver_shipped)} == {
        publish_placed["trace_id"]
    }
    assert (
        deliver_placed["attributes"].items()
        >= {
            "django_events.event.name": "orders.placed",
            "django_events.event.id": str(placed.id),
            "django_events.subscription": "chain",
            "django_events.attempt": 1,
            "django_events.mode": "sync",
        }.items()
    )
    # The trace context travels (and is stored) in the event's headers, W3C format.
    traceparent = EventRecord.objects.get(pk=placed.id).headers["traceparent"]
    assert traceparent.startswith(f"00-{publish_placed['trace_id']}-{publish_placed['span_id']}-")


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
    [(attributes, published)] = points["django_events.events.published"]
    assert (attributes, published.value) == ({"django_events.event.name": "orders.placed"}, 1)
    succeeded = {
        a["django_events.subscription"]: p.value
        for a, p in points["django_events.deliveries.succeeded"]
    }
    failed = {
        a["django_events.subscription"]: p.value
        for a, p in points["django_events.deliveries.failed"]
    }
    assert succeeded == {"orders.placed:tests.app.handlers.record": 1}
    assert failed == {"fails": 1}
    durations = {
        (a["django_events.subscription"], a["django_events.outcome"]): p
        for a, p in points["django_events.delivery.duration"]
    }
    assert set(durations) == {
        ("orders.placed:tests.app.handlers.record", "succeeded"),
        ("fails", "failed"),
    }
    assert all(p.count == 1 and p.sum > 0 for p in durations.values())
    [(_, pending)] = points["django_events.outbox.pending"]
    [(_, lag)] = points["django_events.relay.lag"]
    assert pending.value == 1 == EventRecord.objects.filter(status="pending").count()
    assert 0 < lag.value < 60


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
    env = {
        "DJANGO_EVENTS_TEST_PIPELINE": "tests.app.otel.tracing",
        "DJANGO_EVENTS_TEST_SPANS": str(spans_file),
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
        return "deliver orders.shipped" in names and names.count("deliver otel.placed") >= 3

    with start_worker("amqp", tmp_path, prefix="it-otel", manifest="otel.yaml", env=env) as worker:
        value = {
            **settings.DJANGO_EVENTS,
            "MANIFESTS": MANIFESTS,
            "CELERY_APP": "tests.brokers.amqp",
            "DEFAULT_QUEUE": worker.queue,
            "PIPELINE": ["tests.app.otel.tracing"],
        }
        with override_settings(DJANGO_EVENTS=value):
            with transaction.atomic():
                placed = publish("otel.placed", {"order_id": 5})
            failing = publish("otel.placed", {"order_id": 6, "fail": True})
            try:
                wait_for(finished, timeout=30, what="the worker's delivery spans")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; worker log:\n{worker.log()[-3000:]}") from None

    published = spans_by_name(memory_spans())["publish otel.placed"]
    in_worker = spans_by_name(worker_spans())
    by_trace = {s["attributes"]["django_events.event.id"]: s for s in published}
    root = by_trace[str(placed.id)]
    [deliver] = [
        s
        for s in in_worker["deliver otel.placed"]
        if s["attributes"]["django_events.subscription"] == "otel-chain"
    ]
    [chained_publish] = in_worker["publish orders.shipped"]
    [chained_deliver] = in_worker["deliver orders.shipped"]
    # One trace: publish (test process) -> delivery (worker) -> publish -> delivery (worker).
    assert deliver["pid"] != root["pid"] and deliver["kind"] == "CONSUMER"
    assert deliver["parent_id"] == root["span_id"]
    assert chained_publish["parent_id"] == deliver["span_id"]
    assert chained_deliver["parent_id"] == chained_publish["span_id"]
    assert {deliver["trace_id"], chained_publish["trace_id"], chained_deliver["trace_id"]} == {
        root["trace_id"]
    }
    assert chained_deliver["attributes"]["django_events.subscription"] == "otel-shipped"
    # The failing subscription: one span per attempt, marked as errors, in the event's trace.
    attempts = [
        s
        for s in in_worker["deliver otel.placed"]
        if s["attributes"]["django_events.subscription"] == "otel-fails"
    ]
    assert sorted(s["attributes"]["django_events.attempt"] for s in attempts) == [1, 2]
    assert {s["status"] for s in attempts} == {"ERROR"}
    assert {s["trace_id"] for s in attempts} == {by_trace[str(failing.id)]["trace_id"]}
