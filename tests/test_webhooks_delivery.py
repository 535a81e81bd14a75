"""mode: webhook through a real worker to a receiver on 127.0.0.1 that verifies every call with
the standardwebhooks library and answers by script (tests/webhook_receiver.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings
from django.urls import reverse

from django_events import publish
from django_events.delivery import endpoints
from django_events.delivery.endpoints import subscription_name
from django_events.delivery.webhooks import message_id
from django_events.models import Delivery, WebhookEndpoint
from tests import brokers
from tests.webhook_receiver import SCRIPTS, Receiver
from tests.worker import WorkerProcess, start_worker, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + base64.b64encode(b"outbound-signing-secret-0123456").decode()


@pytest.fixture
def admin_client(client, django_user_model):
    """pytest-django's, without hashing a password (a second a test on a busy machine)."""
    user = django_user_model.objects.create(username="admin", is_staff=True, is_superuser=True)
    client.force_login(user)
    return client


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET) as running:
        yield running


# Run-time endpoints of these tests: quick retries; disabled after failing for 1 s; the list
# of endpoints read at each publish (no cache to wait out).
ENDPOINTS = {
    "retry": {"max_attempts": 3, "backoff": 0.6, "max_backoff": 5, "jitter": False},
    "disable_after": 1,
    "refresh": 0,
}


