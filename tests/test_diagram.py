"""The wiring diagram (django_events.admin.diagram): valid SVG, escaped names, state marks
in words and line style, boxes that do not overlap; and on the wiring page."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from itertools import combinations

import pytest
from django.urls import reverse

from django_events.admin.diagram import wiring_svg
from django_events.operations.pausing import pause
from django_events.wiring.describing import describe_wiring
from tests.conftest import wiring
from tests.test_admin import user_client

SVG = "{http://www.w3.org/2000/svg}"
EVIL = "<script>alert('x')</script> & \"quoted\""
SUBS = [
    {
        "event": "orders.placed",
        "handler": "tests.app.handlers.record",
        "mode": "async",
        "name": EVIL,
        "queue": "billing",
    },
    {
        "event": "orders.*",
        "handler": "tests.app.handlers.record_other",
        "mode": "sync",
        "name": "every-order-" + "x" * 80,
        "when": {"total": {"gte": 5}},
    },
]


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def boxes(root: ET.Element) -> list[tuple[float, float, float, float]]:
    return [
        (float(r.get("x")), float(r.get("y")), float(r.get("width")), float(r.get("height")))
        for g in root.iter(f"{SVG}g")
        for r in g.findall(f"{SVG}rect")
        if "de-d-legend" not in (g.get("class") or "")
    ]


def test_names_are_escaped_and_the_svg_parses() -> None:
    with wiring(*SUBS):
        svg = str(wiring_svg(describe_wiring(), {}))
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg
    root = parse(svg)
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert any(t.startswith("<script>alert(") for t in texts)  # shown as text, shortened
    titles = ["".join(t.itertext()) for t in root.iter(f"{SVG}title")]
    title = EVIL + " (tests.app.handlers.record): async via celery · billing"
    assert any(t.startswith(title) for t in titles)
    assert any(t.startswith("every-order-" + "x" * 80) for t in titles)  # full name in tooltip
    assert all(len(t) <= 42 for t in texts)


def test_links_modes_and_state_are_drawn_in_words_and_line_styles() -> None:
    with wiring(*SUBS):
        wired = describe_wiring()
        links = sum(len(e.subscriptions) for e in wired.events)
        root = parse(str(wiring_svg(wired, {EVIL: {"paused": True, "held": 2, "failed": 3}})))
    paths = [p for p in root.iter(f"{SVG}path") if "de-d-link" in (p.get("class") or "")]
    assert len(paths) == links
    assert sum("de-d-filtered" in p.get("class") for p in paths) == links - 1  # one unfiltered
    groups = {g.get("class") for g in root.iter(f"{SVG}g")}
    assert "de-d-sub de-d-paused de-d-failing" in groups
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "async via celery · billing" in texts
    assert "paused, 3 failed, 2 held" in texts
    assert "sync" in texts
    assert {"paused", "failing", "filtered (when)"} <= set(texts)  # the legend


def test_boxes_never_overlap() -> None:
    many = [
        {
            "event": "orders.placed",
            "handler": "tests.app.handlers.record",
            "mode": "sync",
            "name": f"s{i}",
        }
        for i in range(12)
    ]
    with wiring(*many):
        root = parse(str(wiring_svg(describe_wiring(), {})))
    placed = boxes(root)
    assert len(placed) > 12
    for (x1, y1, w1, h1), (x2, y2, w2, h2) in combinations(placed, 2):
        assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1


@pytest.mark.django_db
def test_the_wiring_page_shows_the_diagram_with_paused_marked() -> None:
    with wiring(*SUBS):
        pause(EVIL)
        page = user_client("view_eventrecord").get(reverse("admin:django_events_wiring"))
    html = page.content.decode()
    assert 'id="wiring-diagram"' in html
    assert 'class="de-d-sub de-d-paused"' in html
    assert "<script>alert" not in html


VIA = [
    {**SUBS[0], "name": "by-celery"},
    {**SUBS[0], "name": "by-tasks", "queue": "mails", "via": "tasks"},
    {**SUBS[1], "name": "here"},
]


def test_the_diagram_says_what_runs_each_subscription() -> None:
    with wiring(*VIA):
        root = parse(str(wiring_svg(describe_wiring(), {})))
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert {"async via celery · billing", "async via tasks · mails", "sync"} <= set(texts)


@pytest.mark.django_db
def test_the_wiring_page_says_what_runs_each_subscription_under_its_mode() -> None:
    with wiring(*VIA):
        page = user_client("view_eventrecord").get(reverse("admin:django_events_wiring"))
    html = page.content.decode()
    shown = r'<span class="de-mode">(\w+)</span>(?:<div class="de-origin">(via \w+)</div>)?'
    assert sorted(set(re.findall(shown, html))) == [
        ("async", "via celery"),
        ("async", "via tasks"),
        ("sync", ""),  # run in the publishing process: no via
    ]
