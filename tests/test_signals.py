"""delivery_failed in-process: under events_eager (once, whatever the retries), for sync
deliveries (and their retries), and a receiver that raises breaks nothing."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.test import override_settings

from django_events import PermanentFailure, RetryLater, publish
from django_events.models import Delivery
from django_events.signals import delivery_failed
from django_events.testing import EagerDeliveryError, events_eager
from tests.app.models import HandlerRun
from tests.conftest import wiring
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.django_db(transaction=True)

FAILS = "tests.app.handlers.always_fails"
PAYLOAD = {"order_id": 4, "total": 10.0}
SECRET = "whsec_" + base64.b64encode(b"signal-secret-0123456789abcdef").decode()


def sub(name: str, handler: str, mode: str = "async", **keys: Any) -> dict[str, Any]:
    return {"event": "orders.placed", "handler": handler, "mode": mode, "name": name, **keys}


@pytest.fixture
def signals() -> Iterator[list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    def receiver(sender: str, **kwargs: Any) -> None:
        sent.append({"sender": sender, **kwargs})

    delivery_failed.connect(receiver)
    yield sent
    delivery_failed.disconnect(receiver)


def test_sent_once_under_events_eager_after_every_retry(signals) -> None:
    with (
        wiring(sub("eager-fails", FAILS, retry={"max_attempts": 4})),
        events_eager(propagate=False),
    ):
        event = publish("orders.placed", PAYLOAD)

    assert HandlerRun.objects.filter(handler="always_fails").count() == 4
    assert len(signals) == 1
    sent = signals[0]
    assert sent["sender"] == sent["subscription"] == "eager-fails"
    assert sent["event"].id == sent["event_id"] == event.id
    assert (sent["mode"], sent["attempts"]) == ("async", 4)
    assert sent["error"] == "RuntimeError: boom for 4"
    assert isinstance(sent["exception"], RuntimeError)


def test_not_sent_when_a_retry_succeeds(signals) -> None:
    with wiring(MANIFESTS=_manifests("failctl.yaml")), events_eager():
        publish("fc.job", {"n": 1, "times": 2, "counts": False})
    assert HandlerRun.objects.filter(handler="retry_later").count() == 3
    assert signals == []


def test_eager_counts_only_counted_runs_and_signals_once(signals) -> None:
    payload = {"n": 4, "times": 3, "counts": False, "then_fail": True}
    with wiring(MANIFESTS=_manifests("failctl.yaml")), events_eager(propagate=False):
        publish("fc.job", payload)
    assert HandlerRun.objects.filter(handler="retry_later").count() == 5
    assert [(s["subscription"], s["attempts"]) for s in signals] == [("fc-retry-later", 5)]


def test_eager_stops_a_handler_that_never_counts(signals) -> None:
    with (
        wiring(MANIFESTS=_manifests("failctl.yaml")),
        events_eager() as eager,
        pytest.raises(EagerDeliveryError, match=r"RetryLater\(counts=False\) 100 times"),
    ):
        publish("fc.job", {"n": 1, "times": 10_000, "counts": False})
    assert HandlerRun.objects.filter(handler="retry_later").count() == 100
    assert [f.subscription for f in eager.failures] == ["fc-retry-later"]


def test_sync_failure_sends_it_after_its_row_is_written_and_so_does_its_retry(
    signals,
) -> None:
    seen_rows: list[str] = []
    delivery_failed.connect(
        lambda sender, **kw: seen_rows.append(
            Delivery.objects.get(event_id=kw["event_id"], subscription=sender).status
        ),
        weak=False,
        dispatch_uid="rows",
    )
    try:
        with wiring(sub("sync-fails", FAILS, "sync")):
            event = publish("orders.placed", PAYLOAD)
            assert [(s["subscription"], s["mode"], s["attempts"]) for s in signals] == [
                ("sync-fails", "sync", 1)
            ]
            assert seen_rows == ["failed"]
            call_command("events_retry", "--all", stdout=_Null())
    finally:
        delivery_failed.disconnect(dispatch_uid="rows")
    assert [(s["event_id"], s["attempts"]) for s in signals] == [(event.id, 1), (event.id, 2)]


def test_a_webhook_failure_says_mode_webhook_as_its_row_does(signals) -> None:
    # It said "async" for every delivery a worker ran, while the row said "webhook".
    hook = {"event": "orders.placed", "mode": "webhook", "name": "crm"}
    hook |= {"url": "TEST_WH_URL", "secret": "TEST_WH_SECRET"}
    with (
        Receiver(SECRET) as receiver,
        override_settings(TEST_WH_URL=receiver.url("gone"), TEST_WH_SECRET=SECRET),
        wiring(hook, WEBHOOKS_ALLOW_PRIVATE=True),
        events_eager(propagate=False),
    ):
        event = publish("orders.placed", PAYLOAD)

    row = Delivery.objects.get(event_id=event.id, subscription="crm")
    assert (row.mode, row.status, row.attempts) == ("webhook", "failed", 1)
    assert [(s["subscription"], s["mode"], s["attempts"], s["error"]) for s in signals] == [
        ("crm", "webhook", 1, "WebhookFailed: HTTP 410 Gone: the receiver is gone")
    ]


def test_a_receiver_that_raises_is_logged_and_delivery_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(sender: str, **kwargs: Any) -> None:
        raise ValueError("receiver bug")

    delivery_failed.connect(broken)
    caplog.set_level(logging.ERROR, "django_events.signals")
    try:
        subs = (sub("sync-fails", FAILS, "sync"), sub("after", "tests.app.handlers.record"))
        with wiring(*subs), events_eager():
            publish("orders.placed", PAYLOAD)
    finally:
        delivery_failed.disconnect(broken)
    assert Delivery.objects.get(subscription="sync-fails").status == "failed"
    assert Delivery.objects.get(subscription="after").status == "succeeded"
    assert "A delivery_failed receiver" in caplog.text
    assert "receiver bug" in caplog.text


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (RetryLater(3), "retry in 3s"),
        (RetryLater(0.5, counts=False), "retry in 0.5s (not counted)"),
        (PermanentFailure("gone"), "gone"),
    ],
)
def test_exceptions_read_well(exc: Exception, text: str) -> None:
    assert str(exc) == text


def test_retry_later_refuses_negative_seconds() -> None:
    with pytest.raises(ValueError, match="RetryLater needs seconds >= 0, got -1"):
        RetryLater(-1)


def _manifests(*names: str) -> list[Any]:
    from django.conf import settings

    return [settings.BASE_DIR / "manifests" / n for n in ("base.yaml", *names)]


class _Null:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass
