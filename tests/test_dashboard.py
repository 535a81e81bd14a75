"""The dashboard: its figures (django_events.admin.dashboard), its charts and its page."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_events.admin.charts import deliveries_chart, duration_text, durations_chart
from django_events.admin.dashboard import BOUNDS_MS, collect, percentile
from django_events.models import Delivery, EventRecord
from tests.test_admin import user_client

DASHBOARD = reverse("admin:django_events_dashboard")
EVIL = "<script>alert(1)</script>&"


def test_percentile_is_the_upper_bound_of_its_bucket() -> None:
    histogram = [0] * (len(BOUNDS_MS) + 1)
    histogram[4] = 90  # < 20 ms
    histogram[7] = 10  # < 200 ms
    assert percentile(histogram, 0.5) == 20
    assert percentile(histogram, 0.9) == 20
    assert percentile(histogram, 0.95) == 200
    histogram[-1] = 100
    assert percentile(histogram, 0.95) == float("inf")
    assert percentile([0] * len(histogram), 0.5) is None
    assert [duration_text(v) for v in (20, 2000, float("inf"), None)] == [
        "≤ 20 ms",
        "≤ 2 s",
        "> 60 s",
        "-",
    ]


def _event(ago: timedelta, status: str = "dispatched") -> EventRecord:
    return EventRecord.objects.create(
        id=uuid.uuid4(),
        name="orders.placed",
        correlation_id=uuid.uuid4(),
        occurred_at=timezone.now() - ago,
        status=status,
    )


def _delivery(sub: str, ago: timedelta, status: str, ms: float | None, attempts: int = 1):
    at = timezone.now() - ago
    Delivery.objects.create(
        event=_event(ago),
        subscription=sub,
        mode="async",
        status=status,
        attempts=attempts,
        duration_ms=ms,
        created_at=at,
        updated_at=at,
    )


@pytest.fixture
def traffic(db) -> None:
    minutes, hours, days = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
    for i in range(8):  # the last hour: 8 fast successes, 2 failures after 3 attempts
        _delivery("billing", 10 * minutes, "succeeded", 3 + i * 0.1)
    _delivery("billing", 20 * minutes, "failed", 15, attempts=3)
    _delivery("billing", 30 * minutes, "failed", 150, attempts=3)
    _delivery("billing", 5 * hours, "succeeded", 700)  # the day only
    _delivery("billing", 3 * days, "succeeded", None)  # the week only, not measured
    _delivery("billing", 9 * days, "succeeded", 1)  # older than a week: not counted
    _delivery(EVIL, 2 * minutes, "held", None, attempts=0)
    _event(timedelta(minutes=7), status="pending")
    _event(timedelta(minutes=2), status="pending")


def test_figures_per_window(traffic) -> None:
    figures = collect()
    names = [s.name for s in figures.subscriptions]
    assert names == sorted([EVIL, "billing"])
    billing = {s.name: s for s in figures.subscriptions}["billing"].windows
    hour, day, week = billing["hour"], billing["day"], billing["week"]
    assert (hour.deliveries, hour.failed, hour.retries) == (10, 2, 4)
    assert (day.deliveries, day.failed) == (11, 2)
    assert (week.deliveries, week.measured) == (12, 11)
    assert hour.failure_rate == 0.2
    assert (hour.p50, hour.p95) == (5, 200)
    assert day.p95 == 1000
    assert figures.pending == 2
    age = figures.oldest_pending_age
    assert age is not None and timedelta(minutes=6) < age < timedelta(minutes=8)


@pytest.mark.django_db(databases=["default", "other"])
def test_figures_are_read_where_the_routers_read_the_event_log() -> None:
    from django.test import override_settings

    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]):
        _delivery("billing", timedelta(minutes=1), "succeeded", 3)  # routed: on "other"

        figures = collect()

    assert [s.name for s in figures.subscriptions] == ["billing"]
    assert not Delivery.objects.using("default").exists()


def test_charts_are_svg_with_words_and_escaped_names(traffic) -> None:
    figures = collect()
    for chart in (
        deliveries_chart(figures.subscriptions, "hour"),
        durations_chart(figures.subscriptions, "hour"),
    ):
        svg = str(chart)
        assert "<script>" not in svg
        root = ET.fromstring(svg)
        texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
        assert any(t.startswith(EVIL[:10]) for t in texts)
    bars = str(deliveries_chart(figures.subscriptions, "hour"))
    assert "10 · 2 failed (20.0%)" in bars
    assert 'fill="url(#de-hatch)"' in bars  # failures are hatched, not only coloured
    times = str(durations_chart(figures.subscriptions, "hour"))
    assert "p50 ≤ 5 ms · p95 ≤ 200 ms" in times
    assert "not measured" in times  # the held one ran no handler


@pytest.mark.django_db
def test_the_page_needs_the_view_permission_and_reads_little(traffic) -> None:
    assert user_client().get(DASHBOARD).status_code == 403
    assert user_client("view_eventrecord", staff=False).get(DASHBOARD).status_code == 302
    client = user_client("view_eventrecord")
    client.get(DASHBOARD)  # warm the session
    with CaptureQueriesContext(connection) as queries:
        page = client.get(DASHBOARD + "?window=hour")
    assert page.status_code == 200
    html = page.content.decode()
    sql = [q["sql"] for q in queries.captured_queries]
    assert len(sql) <= 6, sql  # session, user, permissions (2), deliveries, outbox
    assert '<strong aria-current="page">last hour</strong>' in html
    assert "2 events pending" in html
    assert "the oldest for 7" in html
    assert "<script>alert" not in html
    assert client.get(DASHBOARD + "?window=nonsense").context["window"] == "day"


@pytest.mark.django_db
def test_an_empty_dashboard() -> None:
    html = user_client("view_eventrecord").get(DASHBOARD).content.decode()
    assert "No delivery was recorded in the last week." in html
    assert "0 events pending" in html


@pytest.mark.django_db(transaction=True)
def test_sync_runs_record_their_handler_time() -> None:
    from django_events import publish
    from tests.conftest import wiring

    subs = [
        {"event": "orders.placed", "handler": h, "mode": "sync", "name": n}
        for n, h in (("ok", "tests.app.handlers.record"), ("ko", "tests.app.handlers.always_fails"))
    ]
    with wiring(*subs):
        publish("orders.placed", {"order_id": 1, "total": 2.0})
    times = dict(Delivery.objects.values_list("subscription", "duration_ms"))
    assert times.keys() == {"ok", "ko"}
    assert all(t is not None and 0 < t < 10_000 for t in times.values())
