"""The admin in real headless Chromium, with a real celery worker running the retry."""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.urls import reverse

from django_events import publish
from django_events.delivery.recording import delivery, save_deliveries
from django_events.models import Delivery, EventRecord
from tests.app.models import HandlerRun
from tests.ops import shop_wiring
from tests.worker import start_worker, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

CHROMIUM = os.environ.get("DJANGO_EVENTS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page(monkeypatch) -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        message = f"Chromium not found at {CHROMIUM} (scripts/run_tests.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls of the test
    # body are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 800})
        finally:
            browser.close()
            # The test body's ORM calls ran in Playwright's context, on connections of their
            # own: close them, or PostgreSQL refuses to drop the test database.
            connections.close_all()


@pytest.fixture
def worker(tmp_path) -> Iterator[str]:
    with (
        start_worker("filesystem", tmp_path, prefix="admin-ui", manifest="admin.yaml") as process,
        shop_wiring(process.queue, CELERY_APP="tests.brokers.filesystem"),
    ):
        yield process.queue


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: DJANGO_EVENTS_SCREENSHOTS (docs/images to refresh the docs)."""
    folder = Path(os.environ.get("DJANGO_EVENTS_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_retry_a_failed_delivery_from_the_admin(live_server, page, worker, shots) -> None:
    User.objects.create_superuser("ops", "ops@example.com", "s3cret-pass")
    for order_id, total in [(1001, 25.0), (1002, 1500.0)]:
        publish("shop.paid", {"order_id": order_id, "total": total, "email": "ada@example.com"})
    publish("shop.refunded", {"order_id": 1001})
    event = publish("shop.paid", {"order_id": 1003, "total": 42.0, "note": "<script>x</script>"})
    failure = wait_for(
        lambda: Delivery.objects.filter(
            event_id=event.id, subscription="shop-receipt", status="failed"
        ).first(),
        what="the worker's first (failing) run",
    )
    assert failure.attempts == 1

    page.goto(f"{live_server.url}/admin/django_events/eventrecord/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "s3cret-pass")
    page.click("input[type=submit]")
    page.wait_for_selector("#result_list")
    assert page.locator("#result_list tbody tr").count() == 5  # + orders.shipped (chain)
    page.screenshot(path=shots / "event-log.png", full_page=True)

    page.click(f"#result_list a[href*='{event.id}']")
    assert "<script>x</script>" in page.inner_text(".field-payload_pretty")  # shown as text
    page.locator(".inline-group tr.form-row", has_text="shop-receipt").locator(
        "text=open the failure"
    ).click()
    page.wait_for_selector(".field-traceback_pre")
    assert "first run for order 1003 fails" in page.inner_text(".field-last_error_pre")
    page.screenshot(path=shots / "failure.png", full_page=True)

    page.goto(f"{live_server.url}/admin/django_events/failure/")
    page.check(f"input[name=_selected_action][value='{failure.pk}']")
    page.select_option("select[name=action]", label="Retry selected")
    page.click("button[name=index]")
    assert "1 re-enqueued for a worker" in page.inner_text(".messagelist")

    def receipt_status() -> str | None:
        page.goto(f"{live_server.url}/admin/django_events/eventrecord/{event.id}/change/")
        row = page.locator(".inline-group tr.form-row", has_text="shop-receipt")
        status = row.locator(".field-status_badge").inner_text().strip()
        return status if status == "succeeded" else None

    wait_for(receipt_status, timeout=30, what="the retried delivery to succeed")
    done = Delivery.objects.get(pk=failure.pk)
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert HandlerRun.objects.filter(handler="fails_first_time", event_id=event.id).count() == 2

    # The buttons of a failure's page post the same actions (with a real CSRF token).
    ledger = Delivery.objects.get(event_id=event.id, subscription="shop-ledger")
    page.goto(f"{live_server.url}/admin/django_events/failure/{ledger.pk}/change/")
    page.click(".de-actions button:has-text('Mark resolved')")
    assert "1 failed delivery marked resolved." in page.inner_text(".messagelist")
    assert Delivery.objects.get(pk=ledger.pk).status == "resolved"

    page.goto(f"{live_server.url}/admin/django_events/")
    page.click("text=Events and their subscriptions")
    page.click("#event-shoppaid summary")  # unfold one payload schema
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=shots / "wiring.png", full_page=True)


# A subscription name with no place to break (underscores): it must wrap, not spill over.
LONG_NAME = "warehouse_reconciliation_export_of_cancelled_orders_nightly"
LONG_ERROR = "ValueError: " + " ".join(f"the warehouse refused line {n}" for n in range(12))
WIDE = {"width": 1400, "height": 900}

# The boxes of each cell's content (a Range reaches text that overflows its cell), per row.
CONTENT_BOXES = """rows => rows.map(row => [...row.cells].map(cell => {
    const range = document.createRange();
    range.selectNodeContents(cell);
    const box = range.getBoundingClientRect();
    return {left: box.left, right: box.right, top: box.top, bottom: box.bottom};
}))"""


def assert_columns_apart(page, rows_selector: str) -> None:
    """No cell's content reaches into the next column's content."""
    rows = page.locator(rows_selector).evaluate_all(CONTENT_BOXES)
    assert rows
    for cells in rows:
        for index, (box, right) in enumerate(itertools.pairwise(cells)):
            if box["right"] == box["left"] or right["right"] == right["left"]:
                continue  # an empty cell
            # Touching is not overlapping: 1 px of slack for subpixel rounding.
            assert box["right"] <= right["left"] + 1, (rows_selector, index, box, right)


# Whether each element shows whole as the page opens (no scrolling): inside the window, and
# what is drawn at its corners is itself (not the filters, nor nothing where the list's
# scrolling box clips it).
SHOWN_WHOLE = """elements => elements.map(e => {
    const b = e.getBoundingClientRect();
    const inside = b.width > 0 && b.left >= 0 && b.right <= window.innerWidth
        && b.top >= 0 && b.bottom <= window.innerHeight;
    const corners = [[b.left + 2, b.top + 2], [b.right - 2, b.bottom - 2]];
    const drawn = corners.every(([x, y]) => e.contains(document.elementFromPoint(x, y)));
    return {shown: inside && drawn, left: b.left, right: b.right, text: e.innerText.slice(0, 40)};
})"""


def assert_shown_whole(page, selector: str) -> None:
    boxes = page.locator(selector).evaluate_all(SHOWN_WHOLE)
    assert boxes
    for box in boxes:
        assert box["shown"], (selector, box, page.evaluate("window.innerWidth"))


def test_the_pages_fit_1400_px(live_server, page, shots) -> None:
    User.objects.create_superuser("ops", "ops@example.com", "s3cret-pass")
    extra = {"name": LONG_NAME, "event": "shop.paid", "handler": "tests.app.handlers.record"}
    with shop_wiring(SUBSCRIPTIONS=[{**extra, "mode": "sync", "queue": "reconciliation"}]):
        for order_id in (2001, 2002):
            record = EventRecord.objects.create(
                id=uuid.uuid4(),
                name="shop.paid",
                payload={"order_id": order_id},
                correlation_id=uuid.uuid4(),
                status="dispatched",
            )
            save_deliveries(
                "default", [delivery(record.pk, LONG_NAME, "sync", "failed", 12, LONG_ERROR)]
            )
        page.set_viewport_size(WIDE)
        page.goto(f"{live_server.url}/admin/")
        page.fill("#id_username", "ops")
        page.fill("#id_password", "s3cret-pass")
        page.click("input[type=submit]")

        # Both pages only show: "View", as for any model the user cannot change.
        for index in ("/admin/", "/admin/django_events/"):
            page.goto(f"{live_server.url}{index}")
            for model in ("eventrecord", "failure"):
                row = page.locator(f"tr.model-{model}")
                assert row.locator("a.viewlink").inner_text() == "View", (index, model)
                assert row.locator("a.changelink").count() == 0, (index, model)

        page.goto(live_server.url + reverse("admin:django_events_wiring"))
        assert LONG_NAME in page.inner_text("#event-shoppaid")
        assert_columns_apart(page, "#event-shoppaid table.de-subscriptions tr")
        page.screenshot(path=shots / "wiring-1400.png", full_page=True)

        page.goto(f"{live_server.url}/admin/django_events/failure/")
        assert page.locator("#result_list tbody tr").count() == 2
        assert_columns_apart(page, "#result_list tr")
        assert_shown_whole(page, "#result_list .column-attempts, #result_list .column-error")
        assert_shown_whole(page, "#result_list td.field-attempts, #result_list td.field-error")
        assert "12" in page.inner_text("#result_list td.field-attempts >> nth=0")
        page.screenshot(path=shots / "failures-1400.png", full_page=True)


def _login(page, url: str, username: str, password: str) -> None:
    page.context.clear_cookies()
    page.goto(f"{url}/admin/login/?next=/admin/django_events/eventrecord/wiring/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_selector("#wiring-diagram")


def _overlapping_text(page, selector: str) -> list[tuple[str, str]]:
    """Pairs of elements matching ``selector`` whose boxes intersect (by their text)."""
    return page.evaluate(
        """(selector) => {
            const els = [...document.querySelectorAll(selector)]
                .filter(e => e.textContent.trim() !== "");
            const boxes = els.map(e => [e.textContent.trim(), e.getBoundingClientRect()]);
            const hits = [];
            for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
                const [ta, a] = boxes[i], [tb, b] = boxes[j];
                if (els[i].contains(els[j]) || els[j].contains(els[i])) continue;
                if (a.width === 0 || b.width === 0) continue;
                if (a.left < b.right - 0.5 && b.left < a.right - 0.5
                    && a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5) hits.push([ta, tb]);
            }
            return hits;
        }""",
        selector,
    )


TEXT_OF_THE_PAGE = (
    "svg.de-diagram text, .de-subscriptions th, .de-subscriptions td > *, "
    ".de-state .de-badge, .de-state button"
)


def test_wiring_diagram_and_pause_buttons_in_chromium(live_server, page, shots) -> None:
    from django.contrib.auth.models import Permission

    from django_events.delivery.recording import delivery, save_deliveries

    User.objects.create_superuser("ops", "ops@example.com", "s3cret-pass")
    viewer = User.objects.create_user("viewer", password="s3cret-pass", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_eventrecord"))
    with shop_wiring(f"ui-{uuid.uuid4().hex[:8]}"):
        event = publish("shop.refunded", {"order_id": 7})
        save_deliveries(
            "default",
            [delivery(event.id, "cancel-notice", "async", "failed", 3, "RuntimeError: down")],
        )
        _login(page, live_server.url, "ops", "s3cret-pass")
        row = page.locator(".de-subscriptions tr", has_text="shop-ledger").first
        row.locator("button:has-text('Pause')").click()
        assert "Paused 'shop-ledger'." in page.inner_text(".messagelist")
        publish("shop.paid", {"order_id": 8, "total": 3.0})  # held: shop-ledger is sync
        page.reload()
        drawn = page.evaluate("() => document.querySelector('#wiring-diagram svg').textContent")
        assert "paused, 1 held" in drawn
        assert "1 failed" in drawn  # cancel-notice: one failed delivery
        for width in (1400, 900):
            page.set_viewport_size({"width": width, "height": 900})
            assert _overlapping_text(page, TEXT_OF_THE_PAGE) == [], f"at {width} px"
        page.set_viewport_size({"width": 1400, "height": 900})
        page.locator("#wiring-diagram").screenshot(path=shots / "wiring-diagram.png")

        _login(page, live_server.url, "viewer", "s3cret-pass")
        assert page.locator(".de-state button").count() == 0  # view permission: no buttons
        assert page.locator("#wiring-diagram svg .de-d-paused").count() >= 1
        for width in (1400, 900):
            page.set_viewport_size({"width": width, "height": 900})
            assert _overlapping_text(page, TEXT_OF_THE_PAGE) == [], f"at {width} px"

        _login(page, live_server.url, "ops", "s3cret-pass")
        row = page.locator(".de-subscriptions tr", has_text="shop-ledger").first
        row.locator("button:has-text('Resume')").click()
        assert "1 ran and failed" in page.inner_text(".messagelist")  # the ledger fails
    assert Delivery.objects.get(event_id=event.id, subscription="cancel-notice").status == "failed"


def test_dashboard_in_chromium(live_server, page, shots) -> None:
    from datetime import timedelta

    from django.contrib.auth.models import Permission
    from django.utils import timezone

    from django_events.delivery.recording import delivery, save_deliveries

    viewer = User.objects.create_user("viewer", password="s3cret-pass", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_eventrecord"))
    User.objects.create_user("nobody", password="s3cret-pass", is_staff=True)
    with shop_wiring(f"ui-{uuid.uuid4().hex[:8]}", CELERY_APP="tests.brokers.unreachable"):
        rows = []
        for i in range(60):
            event = publish("shop.refunded", {"order_id": i})  # pending: the broker is down
            name = ["shop-receipt", "shop-ledger", "cancel-notice-" + "long" * 12][i % 3]
            status = "failed" if i % 7 == 0 else "succeeded"
            row = delivery(event.id, name, "async", status, 1 + (i % 7 == 0) * 2)
            row.duration_ms = 2.0 + (i % 10) ** 3
            rows.append(row)
        save_deliveries("default", rows)
        Delivery.objects.filter(subscription="shop-ledger").update(
            updated_at=timezone.now() - timedelta(hours=3)
        )
    url = f"{live_server.url}/admin/django_events/eventrecord/dashboard/"

    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_events/eventrecord/dashboard/")
    page.fill("#id_username", "nobody")
    page.fill("#id_password", "s3cret-pass")
    page.click("input[type=submit]")
    assert page.locator("#dashboard-outbox").count() == 0  # no view permission: no dashboard

    page.context.clear_cookies()
    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_events/eventrecord/dashboard/")
    page.fill("#id_username", "viewer")
    page.fill("#id_password", "s3cret-pass")
    page.click("input[type=submit]")
    page.wait_for_selector("#dashboard-deliveries svg")
    assert "events pending" in page.inner_text("#dashboard-outbox")
    selector = "svg.de-chart text, #dashboard-table th, #dashboard-table td, .de-windows li"
    for window in ("hour", "day", "week"):
        page.goto(f"{url}?window={window}")
        for width in (1400, 900):
            page.set_viewport_size({"width": width, "height": 900})
            assert _overlapping_text(page, selector) == [], f"{window} at {width} px"
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{url}?window=day")
    page.screenshot(path=shots / "dashboard.png", full_page=True)


def test_replay_an_endpoints_failed_deliveries_in_chromium(live_server, page) -> None:
    from django_events.delivery import endpoints

    User.objects.create_superuser("ops", "ops@example.com", "s3cret-pass")
    with shop_wiring(f"ui-{uuid.uuid4().hex[:8]}"):
        endpoint, _ = endpoints.create_endpoint("https://crm.example.com/in", ["shop.*"])
        name = endpoints.subscription_name(endpoint.pk)
        event = publish("shop.refunded", {"order_id": 9})
        save_deliveries("default", [delivery(event.id, name, "webhook", "failed", 2, "HTTP 500")])
        page.goto(f"{live_server.url}/admin/login/?next=/admin/django_events/webhookendpoint/")
        page.fill("#id_username", "ops")
        page.fill("#id_password", "s3cret-pass")
        page.click("input[type=submit]")
        page.click(f"#result_list a[href*='{endpoint.pk}']")
        page.click(".object-tools a:has-text('Replay')")
        assert "It has 1 failed delivery." in page.inner_text("#content-main")
        page.check("input[name=what][value=failed]")
        page.click("#replay-form input[type=submit]")
        assert "Retried 1 failed delivery: 1 re-enqueued" in page.inner_text(".messagelist")
    assert Delivery.objects.get(event_id=event.id, subscription=name).status == "pending"
