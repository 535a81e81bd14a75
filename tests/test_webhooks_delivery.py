"""mode: webhook through a real worker to a receiver on 127.0.0.1 that verifies every call with
the standardwebhooks library and answers by script (tests/webhook_receiver.py)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection, transaction

from django_events import publish
from django_events.delivery.webhooks import message_id
from django_events.models import Delivery
from tests import brokers
from tests.webhook_receiver import SCRIPTS, Receiver
from tests.worker import WorkerProcess, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + base64.b64encode(b"outbound-signing-secret-0123456").decode()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET) as running:
        yield running


def webhook_worker(receiver: Receiver, queue: str, log: Path, **env: str) -> WorkerProcess:
    urls = {f"TEST_HOOK_URL_{s.upper()}": receiver.url(s) for s in SCRIPTS}
    urls["TEST_HOOK_URL_CLOSED"] = f"http://127.0.0.1:{closed_port()}/closed"
    return WorkerProcess(
        "filesystem",
        queue,
        connection.settings_dict["NAME"],
        log,
        extra_env={
            "DJANGO_EVENTS_TEST_MANIFEST": "webhooks.yaml",
            "DJANGO_EVENTS_FS_BROKER": str(brokers.FS_FOLDER),
            "DJANGO_EVENTS_TEST_WEBHOOKS_PRIVATE": "1",
            "TEST_HOOK_SIGNING_SECRET": SECRET,
            **urls,
            **env,
        },
    )


@pytest.fixture(scope="module")
def worker(
    receiver: Receiver, django_db_setup, django_db_blocker, tmp_path_factory
) -> Iterator[WorkerProcess]:
    queue = f"wh-{uuid.uuid4().hex[:8]}"
    process = webhook_worker(receiver, queue, tmp_path_factory.mktemp("webhooks") / "worker.log")
    with process, brokers.delivery_wiring("filesystem", queue, "webhooks.yaml"):
        yield process


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
    worker: WorkerProcess, receiver: Receiver
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
    queue = f"whb-{uuid.uuid4().hex[:8]}"
    process = webhook_worker(
        receiver,
        queue,
        tmp_path / "worker.log",
        DJANGO_EVENTS_TEST_SUCCESS_RECORDS="batched",
        DJANGO_EVENTS_TEST_FLUSH_INTERVAL="3600",
    )
    with process, brokers.delivery_wiring("filesystem", queue, "webhooks.yaml"):
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
    worker: WorkerProcess, receiver: Receiver
) -> None:
    event = send("flaky", 2)

    row = delivery(event, "hook-flaky", "succeeded")

    first, second = receiver.of("flaky", message_id(event, "hook-flaky"))
    assert first.verified and second.verified
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    assert (row.attempts, row.response_status) == (2, 200)


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


def test_via_tasks_a_db_worker_sends_and_retries_with_the_same_id(
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
        row = delivery(event, "hook-flaky", "succeeded", timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)

    first, second = receiver.of("flaky", message_id(event, "hook-flaky"))
    assert first.verified and second.verified
    assert (row.attempts, row.response_status) == (2, 200)
