"""The admin through Django's test client: event log, failures, wiring page, permissions."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_events import publish
from django_events.admin import paging as admin_paging
from django_events.delivery.recording import delivery, save_deliveries
from django_events.delivery.worker import process_message
from django_events.models import Delivery, EventRecord
from django_events.wiring.redaction import MASK
from tests.app.models import HandlerRun
from tests.ops import drain, shop_wiring, work
from tests.routers import EventLogElsewhere

LOG = reverse("admin:django_events_eventrecord_changelist")
FAILURES = reverse("admin:django_events_failure_changelist")
WIRING = reverse("admin:django_events_wiring")
APP = reverse("admin:app_list", args=["django_events"])


@pytest.fixture
def queue() -> Iterator[str]:  # conftest's, named so the pages below can be matched
    name = f"admin-{uuid.uuid4().hex[:8]}"
    with shop_wiring(name):
        yield name


def user_client(*perms: str, staff: bool = True) -> Client:
    user = User.objects.create_user(f"u{uuid.uuid4().hex[:8]}", password="pw", is_staff=staff)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return client


def failure_of(subscription: str) -> Delivery:
    return Delivery.objects.get(subscription=subscription, status="failed")


def action(client: Client, name: str, *pks: int):
    data = {"action": name, "_selected_action": [str(pk) for pk in pks]}
    return client.post(FAILURES, data, follow=True)


# -- the event log ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_event_log_shows_each_event_and_its_delivery_outcome(admin_client, publish_now) -> None:
    paid = publish_now("shop.paid", {"order_id": 1, "total": 5})
    refunded = publish_now("shop.refunded", {"order_id": 1})

    page = admin_client.get(LOG)

    assert page.status_code == 200
    html = page.content.decode()
    assert str(paid.id)[:8] in html and str(refunded.id)[:8] in html
    # shop.paid: shop-audit succeeded, shop-ledger failed (its first run always fails),
    # shop-receipt sent to a worker (no outcome yet).
    row = _row_of(html, paid.id)
    assert 'class="de-badge de-failed" title="shop-ledger">1 failed' in row
    assert 'title="shop-audit">1 succeeded' in row
    assert reverse("admin:django_events_wiring") in html  # linked from the log


def _row_of(html: str, event_id: uuid.UUID) -> str:
    url = reverse("admin:django_events_eventrecord_change", args=[event_id])
    rows = [r for r in re.findall(r"<tr.*?</tr>", html, re.S) if url in r]
    assert len(rows) == 1, f"no single row links {url}"
    return rows[0]


@pytest.mark.django_db
@pytest.mark.parametrize("url", [LOG, FAILURES])
def test_list_queries_do_not_grow_with_the_page(admin_client, publish_now, url) -> None:
    def queries_for_page() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(url).status_code == 200
        return len(captured)

    publish_now("shop.paid", {"order_id": 1})
    few = queries_for_page()
    for order_id in range(2, 12):
        publish_now("shop.paid", {"order_id": order_id})
    assert Delivery.objects.filter(status="failed").count() == 11
    assert queries_for_page() == few


@pytest.mark.django_db
def test_event_page_queries_do_not_grow_with_its_deliveries(admin_client, publish_now) -> None:
    event = publish_now("shop.paid", {"order_id": 1})
    url = reverse("admin:django_events_eventrecord_change", args=[event.id])

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(url).status_code == 200
        return len(captured)

    queries()  # warms Django's ContentType cache (one query on a cold first request)
    few = queries()
    rows = [delivery(event.id, f"gone-{n}", "sync", "failed", 1, "Boom") for n in range(5)]
    save_deliveries("default", rows)
    assert queries() == few


@pytest.mark.django_db
def test_event_log_filters_search_and_date_hierarchy(admin_client, publish_now) -> None:
    paid = publish_now("shop.paid", {"order_id": 1})
    refunded = publish_now("shop.refunded", {"order_id": 2})
    shipped = EventRecord.objects.get(causation_id=refunded.id)  # published by shop-chain
    other = str(paid.id)[:8], str(refunded.id)[:8], str(shipped.pk)[:8]

    def shown(query: str) -> set[str]:
        html = admin_client.get(LOG + query).content.decode()
        return {short for short in other if short in html}

    assert shown("?name=shop.refunded") == {other[1]}
    assert shown(f"?q={paid.id}") == {other[0]}
    assert shown(f"?q={refunded.correlation_id}") == {other[1], other[2]}  # the whole chain
    assert shown("?q=orders.") == {other[2]}
    assert shown("?status__exact=dispatched") == set(other)
    assert shown("?status__exact=pending") == set()
    year = paid.occurred_at.year
    assert shown(f"?occurred_at__year={year}") == set(other)
    assert shown(f"?occurred_at__year={year - 1}") == set()
    assert shown("?occurred_at__gte=2000-01-01+00:00:00%2B00:00") == set(other)
    assert admin_client.get(LOG + "?q=not-a-uuid-or-name").status_code == 200


@pytest.mark.django_db
def test_event_page_is_read_only_redacted_escaped_and_shows_deliveries(
    admin_client, publish_now
) -> None:
    payload = {
        "order_id": 7,
        "email": "ada@example.com",
        "card": {"number": "4111111111111111"},
        "note": "<script>alert('x')</script>",
    }
    event = publish_now("shop.paid", payload, headers={"X-Source": "<b>shop</b>"})

    page = admin_client.get(reverse("admin:django_events_eventrecord_change", args=[event.id]))

    html = page.content.decode()
    assert page.status_code == 200
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;shop&lt;/b&gt;" in html
    assert "ada@example.com" not in html and "4111111111111111" not in html
    assert html.count(MASK) == 2
    assert "&quot;order_id&quot;: 7" in html  # pretty-printed JSON
    assert 'name="_save"' not in html  # read-only, even for a superuser
    assert _inline_rows(html) == {"shop-audit": "succeeded", "shop-ledger": "failed"}
    assert re.search(r"shop-receipt \(async, queue admin-\w+\)", html)  # no outcome yet
    failure = failure_of("shop-ledger")
    assert reverse("admin:django_events_failure_change", args=[failure.pk]) in html
    assert EventRecord.objects.get(pk=event.id).payload == payload  # masking is display-only


@pytest.mark.django_db
def test_an_event_no_longer_declared_shows_its_keys_not_its_values(admin_client, queue) -> None:
    record = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.renamed",  # its declaration, and so its redact list, is gone
        payload={"email": "ada@example.com", "lines": [{"card": "4111111111111111"}]},
        correlation_id=uuid.uuid4(),
    )

    html = admin_client.get(reverse("admin:django_events_eventrecord_change", args=[record.pk]))

    text = html.content.decode()
    assert "ada@example.com" not in text and "4111111111111111" not in text
    assert f"&quot;email&quot;: &quot;{MASK}&quot;" in text
    assert f"&quot;card&quot;: &quot;{MASK}&quot;" in text


@pytest.mark.django_db
def test_an_older_or_newer_version_shows_what_handlers_get_and_what_is_stored(
    admin_client, queue
) -> None:
    declared = {
        "version": 2,
        "upcast": {1: "tests.app.upcasters.split_total"},
        "redact": ["email"],
    }

    def page(version: int, payload: dict[str, object]) -> str:
        record = EventRecord.objects.create(
            id=uuid.uuid4(),
            name="o.placed",
            payload=payload,
            version=version,
            correlation_id=uuid.uuid4(),
        )
        url = reverse("admin:django_events_eventrecord_change", args=[record.pk])
        return admin_client.get(url).content.decode()

    with shop_wiring(queue, EVENTS={"o.placed": declared}):
        old = page(1, {"order_id": 1, "total": 9.5, "email": "ada@example.com"})
        newer = page(3, {"order_id": 2, "email": "ada@example.com"})
        broken = page(1, {"order_id": 3, "email": "ada@example.com"})  # no total to split

    assert "Upcast from version 1 (as stored, below) to version 2" in old
    assert "&quot;amount&quot;: 950" in old and "&quot;total&quot;: 9.5" in old
    assert (
        "Stored as version 3: Event &#x27;o.placed&#x27; is version 3; this process knows up "
        "to version 2</p>"
    ) in newer
    assert "Stored as version 1: Upcaster v1 -&gt; v2 of event &#x27;o.placed&#x27;" in broken
    assert "KeyError" in broken and "&quot;amount&quot;" not in broken
    for html in (old, newer, broken):
        assert "ada@example.com" not in html


def _inline_rows(html: str) -> dict[str, str]:
    rows = re.findall(r'<tr class="form-row.*?</tr>', html, re.S)
    found = {}
    for row in rows:
        name = re.search(r'field-subscription">\s*<p>([^<]*)</p>', row)
        status = re.search(r'class="de-badge de-(\w+)"', row)
        assert name and status, row
        found[name.group(1)] = status.group(1)
    return found


@pytest.mark.django_db
def test_event_page_links_the_causation_chain(admin_client, publish_now) -> None:
    refunded = publish_now("shop.refunded", {"order_id": 3})
    shipped = EventRecord.objects.get(causation_id=refunded.id)

    parent = admin_client.get(reverse("admin:django_events_eventrecord_change", args=[refunded.id]))
    child = admin_client.get(reverse("admin:django_events_eventrecord_change", args=[shipped.pk]))

    assert reverse("admin:django_events_eventrecord_change", args=[shipped.pk]) in (
        parent.content.decode()
    )
    assert "published outside any handler" in parent.content.decode()
    child_html = child.content.decode()
    assert reverse("admin:django_events_eventrecord_change", args=[refunded.id]) in child_html
    assert f"?q={refunded.correlation_id}" in child_html


@pytest.mark.django_db
def test_event_page_names_a_cause_that_was_not_stored(admin_client, queue) -> None:
    """The parent recorded failures only (RECORD: failures) and had none."""
    parent_id = uuid.uuid4()
    record = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.refunded",
        payload={"order_id": 1},
        correlation_id=uuid.uuid4(),
        causation_id=parent_id,
    )

    url = reverse("admin:django_events_eventrecord_change", args=[record.pk])
    html = admin_client.get(url).content.decode()

    assert f"{parent_id} (not stored)" in html
    assert reverse("admin:django_events_eventrecord_change", args=[parent_id]) not in html


# -- failures --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_failure_pages_show_error_and_traceback_escaped(admin_client, publish_now) -> None:
    event = publish_now("shop.paid", {"order_id": 9, "email": "x@example.com"})
    save_deliveries(
        "default",
        [
            delivery(
                event.id,
                "shop-audit",
                "sync",
                "failed",
                2,
                "ValueError: <img src=x onerror=alert(1)>",
                'Traceback (most recent call last):\n  File "<script>evil()</script>"',
            )
        ],
    )
    failure = failure_of("shop-audit")

    listing = admin_client.get(FAILURES).content.decode()
    page = admin_client.get(reverse("admin:django_events_failure_change", args=[failure.pk]))

    assert "shop-ledger" in listing and "shop-audit" in listing
    assert "<img src=x" not in listing and "&lt;img src=x onerror=alert(1)&gt;" in listing
    html = page.content.decode()
    assert page.status_code == 200
    assert "<script>evil" not in html and "&lt;script&gt;evil()&lt;/script&gt;" in html
    assert "Traceback (most recent call last)" in html
    assert "x@example.com" not in html and MASK in html
    assert 'name="_save"' not in html
    assert 'value="retry_selected"' in html and 'value="resolve_selected"' in html


@pytest.mark.django_db
def test_failures_filter_by_subscription_and_search_by_event_or_name(
    admin_client, publish_now
) -> None:
    paid = publish_now("shop.paid", {"order_id": 1})  # shop-ledger fails
    other = publish_now("shop.paid", {"order_id": 2})
    save_deliveries("default", [delivery(paid.id, "shop-audit", "sync", "failed", 1, "Boom")])
    rows = {
        (d.event_id, d.subscription): reverse("admin:django_events_failure_change", args=[d.pk])
        for d in Delivery.objects.filter(status="failed")
    }

    def shown(query: str) -> set[tuple[uuid.UUID, str]]:
        html = admin_client.get(FAILURES + query).content.decode()
        return {key for key, url in rows.items() if url in html}

    assert len(rows) == 3
    assert shown("?subscription=shop-audit") == {(paid.id, "shop-audit")}
    assert shown(f"?q={paid.id}") == {(paid.id, "shop-audit"), (paid.id, "shop-ledger")}
    assert shown("?q=shop-le") == {(paid.id, "shop-ledger"), (other.id, "shop-ledger")}
    assert shown("?q=nothing-like-it") == set()


@pytest.mark.django_db
def test_errors_and_tracebacks_mask_the_events_redacted_values(admin_client, publish_now) -> None:
    card = "4111111111111111"
    event = publish_now("shop.paid", {"order_id": 9, "card": {"number": card}})
    error = f"ValueError: card {card!r} refused"
    trace = f'Traceback (most recent call last):\n  File "x.py"\n{error}'
    save_deliveries(
        "default", [delivery(event.id, "shop-audit", "sync", "failed", 1, error, trace)]
    )
    failure = failure_of("shop-audit")

    pages = [
        admin_client.get(FAILURES),
        admin_client.get(reverse("admin:django_events_failure_change", args=[failure.pk])),
        admin_client.get(reverse("admin:django_events_eventrecord_change", args=[event.id])),
    ]

    for page in pages:
        html = page.content.decode()
        assert card not in html, page.request["PATH_INFO"]
        assert f"card &#x27;{MASK}&#x27; refused" in html, page.request["PATH_INFO"]


@pytest.mark.django_db
def test_errors_of_an_event_no_longer_declared_mask_every_value(admin_client, queue) -> None:
    """Its redact list is unknown: its errors are masked as its payload is (every value)."""
    card = "4111111111111111"
    record = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.renamed",  # its declaration, and so its redact list, is gone
        payload={"order_id": 9, "card": {"number": card}},
        correlation_id=uuid.uuid4(),
    )
    error = f"ValueError: card {card!r} refused"
    trace = f'Traceback (most recent call last):\n  File "x.py"\n{error}'
    save_deliveries(
        "default", [delivery(record.id, "shop-gone", "sync", "failed", 1, error, trace)]
    )
    failure = failure_of("shop-gone")

    pages = [
        admin_client.get(FAILURES),
        admin_client.get(reverse("admin:django_events_failure_change", args=[failure.pk])),
        admin_client.get(reverse("admin:django_events_eventrecord_change", args=[record.id])),
    ]

    for page in pages:
        html = page.content.decode()
        assert card not in html, page.request["PATH_INFO"]
        assert f"card &#x27;{MASK}&#x27; refused" in html, page.request["PATH_INFO"]


@pytest.mark.django_db
def test_retry_selected_reruns_a_sync_handler_and_records_it(admin_client, publish_now) -> None:
    event = publish_now("shop.paid", {"order_id": 4})
    failure = failure_of("shop-ledger")
    assert failure.attempts == 1

    page = action(admin_client, "retry_selected", failure.pk)

    assert "1 ran and succeeded" in page.content.decode()
    done = Delivery.objects.get(pk=failure.pk)
    assert (done.status, done.attempts) == ("succeeded", 2)
    runs = HandlerRun.objects.filter(handler="fails_first_time_sync", event_id=event.id)
    assert runs.count() == 2
    change_url = reverse("admin:django_events_failure_change", args=[failure.pk])
    assert change_url not in admin_client.get(FAILURES).content.decode()


@pytest.mark.django_db(transaction=True)
def test_retry_selected_reenqueues_async_with_attempts_carried_over(admin_client, queue) -> None:
    event = publish("shop.paid", {"order_id": 5})
    assert [o.status for o in work(queue)] == ["failed"]  # max_attempts 1: failed at once
    failure = failure_of("shop-receipt")
    assert failure.attempts == 1

    page = action(admin_client, "retry_selected", failure.pk)

    assert "1 re-enqueued for a worker" in page.content.decode()
    assert Delivery.objects.get(pk=failure.pk).status == "pending"  # off the failure list
    assert [o.status for o in work(queue)] == ["succeeded"]
    done = Delivery.objects.get(pk=failure.pk)
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert HandlerRun.objects.filter(handler="fails_first_time", event_id=event.id).count() == 2


@pytest.mark.django_db(transaction=True)
def test_retry_selected_under_atomic_requests_says_an_ordered_delivery_is_not_sent_yet(
    admin_client, queue, monkeypatch
) -> None:
    # An ordered delivery is sent when the claim commits: under ATOMIC_REQUESTS that is the
    # request's commit, after the message is written, so the message cannot say "sent".
    ordered = {
        "name": "shop-ordered-fails",
        "event": "shop.paid",
        "handler": "tests.app.handlers.always_fails",
        "mode": "async",
        "ordering_key": "order_id",
        "retry": {"max_attempts": 1},
    }

    def run_ordered() -> list[str]:
        return [
            process_message(m, 0).status
            for m in drain(queue)
            if m["subscription"] == "shop-ordered-fails"
        ]

    with shop_wiring(queue, SUBSCRIPTIONS=[ordered]):
        publish("shop.paid", {"order_id": 5})
        assert run_ordered() == ["failed"]
        failure = failure_of("shop-ordered-fails")
        monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)

        html = action(admin_client, "retry_selected", failure.pk).content.decode()

        assert "0 re-enqueued for a worker" in html
        assert "1 to be sent when the current transaction commits" in html
        assert run_ordered() == ["failed"]  # sent once the request committed
    assert Delivery.objects.get(pk=failure.pk).attempts == 2


@pytest.mark.django_db
def test_retry_skips_a_subscription_no_longer_declared(admin_client, publish_now) -> None:
    event = publish_now("shop.refunded", {"order_id": 1})
    save_deliveries("default", [delivery(event.id, "gone", "sync", "failed", 3, "Boom")])
    gone = failure_of("gone")

    html = action(admin_client, "retry_selected", gone.pk).content.decode()

    assert "1 skipped" in html and "no longer declared" in html
    assert Delivery.objects.get(pk=gone.pk).status == "failed"


@pytest.mark.django_db
def test_mark_resolved(admin_client, publish_now) -> None:
    publish_now("shop.paid", {"order_id": 6})
    failure = failure_of("shop-ledger")

    html = action(admin_client, "resolve_selected", failure.pk).content.decode()

    assert "1 failed delivery marked resolved." in html
    assert Delivery.objects.get(pk=failure.pk).status == "resolved"
    assert HandlerRun.objects.filter(handler="fails_first_time_sync").count() == 1  # no rerun


class EventLogReadFromReplica:
    """A router that reads the event log from "other" (a replica); it is written to default."""

    def db_for_read(self, model: type, **hints: object) -> str | None:
        return "other" if model._meta.app_label == "django_events" else None


@pytest.mark.django_db(databases=["default", "other"])
def test_mark_resolved_hands_on_an_ordered_key_where_the_router_writes(
    admin_client, queue, publish_now, django_capture_on_commit_callbacks
) -> None:
    """The list reads a replica: the key's next delivery is handed on on the primary (it was
    handed on, or not, on the replica, and stayed held on the primary)."""
    from django.test import override_settings

    from django_events.models import OrderingGate

    ordered = {
        "event": "shop.paid",
        "handler": "tests.app.handlers.record",
        "mode": "async",
        "name": "shop-ordered",
        "ordering_key": "order_id",
    }
    rows = Delivery.objects.filter(subscription="shop-ordered")
    with shop_wiring(queue, SUBSCRIPTIONS=[ordered]):
        first = publish_now("shop.paid", {"order_id": 1, "total": 10})
        second = publish_now("shop.paid", {"order_id": 1, "total": 11})
        rows.filter(event_id=first.id).update(status="failed", attempts=1, last_error="Boom")
        [message] = [
            m
            for m in drain(queue)
            if m["subscription"] == "shop-ordered" and m["event"]["id"] == str(second.id)
        ]
        assert process_message(message, 0, manage_connections=False).status == "held"
        for model in (EventRecord, OrderingGate, Delivery):  # the replica caught up
            model.objects.using("other").bulk_create(model.objects.using("default").all())

        with (
            override_settings(DATABASE_ROUTERS=[EventLogReadFromReplica()]),
            django_capture_on_commit_callbacks(execute=True),
        ):
            page = action(admin_client, "resolve_selected", rows.get(event_id=first.id).pk)
        sent = [m for m in drain(queue) if m["subscription"] == "shop-ordered"]

    assert "1 failed delivery marked resolved." in page.content.decode()
    assert rows.get(event_id=first.id).status == "resolved"
    assert rows.get(event_id=second.id).status == "pending"  # handed on, its message sent
    assert [m["event"]["id"] for m in sent] == [str(second.id)]
    replica = Delivery.objects.using("other").filter(subscription="shop-ordered")
    assert sorted(replica.values_list("status", flat=True)) == ["failed", "held"]  # not written


# -- the wiring page -------------------------------------------------------------------------


@pytest.mark.django_db
def test_wiring_page_lists_events_schemas_and_subscriptions(admin_client, queue) -> None:
    page = admin_client.get(WIRING)

    html = page.content.decode()
    assert page.status_code == 200
    assert "shop.paid" in html and "An order was paid." in html
    assert "&quot;order_id&quot;" in html  # the schema
    assert "tests.app.handlers.fails_first_time_sync" in html
    assert "big-orders" in html and "{&quot;total&quot;: {&quot;gte&quot;: 1000}}" in html
    assert "1x, backoff 0.1s (max 1s)" in html  # manifest merged with DEFAULT_RETRY
    assert re.search(r"admin\.yaml:\d+", html)
    assert "redacted" in html and "email, card.number" in html


@pytest.mark.django_db
def test_wiring_page_is_linked_from_the_app_index_and_escapes_declarations(admin_client) -> None:
    events = {"evil.one": {"description": "<script>alert(1)</script>"}}
    with shop_wiring(EVENTS=events):
        assert WIRING in admin_client.get(APP).content.decode()
        html = admin_client.get(WIRING).content.decode()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# -- permissions -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_anonymous_and_non_staff_users_see_nothing(publish_now) -> None:
    publish_now("shop.paid", {"order_id": 1})
    failure = failure_of("shop-ledger")
    pages = [LOG, FAILURES, WIRING, APP]
    for client in (Client(), user_client("view_eventrecord", "change_failure", staff=False)):
        for url in pages:
            response = client.get(url)
            assert response.status_code == 302 and "/login/" in response["Location"], url
        response = action(client, "retry_selected", failure.pk)
        assert response.redirect_chain[0][0].startswith(reverse("admin:login"))
    assert Delivery.objects.get(pk=failure.pk).status == "failed"


@pytest.mark.django_db
def test_staff_without_permissions_is_refused(publish_now) -> None:
    client = user_client()
    assert client.get(LOG).status_code == 403
    assert client.get(FAILURES).status_code == 403
    assert client.get(WIRING).status_code == 403


@pytest.mark.django_db
def test_view_permission_shows_but_cannot_act(publish_now) -> None:
    publish_now("shop.paid", {"order_id": 1})
    failure = failure_of("shop-ledger")
    viewer = user_client("view_eventrecord", "view_failure")

    assert viewer.get(LOG).status_code == 200
    assert viewer.get(WIRING).status_code == 200
    assert WIRING in viewer.get(APP).content.decode()
    listing = viewer.get(FAILURES).content.decode()
    assert "shop-ledger" in listing and "retry_selected" not in listing
    page = viewer.get(reverse("admin:django_events_failure_change", args=[failure.pk]))
    assert page.status_code == 200 and 'value="retry_selected"' not in page.content.decode()
    for name in ("retry_selected", "resolve_selected"):
        action(viewer, name, failure.pk)
    assert Delivery.objects.get(pk=failure.pk).status == "failed"
    assert HandlerRun.objects.filter(handler="fails_first_time_sync").count() == 1


@pytest.mark.django_db
def test_change_permission_on_failures_can_act(publish_now) -> None:
    publish_now("shop.paid", {"order_id": 1})
    failure = failure_of("shop-ledger")
    operator = user_client("view_failure", "change_failure")

    assert "retry_selected" in operator.get(FAILURES).content.decode()
    action(operator, "resolve_selected", failure.pk)

    assert Delivery.objects.get(pk=failure.pk).status == "resolved"
    assert operator.get(LOG).status_code == 403  # the log needs its own view permission


@pytest.mark.django_db
def test_the_index_offers_view_not_change_on_the_read_only_pages() -> None:
    operator = user_client("view_eventrecord", "change_failure")  # acts, edits nothing

    for index in (reverse("admin:index"), APP):
        html = operator.get(index).content.decode()
        for model in ("eventrecord", "failure"):
            row = re.search(rf'<tr class="model-{model}">(.*?)</tr>', html, re.DOTALL)
            assert row is not None, (index, model)
            assert 'class="viewlink"' in row[1] and ">View<" in row[1], (index, model)
            assert "changelink" not in row[1], (index, model)
    assert "retry_selected" in operator.get(FAILURES).content.decode()


@pytest.mark.django_db
def test_actions_need_a_post_with_the_csrf_token(admin_user, publish_now) -> None:
    publish_now("shop.paid", {"order_id": 1})
    failure = failure_of("shop-ledger")
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    data = {"action": "resolve_selected", "_selected_action": str(failure.pk)}

    assert client.get(FAILURES, data).status_code == 302  # a GET never acts: "?e=1"
    assert client.post(FAILURES, data).status_code == 403  # no CSRF token
    assert Delivery.objects.get(pk=failure.pk).status == "failed"

    page = client.get(reverse("admin:django_events_failure_change", args=[failure.pk]))
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert token
    client.post(FAILURES, {**data, "csrfmiddlewaretoken": token.group(1)})
    assert Delivery.objects.get(pk=failure.pk).status == "resolved"


@pytest.mark.django_db
def test_a_failure_page_cannot_be_saved(admin_client, publish_now) -> None:
    publish_now("shop.paid", {"order_id": 1})
    failure = failure_of("shop-ledger")
    url = reverse("admin:django_events_failure_change", args=[failure.pk])
    before = Delivery.objects.filter(pk=failure.pk).values().get()

    response = admin_client.post(url, {"_save": "Save"})

    assert response.status_code == 403  # the page acts only through its action buttons
    assert Delivery.objects.filter(pk=failure.pk).values().get() == before
    assert not LogEntry.objects.exists()


# -- counts ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_filtered_counts_stop_at_the_cap(admin_client, publish_now, monkeypatch) -> None:
    for order_id in range(4):
        publish_now("shop.refunded", {"order_id": order_id})
    monkeypatch.setattr(admin_paging, "COUNT_CAP", 2)
    html = admin_client.get(LOG + "?name=shop.refunded").content.decode()
    assert "2+ events" in html


@pytest.mark.postgresql
@pytest.mark.django_db
def test_unfiltered_count_is_postgresqls_estimate(admin_client, publish_now, monkeypatch) -> None:
    for order_id in range(3):
        publish_now("shop.paid", {"order_id": order_id})
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE django_events_eventrecord")
    monkeypatch.setattr(admin_paging, "EXACT_BELOW", 1)
    with CaptureQueriesContext(connection) as captured:
        html = admin_client.get(LOG).content.decode()
    assert "~3 events" in html
    assert not any("COUNT(" in q["sql"].upper() for q in captured.captured_queries)


@pytest.mark.django_db
def test_date_hierarchy_lists_periods_from_the_first_and_last_event(
    admin_client, publish_now
) -> None:
    first = publish_now("shop.refunded", {"order_id": 1})
    last = publish_now("shop.refunded", {"order_id": 2})
    EventRecord.objects.filter(pk=first.id).update(occurred_at=datetime(2025, 11, 15, tzinfo=UTC))
    EventRecord.objects.filter(pk=last.id).update(occurred_at=datetime(2026, 2, 3, tzinfo=UTC))
    EventRecord.objects.exclude(pk__in=[first.id, last.id]).delete()  # the chained events

    months = admin_paging.with_cheap_periods(EventRecord.objects.all()).datetimes(
        "occurred_at", "month"
    )
    assert [(m.year, m.month) for m in months] == [(2025, 11), (2025, 12), (2026, 1), (2026, 2)]
    top = admin_client.get(LOG).content.decode()
    assert "?occurred_at__year=2025" in top and "?occurred_at__year=2026" in top
    year = admin_client.get(LOG + "?occurred_at__year=2025").content.decode()
    assert "occurred_at__month=11" in year and "occurred_at__month=12" not in year
    with CaptureQueriesContext(connection) as captured:
        admin_client.get(LOG)
    assert not any("DISTINCT" in q["sql"].upper() for q in captured.captured_queries)


@pytest.mark.django_db
def test_a_webhook_failure_shows_the_answer_escaped_and_redacted(admin_client, publish_now) -> None:
    from django_events.delivery.webhooks import Response

    event = publish_now("shop.paid", {"order_id": 10, "email": "y@example.com"})
    answer = Response(422, 37, '<b>bad</b> "email": "y@example.com"')
    save_deliveries(
        "default",
        [
            delivery(
                event.id,
                "shop-audit",
                "webhook",
                "failed",
                1,
                "WebhookFailed: HTTP 422",
                "",
                response=answer,
            )
        ],
    )
    failure = failure_of("shop-audit")

    html = admin_client.get(
        reverse("admin:django_events_failure_change", args=[failure.pk])
    ).content.decode()
    event_page = admin_client.get(
        reverse("admin:django_events_eventrecord_change", args=[event.id])
    ).content.decode()

    assert "HTTP 422 in 37 ms" in html and "HTTP 422 in 37 ms" in event_page
    assert "&lt;b&gt;bad&lt;/b&gt;" in html and "<b>bad</b>" not in html
    assert "y@example.com" not in html and MASK in html


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_the_admin_reads_and_writes_the_event_log_where_the_router_says(admin_client) -> None:
    from django.test import override_settings

    from django_events.models import PausedSubscription

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]), shop_wiring():
        event = publish("shop.paid", {"order_id": 1, "total": 10}, using="other")
        save_deliveries("other", [delivery(event.id, "shop-audit", "async", "failed", 1, "x")])

        dashboard = admin_client.get(reverse("admin:django_events_dashboard"))
        assert dashboard.status_code == 200 and "shop-audit" in dashboard.content.decode()
        paused = admin_client.post(
            reverse("admin:django_events_wiring_pause"), {"name": "shop-audit", "action": "pause"}
        )
        assert paused.status_code == 302
        assert PausedSubscription.objects.using("other").filter(subscription="shop-audit")
        assert not PausedSubscription.objects.using("default").exists()