@contextmanager
def webhook_worker(
    kind: str, receiver: Receiver, folder: Path, **extra: str
) -> Iterator[WorkerProcess]:
    """A worker of broker ``kind`` on a queue of its own, with the webhooks.yaml wiring."""
    urls = {f"TEST_HOOK_URL_{s.upper()}": receiver.url(s) for s in SCRIPTS}
    urls["TEST_HOOK_URL_CLOSED"] = f"http://127.0.0.1:{closed_port()}/closed"
    env = {
        "DJANGO_EVENTS_TEST_WEBHOOKS_PRIVATE": "1",
        # The worker sends too (an ordered key's next delivery): to its own broker.
        "DJANGO_EVENTS_TEST_CELERY_APP": f"tests.brokers.{kind}",
        "DJANGO_EVENTS_TEST_WEBHOOK_ENDPOINTS": json.dumps(ENDPOINTS),
        "TEST_HOOK_SIGNING_SECRET": SECRET,
        **urls,
        **extra,
    }
    with start_worker(kind, folder, prefix="wh", manifest="webhooks.yaml", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def fs_worker(
    receiver: Receiver, django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[WorkerProcess]:
    with webhook_worker("filesystem", receiver, tmp_path_factory.mktemp("webhooks")) as process:
        yield process


@pytest.fixture(scope="module", params=brokers.worker_kinds("filesystem", "amqp", "redis"))
def broker_worker(
    request, receiver: Receiver, django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[WorkerProcess]:
    """The tests that matter most run on every broker (filesystem: the module's own worker)."""
    if request.param == "filesystem":
        yield request.getfixturevalue("fs_worker")
        return
    folder = tmp_path_factory.mktemp(f"webhooks-{request.param}")
    with webhook_worker(request.param, receiver, folder) as process:
        yield process


def wired(process: WorkerProcess) -> Any:
    """Publish to ``process``'s broker and queue (per test: workers of several brokers live
    side by side in this module)."""
    return brokers.delivery_wiring(
        process.kind,
        process.queue,
        "webhooks.yaml",
        WEBHOOK_ENDPOINTS=ENDPOINTS,
        WEBHOOKS_ALLOW_PRIVATE=True,  # the admin's form accepts the receiver's URL
    )


@pytest.fixture
def worker(fs_worker: WorkerProcess) -> Iterator[WorkerProcess]:
    with wired(fs_worker):
        yield fs_worker


@pytest.fixture
def any_worker(broker_worker: WorkerProcess) -> Iterator[WorkerProcess]:
    with wired(broker_worker):
        yield broker_worker


def send(script: str, order_id: int = 1, **extra: object):
    with transaction.atomic():
        return publish("shop.order_paid", {"order_id": order_id, "script": script, **extra})


def delivery(event, subscription: str, *statuses: str, timeout: float = 30) -> Delivery:
    return wait_for(
        lambda: Delivery.objects.filter(
            event_id=event.id, subscription=subscription, status__in=statuses
        ).first(),
        timeout=timeout,
        what=f"{subscription} {statuses}",
    )


def test_200_succeeds_signed_with_the_standard_headers_and_body(
    any_worker: WorkerProcess, receiver: Receiver
) -> None:
    event = send("ok", 1, card="4242")

    row = delivery(event, "hook-ok", "succeeded")

    (call,) = receiver.of("ok", message_id(event, "hook-ok"))
    assert call.verified, call.error  # the standardwebhooks library accepted it
    assert call.headers["content-type"] == "application/json"
    assert call.json["type"] == "shop.order_paid"
    assert call.json["data"] == {"order_id": 1, "script": "ok", "card": "4242"}
    assert call.json["timestamp"].endswith("Z")
    assert abs(int(call.headers["webhook-timestamp"]) - time.time()) < 60
    assert (row.mode, row.attempts, row.response_status) == ("webhook", 1, 200)
    assert row.response_body == '{"received": true}'
    assert row.response_ms is not None


def test_batched_success_rows_of_webhooks_keep_the_receivers_answer(
    receiver: Receiver, tmp_path: Path
) -> None:
    # SUCCESS_RECORDS = "batched": a webhook's success row waits for the writer like any
    # first attempt's (here only the worker's exit writes), with the answer on it.
    batched = webhook_worker(
        "filesystem",
        receiver,
        tmp_path,
        DJANGO_EVENTS_TEST_SUCCESS_RECORDS="batched",
        DJANGO_EVENTS_TEST_FLUSH_INTERVAL="3600",
    )
    with batched as process, wired(process):
        ok, huge = send("ok", 11), send("huge", 12)
        wait_for(
            lambda: (
                receiver.of("ok", message_id(ok, "hook-ok"))
                and receiver.of("huge", message_id(huge, "hook-huge"))
            ),
            timeout=30,
            what="both webhooks received",
        )
        time.sleep(0.5)  # the answers are read, the handlers done
        assert not Delivery.objects.filter(event_id__in=[ok.id, huge.id]).exists()
        process.stop()  # warm shutdown: each pool process writes its rows as it exits

    rows = {r.subscription: r for r in Delivery.objects.filter(event_id__in=[ok.id, huge.id])}
    assert set(rows) == {"hook-ok", "hook-huge"}
    for row in rows.values():
        assert (row.mode, row.status, row.attempts) == ("webhook", "succeeded", 1)
        assert row.response_status == 200 and row.response_ms is not None
    assert rows["hook-ok"].response_body == '{"received": true}'
    assert rows["hook-huge"].response_body == "x" * 1024


def test_500_then_200_is_retried_with_the_same_id_signed_again(
    any_worker: WorkerProcess, receiver: Receiver
) -> None:
    event = send("flaky", 2)

    row = delivery(event, "hook-flaky", "succeeded")

    first, second = receiver.of("flaky", message_id(event, "hook-flaky"))
    assert first.verified and second.verified
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    assert (row.attempts, row.response_status) == (2, 200)


def test_an_idempotent_webhook_keeps_the_receivers_answer(worker: WorkerProcess) -> None:
    """An ``idempotent: true`` webhook's success is recorded with the handler's writes, by
    its own path: the answer (status, time, body) is kept there too."""
    event = send("idempotent", 12)

    row = delivery(event, "hook-idempotent", "succeeded")

    assert (row.attempts, row.response_status, row.response_body) == (2, 200, "flaky")
    assert row.response_ms is not None


def test_429_waits_for_retry_after(worker: WorkerProcess, receiver: Receiver) -> None:
    event = send("throttled", 3)

    row = delivery(event, "hook-throttled", "succeeded")

    first, second = receiver.of("throttled", message_id(event, "hook-throttled"))
    # Retry-After: 2 against a computed backoff of 0.1 s.
    assert second.at - first.at >= 1.9
    assert second.headers["webhook-signature"] != first.headers["webhook-signature"] or (
        second.headers["webhook-timestamp"] == first.headers["webhook-timestamp"]
    )
    assert row.attempts == 2


@pytest.mark.parametrize(
    ("script", "status", "error"),
    [
        ("gone", 410, "HTTP 410 Gone"),
        ("bad", 400, "HTTP 400"),
        ("redirect", 302, "HTTP 302: redirect to"),
    ],
)
def test_410_other_4xx_and_redirects_fail_at_once(
    worker: WorkerProcess, receiver: Receiver, script: str, status: int, error: str
) -> None:
    event = send(script, 4)

    row = delivery(event, f"hook-{script}", "failed")

    time.sleep(1.0)  # backoff is 0.1 s: a retry would have shown by now
    row.refresh_from_db()
    assert (row.attempts, row.response_status) == (1, status)
    assert error in row.last_error
    assert len(receiver.of(script, message_id(event, f"hook-{script}"))) == 1
    if script == "redirect":
        assert receiver.of("ok", message_id(event, "hook-redirect")) == []  # not followed
    if script == "bad":
        assert row.response_body == '{"error": "bad"}'


def test_a_10_mb_answer_is_read_only_to_its_first_kilobyte(
    worker: WorkerProcess, receiver: Receiver
) -> None:
    event = send("huge", 5)

    row = delivery(event, "hook-huge", "succeeded")

    assert row.response_body == "x" * 1024
    assert row.response_ms is not None and row.response_ms < 5000


def test_a_receiver_that_never_answers_times_out_and_is_retried(
    worker: WorkerProcess, receiver: Receiver
) -> None:
    event = send("hang", 6)

    row = delivery(event, "hook-hang", "failed", timeout=40)

    assert row.attempts == 2
    assert row.last_error.startswith("WebhookFailed: Timed out after")
    assert row.response_status is None
    assert len(receiver.of("hang", message_id(event, "hook-hang"))) == 2


def test_a_receiver_that_trickles_its_answer_is_cut_off_by_the_time_limit(
    worker: WorkerProcess, receiver: Receiver
) -> None:
    # Each read gets a byte within the second the subscription's timeout allows each phase,
    # so only the task's time limit (3 phases and a grace: 8 s) ends the call.
    event = send("trickle", 7)

    row = delivery(event, "hook-trickle", "failed", timeout=40)

    assert row.attempts == 1
    assert row.last_error.startswith("WebhookFailed: Timed out after")
    assert row.last_error.endswith(" ms (SoftTimeLimitExceeded)")
    assert 7_000 <= (row.response_ms or 0) < 20_000
    assert len(receiver.of("trickle", message_id(event, "hook-trickle"))) == 1


def test_a_refused_connection_is_retried_then_fails(worker: WorkerProcess) -> None:
    event = send("closed", 7)

    row = delivery(event, "hook-refused", "failed")

    assert row.attempts == 2
    assert "ConnectError" in row.last_error


def test_cloudevents_format(worker: WorkerProcess, receiver: Receiver) -> None:
    event = send("cloud", 8)

    delivery(event, "hook-cloud", "succeeded")

    (call,) = receiver.of("ok", message_id(event, "hook-cloud"))
    assert call.verified
    assert call.headers["content-type"] == "application/cloudevents+json"
    document = call.json
    assert document["specversion"] == "1.0"
    assert document["type"] == "shop.order_paid"
    assert document["id"] == message_id(event, "hook-cloud")
    assert document["data"] == {"order_id": 8, "script": "cloud"}


def test_via_tasks_a_db_worker_sends_retries_with_the_same_id_and_applies_the_timeout(
    receiver: Receiver, tmp_path
) -> None:
    queue = f"whtk-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_WORKER_DB_NAME": connection.settings_dict["NAME"],
        "DJANGO_EVENTS_TEST_MANIFEST": "webhooks.yaml",
        "DJANGO_EVENTS_TEST_QUEUE": queue,
        "DJANGO_EVENTS_TEST_WEBHOOKS_PRIVATE": "1",
        "TEST_HOOK_SIGNING_SECRET": SECRET,
        "PYTHONPATH": str(ROOT),
        **{f"TEST_HOOK_URL_{s.upper()}": receiver.url(s) for s in SCRIPTS},
        "TEST_HOOK_URL_CLOSED": f"http://127.0.0.1:{closed_port()}/closed",
    }
    command = [sys.executable, "-m", "django", "db_worker", "--queue-name", queue]
    command += ["--interval", "0.1", "--no-startup-delay"]
    with (tmp_path / "db_worker.log").open("ab") as log:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        with brokers.delivery_wiring("filesystem", queue, "webhooks.yaml", DELIVERY="tasks"):
            event = send("flaky", 9)
            hanging = send("hang", 10)
        row = delivery(event, "hook-flaky", "succeeded", timeout=60)
        timed_out = delivery(hanging, "hook-hang", "failed", timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)

    first, second = receiver.of("flaky", message_id(event, "hook-flaky"))
    assert first.verified and second.verified
    assert (row.attempts, row.response_status) == (2, 200)
    # No task backend has a time limit, but the HTTP client's timeout (1 s a phase, not the
    # default 10) ends each call to a receiver that never answers.
    assert timed_out.attempts == 2
    assert timed_out.last_error.startswith("WebhookFailed: Timed out after")
    assert timed_out.last_error.endswith(" ms (ReadTimeout)")
    assert 900 <= (timed_out.response_ms or 0) < 5000
    assert len(receiver.of("hang", message_id(hanging, "hook-hang"))) == 2


def test_ordering_key_sends_a_key_in_recorded_order_each_after_the_last_was_answered(
    any_worker: WorkerProcess, receiver: Receiver
) -> None:
    key = uuid.uuid4().int % 10**9  # this run's own key (the receiver serves every broker)
    with transaction.atomic():
        events = [
            publish("shop.order_paid", {"order_id": key, "script": "ordered", "step": n})
            for n in range(3)
        ]
    # Numbered in the publisher's transaction: its place in line is a webhook delivery's.
    last = Delivery.objects.get(event_id=events[2].id, subscription="hook-ordered")
    assert (last.mode, last.sequence) == ("webhook", 3)
    other = send("ordered", key + 1)  # another key: its own line

    rows = [delivery(e, "hook-ordered", "succeeded", timeout=60) for e in events]
    delivery(other, "hook-ordered", "succeeded", timeout=60)

    # Each event: HTTP 500, then 200 (the "flaky" receiver). The key's next event is sent
    # only once the one before it was answered 2xx.
    calls = sorted(
        (c.at, c.json["data"]["step"])
        for e in events
        for c in receiver.of("flaky", message_id(e, "hook-ordered"))
    )
    assert [step for _, step in calls] == [0, 0, 1, 1, 2, 2]
    assert all(row.attempts == 2 and row.sequence is not None for row in rows)
    assert [row.sequence for row in rows] == [1, 2, 3]


# Endpoints registered at run time (WebhookEndpoint): the admin adds them, the same worker
# path sends to them.


def add_in_admin(client: Any, url: str, patterns: str, *, enabled: bool = True) -> tuple[Any, str]:
    """Add an endpoint as a user would: open the form, keep the secret it offers, save."""
    add = reverse("admin:django_events_webhookendpoint_add")
    page = client.get(add).content.decode()
    offered = re.search(r'name="secret" value="(whsec_[^"]+)"', page)
    assert offered is not None, "the add form offers a fresh secret"
    data = {"url": url, "patterns": patterns, "secret": offered[1], "description": "test"}
    if enabled:
        data["enabled"] = "on"
    answer = client.post(add, data)
    assert answer.status_code == 302, answer.content.decode()[:2000]
    return WebhookEndpoint.objects.get(url=url), offered[1]


def test_an_endpoint_added_in_the_admin_gets_each_event_signed_with_its_secret(
    any_worker: WorkerProcess, admin_client
) -> None:
    with Receiver(SECRET) as own:
        endpoint, own.secret = add_in_admin(admin_client, own.url("ok"), "shop.*")
        name = subscription_name(endpoint.pk)
        # The receiver holds the secret the form offered; the table and the pages never do.
        assert own.secret not in endpoint.secret_sealed
        change = reverse("admin:django_events_webhookendpoint_change", args=[endpoint.pk])
        html = admin_client.get(change).content.decode()
        assert own.secret not in html and endpoint.secret_hint in html

        event = send("ok", 20)

        row = delivery(event, name, "succeeded")
        (call,) = own.of("ok", message_id(event, name))
    assert call.verified, call.error  # the standardwebhooks library, with the endpoint's secret
    assert call.json["type"] == "shop.order_paid"
    assert call.json["data"] == {"order_id": 20, "script": "ok"}
    assert (row.mode, row.attempts, row.response_status) == ("webhook", 1, 200)
    delivery(event, "hook-ok", "succeeded")  # the manifest's webhook got it too


def test_a_disabled_endpoint_is_sent_nothing(worker: WorkerProcess, admin_client) -> None:
    with Receiver(SECRET) as own:
        off, _ = add_in_admin(admin_client, own.url("ok"), "*", enabled=False)
        on, own.secret = add_in_admin(admin_client, own.url("ok") + "?on", "shop.order_paid")

        event = send("ok", 21)

        delivery(event, subscription_name(on.pk), "succeeded")
        time.sleep(0.5)  # the worker has run what it was sent
    assert not Delivery.objects.filter(event_id=event.id, subscription=subscription_name(off.pk))
    assert own.of("ok", message_id(event, subscription_name(off.pk))) == []


def test_disabled_while_queued_fails_then_enabled_and_retried_it_succeeds(
    worker: WorkerProcess, admin_client
) -> None:
    with Receiver(SECRET) as own, override_endpoints(refresh=3600):
        endpoint, own.secret = add_in_admin(admin_client, own.url("ok"), "shop.order_paid")
        name = subscription_name(endpoint.pk)
        assert endpoints.for_event("shop.order_paid")  # this publisher keeps it, enabled...
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(enabled=False)  # ...till then

        event = send("ok", 22)

        failed = delivery(event, name, "failed")
        # Nothing was sent: no attempt counted.
        assert failed.attempts == 0 and "Webhook endpoint disabled" in failed.last_error
        endpoint_list = reverse("admin:django_events_webhookendpoint_changelist")
        action = {"action": "enable_selected", "_selected_action": [str(endpoint.pk)]}
        assert admin_client.post(endpoint_list, action).status_code == 302
        failures = reverse("admin:django_events_failure_changelist")
        retry = {"action": "retry_selected", "_selected_action": [failed.pk]}
        assert admin_client.post(failures, retry).status_code == 302

        row = delivery(event, name, "succeeded")
        (call,) = own.of("ok", message_id(event, name))
    assert call.verified and row.attempts == 1


def test_an_endpoint_failing_for_disable_after_is_disabled_and_sent_nothing_more(
    worker: WorkerProcess, admin_client
) -> None:
    with Receiver(SECRET) as own:
        endpoint, own.secret = add_in_admin(admin_client, own.url("down"), "shop.order_paid")
        name = subscription_name(endpoint.pk)

        event = send("down", 23)

        # HTTP 500 at 0, then 0.6 and 1.8 s later (more on a busy host): an attempt that finds
        # it failing for over 1 s disables it; the attempts after that fail without a call.
        row = delivery(event, name, "failed")
        endpoint.refresh_from_db()
        later = send("ok", 24)  # the publisher reads the endpoints again (refresh: 0)
        delivery(later, "hook-ok", "succeeded")
        time.sleep(0.5)
    calls = own.of("down", message_id(event, name))
    # An attempt that finds it disabled sends nothing and counts no attempt.
    assert row.attempts == len(calls) and 2 <= len(calls) <= 3
    assert row.last_error.endswith(
        "HTTP 500"
        if len(calls) == 3
        else "Webhook endpoint disabled: enable it, then retry this delivery"
    )
    assert not endpoint.enabled
    assert endpoint.failing_since is not None and endpoint.disabled_at is not None
    assert "last error: HTTP 500" in endpoint.disabled_reason
    assert f"Webhook endpoint {endpoint.pk} disabled" in worker.log()
    assert not Delivery.objects.filter(event_id=later.id, subscription=name).exists()
    page = admin_client.get(reverse("admin:django_events_webhookendpoint_changelist"))
    assert "disabled: failing too long" in page.content.decode()


def test_a_success_clears_the_failing_time(worker: WorkerProcess, admin_client) -> None:
    with Receiver(SECRET) as own:
        endpoint, own.secret = add_in_admin(admin_client, own.url("flaky"), "shop.order_paid")
        name = subscription_name(endpoint.pk)

        event = send("flaky", 25)

        row = delivery(event, name, "succeeded")
    endpoint.refresh_from_db()
    assert row.attempts == 2  # 500, then 200 before the endpoint failed for 1 s
    assert endpoint.enabled and endpoint.failing_since is None


def test_a_deleted_endpoints_queued_delivery_fails_without_retry(
    worker: WorkerProcess, admin_client
) -> None:
    with Receiver(SECRET) as own, override_endpoints(refresh=3600):
        endpoint, own.secret = add_in_admin(admin_client, own.url("ok"), "shop.order_paid")
        assert endpoints.for_event("shop.order_paid")
        # Deleted as another process would: this one is not told (no post_delete here).
        WebhookEndpoint.objects.filter(pk=endpoint.pk)._raw_delete(WebhookEndpoint.objects.db)

        event = send("ok", 26)

        row = delivery(event, subscription_name(endpoint.pk), "failed")
    assert row.attempts == 0  # nothing sent: `Delivery.attempts` counts runs (DESIGN 3.7)
    assert "Unknown subscription 'endpoint:" in row.last_error


def test_a_paused_endpoint_holds_its_deliveries_and_resumed_sends_each_once(
    worker: WorkerProcess, admin_client
) -> None:
    from io import StringIO

    from django.core.management import call_command

    from django_events.delivery.pausing import CACHE_SECONDS
    from tests.worker import wait_idle

    with Receiver(SECRET) as own:
        endpoint, own.secret = add_in_admin(admin_client, own.url("ok"), "shop.order_paid")
        name = subscription_name(endpoint.pk)
        call_command("events_pause", name, stdout=StringIO())
        time.sleep(CACHE_SECONDS + 0.2)  # what the worker read before the pause expires

        events = [send("ok", n) for n in (30, 31, 32)]

        for event in events:
            delivery(event, name, "held")
        delivery(events[-1], "hook-ok", "succeeded")  # the manifest's webhook is not paused
        wait_idle(worker)
        ids = [message_id(event, name) for event in events]
        assert [c for c in own.of("ok") if c.headers["webhook-id"] in ids] == []

        out = StringIO()
        call_command("events_resume", name, stdout=out)
        assert "3 re-enqueued for a worker" in out.getvalue()
        rows = [delivery(event, name, "succeeded") for event in events]
        wait_idle(worker)  # a duplicate would have shown by now
        calls = [c for c in own.of("ok") if c.headers["webhook-id"] in ids]
    assert sorted(c.headers["webhook-id"] for c in calls) == sorted(ids)
    assert all(c.verified for c in calls)
    assert {(r.attempts, r.response_status) for r in rows} == {(1, 200)}


def override_endpoints(**options: Any) -> Any:
    value = {**settings.DJANGO_EVENTS, "WEBHOOK_ENDPOINTS": {**ENDPOINTS, **options}}
    return override_settings(DJANGO_EVENTS=value)
