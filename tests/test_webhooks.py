"""delivery/webhooks.py without a worker: signing (checked by the standardwebhooks library),
Retry-After, address refusal, and the system checks of webhook subscriptions."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from django.test import override_settings
from standardwebhooks import Webhook

from django_events.delivery import webhooks
from django_events.events import Event
from django_events.wiring.registry import get_registry
from tests.conftest import wiring
from tests.test_checks import assert_reported

pytestmark = pytest.mark.django_db(databases="__all__")

SECRET = "whsec_" + base64.b64encode(b"unit-secret-abcdefghijklmnop").decode()
HOOK = {
    "event": "orders.placed",
    "mode": "webhook",
    "name": "hook",
    "url": "TEST_WH_URL",
    "secret": "TEST_WH_SECRET",
}


def test_signature_verifies_with_the_standardwebhooks_library() -> None:
    body = b'{"type": "x", "timestamp": "t", "data": {"a": 1}}'
    now = int(datetime.now(tz=UTC).timestamp())
    signature = webhooks.sign(webhooks.signing_key_of(SECRET), "msg_1", now, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": signature}

    assert Webhook(SECRET).verify(body, headers) == {
        "type": "x",
        "timestamp": "t",
        "data": {"a": 1},
    }
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(SECRET).verify(body + b" ", headers)


def test_message_id_is_stable_per_event_and_subscription() -> None:
    event = Event(
        id=uuid.uuid4(),
        name="x",
        payload={},
        headers={},
        occurred_at=datetime.now(tz=UTC),
        correlation_id=uuid.uuid4(),
        causation_id=None,
        data={},
    )
    assert webhooks.message_id(event, "a") == webhooks.message_id(event, "a")
    assert webhooks.message_id(event, "a") != webhooks.message_id(event, "b")


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0", 0.0), (None, None), ("soon", None), ("-3", None)],
)
def test_retry_after_in_seconds(header: str | None, expected: float | None) -> None:
    assert webhooks.parse_retry_after(header) == expected


def test_retry_after_as_an_http_date() -> None:
    later = datetime.now(tz=UTC) + timedelta(seconds=120)
    seconds = webhooks.parse_retry_after(format_datetime(later, usegmt=True))
    assert seconds is not None and 115 <= seconds <= 121


def test_retry_after_as_an_http_date_without_a_zone_is_utc() -> None:
    assert webhooks.parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000") == 0.0  # past: now


def test_a_name_that_does_not_resolve_now_is_retried() -> None:
    """A DNS outage ends: worth another attempt, unlike an address refused."""
    with pytest.raises(webhooks.WebhookFailed, match="^Cannot resolve 'hooks.invalid'") as caught:
        webhooks.resolve("hooks.invalid", 443, allow_private=False)
    assert caught.value.retry is True


def test_an_invalid_url_fails_without_retry() -> None:
    with pytest.raises(webhooks.WebhookFailed, match="^Invalid webhook URL: ") as caught:
        webhooks.post("https://[::1/x", b"{}", {}, 1.0)
    assert caught.value.retry is False


def test_a_webhook_whose_url_is_gone_at_delivery_fails_without_retry(
    monkeypatch, django_capture_on_commit_callbacks
) -> None:
    """The worker's settings lack what the publisher's had: recorded, not retried."""
    from django_events import publish
    from django_events.models import Delivery
    from django_events.testing import events_eager

    monkeypatch.delenv("TEST_WH_URL", raising=False)
    with (
        wiring(HOOK),
        override_settings(TEST_WH_SECRET=SECRET),
        events_eager(propagate=False) as eager,
        django_capture_on_commit_callbacks(execute=True),
    ):
        event = publish("orders.placed", {"order_id": 1, "total": 2})

    [failure] = eager.failures
    assert failure.subscription == "hook"
    row = Delivery.objects.get(event_id=event.id, subscription="hook")
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.last_error == (
        "WebhookFailed: Webhook not configured: url 'TEST_WH_URL' is not a setting or "
        "environment variable holding an http(s) URL"
    )


def test_retry_after_is_capped_by_max_backoff() -> None:
    throttled = webhooks.WebhookFailed("HTTP 429", retry=True, retry_after=3600)
    assert webhooks.retry_delay(throttled, 0.5, 300) == 300
    assert webhooks.retry_delay(webhooks.WebhookFailed("x", retry=True), 0.5, 300) == 0.5


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "localhost"])
def test_private_addresses_are_refused_without_the_setting(host: str) -> None:
    with pytest.raises(webhooks.WebhookFailed, match="not a public address") as caught:
        webhooks.resolve(host, 443, allow_private=False)
    assert caught.value.retry is False
    assert webhooks.resolve("127.0.0.1", 443, allow_private=True) == "127.0.0.1"


def test_a_plain_http_url_is_refused_without_the_setting() -> None:
    with pytest.raises(webhooks.WebhookFailed, match=r"http:// URL \(use https\)"):
        webhooks.post("http://127.0.0.1:9/x", b"{}", {}, 1.0)


def test_a_private_address_is_refused_before_any_connection() -> None:
    with pytest.raises(webhooks.WebhookFailed, match="resolves to 127.0.0.1") as caught:
        webhooks.post("https://127.0.0.1:9/x", b"{}", {}, 1.0)
    assert caught.value.retry is False


def test_a_receivers_cookie_is_never_sent_back_nor_compression_asked_for() -> None:
    """One pool of connections for every receiver: what one sets must not reach the next."""
    from tests.webhook_receiver import Receiver

    with Receiver(SECRET) as receiver, wiring(HOOK, WEBHOOKS_ALLOW_PRIVATE=True):
        with override_settings(TEST_WH_URL=receiver.url("cookie"), TEST_WH_SECRET=SECRET):
            subscription = get_registry().subscriptions["hook"]
            for _ in range(2):
                answer = webhooks.deliver(subscription, _event())
                assert (answer.status, answer.body) == (200, "ok")
        calls = receiver.of("cookie")
    assert len(calls) == 2 and all(c.verified for c in calls)
    assert [c.headers.get("cookie") for c in calls] == [None, None]
    assert all("accept-encoding" not in c.headers for c in calls)  # the body is kept as sent


def _event() -> Event:
    now = datetime.now(tz=UTC)
    data = {"order_id": 1, "total": 1.0}
    return Event(uuid.uuid4(), "orders.placed", data, {}, now, uuid.uuid4(), None, data)


def test_webhook_subscription_compiles_as_a_queued_delivery() -> None:
    with wiring(HOOK):
        registry = get_registry()
        subscription = registry.subscriptions["hook"]
        assert subscription.is_queued
        assert subscription in registry.events["orders.placed"].async_
        assert subscription.queue in registry.queues()


def test_webhook_checks_name_the_missing_url_and_secret(monkeypatch) -> None:
    monkeypatch.delenv("TEST_WH_URL", raising=False)
    monkeypatch.delenv("TEST_WH_SECRET", raising=False)
    where = "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]"
    with wiring(HOOK):
        assert_reported(
            (
                "django_events.E320",
                where,
                "Subscription 'hook': webhook url 'TEST_WH_URL' is not a setting or environment "
                "variable holding an http(s) URL",
            ),
            (
                "django_events.E321",
                where,
                "Subscription 'hook': webhook secret 'TEST_WH_SECRET' is not a setting or "
                "environment variable",
            ),
        )
    with wiring(HOOK), override_settings(TEST_WH_URL="https://x.example", TEST_WH_SECRET="nope!"):
        assert_reported(
            (
                "django_events.E321",
                where,
                "Subscription 'hook': webhook secret 'TEST_WH_SECRET' is not whsec_ followed "
                "by base64",
            )
        )
    with wiring(HOOK), override_settings(TEST_WH_URL="https://x.example", TEST_WH_SECRET="whsec_"):
        assert_reported(
            (
                "django_events.E321",
                where,
                "Subscription 'hook': webhook secret 'TEST_WH_SECRET' is not whsec_ followed "
                "by base64",
            )
        )
    # A list is how an inbound secret rotates; an outgoing call is signed with one secret.
    listed = override_settings(TEST_WH_URL=["https://x.example"], TEST_WH_SECRET=[SECRET])
    with wiring(HOOK), listed:
        assert_reported(
            (
                "django_events.E320",
                where,
                "Subscription 'hook': webhook url 'TEST_WH_URL' holds a list, not an http(s) URL",
            ),
            (
                "django_events.E321",
                where,
                "Subscription 'hook': webhook secret 'TEST_WH_SECRET' holds a list, not one "
                "whsec_ secret",
            ),
        )
    with wiring(HOOK), override_settings(TEST_WH_URL="https://x.example", TEST_WH_SECRET=SECRET):
        assert_reported()


def test_a_webhook_secret_without_whsec_is_w321() -> None:
    """Base64 alone signs with the same key (standardwebhooks decodes it so too), but it is
    not the documented whsec_ + base64: perhaps not the secret the receiver was given."""
    where = "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]"
    bare = SECRET.removeprefix("whsec_")
    with wiring(HOOK), override_settings(TEST_WH_URL="https://x.example", TEST_WH_SECRET=bare):
        result = assert_reported(
            (
                "django_events.W321",
                where,
                "Subscription 'hook': webhook secret 'TEST_WH_SECRET' does not start with whsec_",
            )
        )
    assert bare not in result.stdout + result.stderr


def test_a_webhook_url_with_a_user_name_or_password_is_an_error_that_never_quotes_it(
    monkeypatch,
) -> None:
    """They would not be sent (the request goes to the resolved address, without them)."""
    where = "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]"
    literal = {**HOOK, "url": "https://user:pw-123@hooks.example.com/in"}
    with wiring(literal), override_settings(TEST_WH_SECRET=SECRET):
        assert_reported(
            (
                "django_events.E325",
                where,
                "Subscription 'hook': webhook url has a user name or password",
            )
        )
    monkeypatch.setenv("TEST_WH_URL", "https://token-only@hooks.example.com/in")
    with wiring(HOOK), override_settings(TEST_WH_SECRET=SECRET):
        assert_reported(
            (
                "django_events.E325",
                where,
                "Subscription 'hook': webhook url (TEST_WH_URL) has a user name or password",
            )
        )
    monkeypatch.setenv("TEST_WH_URL", "https://hooks.example.com/in?cc=ops@example.com")
    with wiring(HOOK), override_settings(TEST_WH_SECRET=SECRET):
        assert_reported()  # an @ in the query is no user name


def test_a_url_with_a_user_name_or_password_is_refused_at_send_without_retry() -> None:
    with pytest.raises(webhooks.WebhookFailed) as caught:
        webhooks.post("https://user:pw-123@hooks.example.com/in", b"{}", {}, 1.0)
    assert str(caught.value) == (
        "Refused: the URL has a user name or password, which webhooks do not send (the "
        "receiver verifies the signature; a token can go in the path or query)"
    )
    assert caught.value.retry is False


def test_allow_private_without_debug_is_w320() -> None:
    with wiring(WEBHOOKS_ALLOW_PRIVATE=True):
        assert_reported(
            (
                "django_events.W320",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] is on with DEBUG = False: webhooks "
                "may reach private and loopback addresses",
            )
        )
    with wiring(WEBHOOKS_ALLOW_PRIVATE=True), override_settings(DEBUG=True):
        assert_reported()


def test_a_webhook_subscription_needs_url_and_secret_and_no_handler(tmp_path) -> None:
    from tests.test_checks import events_check, manifest

    _, settings_ = manifest(
        tmp_path,
        """
        version: 1
        subscriptions:
          - {event: orders.placed, mode: webhook, url: "http://plain.example/x", secret: S}
          - {event: orders.placed, mode: webhook, handler: a.b, url: U, secret: S}
          - {event: orders.placed, mode: webhook}
        """,
    )
    with settings_:
        result = events_check()
    messages = sorted(m for _, _, m in result.reported)
    assert messages == [
        # Masked: a literal URL's path or query may hold a token.
        "$.subscriptions[0].url: '•••' does not match '^(https://\\\\S+|[A-Z][A-Z0-9_]*)$'",
        "$.subscriptions[1].handler: 'handler' is not allowed with mode: webhook",
        "$.subscriptions[2]: 'secret' is a required property",
        "$.subscriptions[2]: 'url' is a required property",
    ]


def test_events_list_shows_a_webhook_without_its_urls_path_or_query() -> None:
    import json
    from io import StringIO

    from django.core.management import call_command

    literal = {**HOOK, "url": "https://hooks.example.com/in?token=s3cret"}
    out = StringIO()
    with wiring(literal):
        call_command("events_list", format="json", stdout=out)
    (shown,) = [s for e in json.loads(out.getvalue())["events"] for s in e["subscriptions"]]
    assert shown["handler"] == "webhook -> https://hooks.example.com/"
    assert (shown["mode"], shown["queue"]) == ("webhook", "django_events")
    assert "s3cret" not in out.getvalue()
