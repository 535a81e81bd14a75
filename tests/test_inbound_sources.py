"""Providers' webhooks at POST /events/sources/<source>/, signed by the providers' own code.

Standard Webhooks calls are signed by the ``standardwebhooks`` library, Stripe's by the
``stripe`` library's signing helper, GitHub's by the HMAC GitHub documents (and its own
published test vector).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import stripe
from django.conf import settings
from django.test import Client, override_settings
from standardwebhooks import Webhook

from django_events.inbound import signing
from django_events.models import EventRecord, IdempotencyKey
from tests.app.models import HandlerRun
from tests.conftest import wiring

pytestmark = pytest.mark.django_db

MANIFESTS = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "sources.yaml")]
PARTNER_SECRET = "whsec_" + base64.b64encode(b"partner-secret-0123456789abcdef").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"an-unrelated-secret-9876543210").decode()
GITHUB_SECRET = "It's a Secret to Everybody"
STRIPE_SECRET = "whsec_stripe_test_5f1c2a"
PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "octo/hello"}, "after": "abc"}
ORDER = {"type": "order.created", "timestamp": "2024-05-01T10:00:00Z", "data": {"order_id": 7}}


@pytest.fixture(autouse=True)
def _sources() -> Iterator[None]:
    with (
        wiring(MANIFESTS=MANIFESTS),
        override_settings(
            TEST_GITHUB_SECRET=GITHUB_SECRET,
            TEST_STRIPE_SECRET=STRIPE_SECRET,
            TEST_PARTNER_SECRET=PARTNER_SECRET,
            TEST_SIGNED_SECRET="signed-secret",
            TEST_TOKEN_SECRET="tok_123",
        ),
    ):
        yield


@pytest.fixture
def client() -> Client:
    return Client()


def url(source: str) -> str:
    return f"/events/sources/{source}/"


def post(client: Client, source: str, body: bytes, headers: dict[str, str], **kwargs: Any):
    content_type = kwargs.pop("content_type", "application/json")
    return client.post(
        url(source),
        data=body,
        content_type=content_type,
        headers=headers,
        CONTENT_TYPE=content_type,
        **kwargs,
    )


def records(name: str | None = None) -> list[EventRecord]:
    rows = EventRecord.objects.all()
    return list(rows.filter(name=name) if name else rows)


def assert_nothing_published() -> None:
    assert EventRecord.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0
    assert HandlerRun.objects.count() == 0


# -- Standard Webhooks: signed by the standardwebhooks library ----------------------------------


def standard_headers(
    body: bytes,
    secret: str = PARTNER_SECRET,
    msg_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(tz=UTC)
    signature = Webhook(secret).sign(msg_id, at, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


def test_standard_webhooks_call_publishes_its_data(
    client: Client, django_capture_on_commit_callbacks
) -> None:
    body = json.dumps(ORDER).encode()
    headers = standard_headers(body, msg_id="msg_2b7e1516")

    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, "partner", body, headers)

    assert response.status_code == 202, response.content
    assert response["Content-Type"] == "application/json"
    (record,) = records()
    assert str(record.id) == response.json()["id"]
    assert record.name == "partner.order_created"
    assert record.payload == {"order_id": 7}  # payload: data
    assert record.headers == {
        "source": "partner",
        "caller": "standard-webhooks:TEST_PARTNER_SECRET",
        "source_type": "order.created",
        "idempotency_key": "msg_2b7e1516",
    }
    assert HandlerRun.objects.get().event_id == record.id  # the sync subscription ran


def test_standard_webhooks_sent_with_svix_header_names_are_verified_and_deduplicated(
    client: Client,
) -> None:
    """Svix (and Clerk, Resend through it) names the headers svix-id, svix-timestamp and
    svix-signature by default."""
    body = json.dumps(ORDER).encode()

    def svix_headers(at: datetime | None = None) -> dict[str, str]:
        signed = standard_headers(body, msg_id="msg_svix", at=at)
        return {name.replace("webhook-", "svix-"): value for name, value in signed.items()}

    first = post(client, "partner", body, svix_headers())
    later = datetime.now(tz=UTC) + timedelta(seconds=30)
    again = post(client, "partner", body, svix_headers(at=later))

    assert first.status_code == again.status_code == 202, first.content
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    (record,) = records()
    assert record.headers["idempotency_key"] == "msg_svix"


def test_standard_webhooks_retry_with_the_same_webhook_id_publishes_once(client: Client) -> None:
    body = json.dumps(ORDER).encode()
    first = post(client, "partner", body, standard_headers(body, msg_id="msg_same"))
    # The sender's retry: same id, signed again at a later time.
    later = datetime.now(tz=UTC) + timedelta(seconds=30)
    again = post(client, "partner", body, standard_headers(body, msg_id="msg_same", at=later))

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert len(records()) == 1


def test_standard_webhooks_exact_replay_publishes_once(client: Client) -> None:
    body = json.dumps(ORDER).encode()
    headers = standard_headers(body)
    first = post(client, "partner", body, headers)
    replay = post(client, "partner", body, headers)

    assert replay.json() == first.json()
    assert len(records()) == 1


def test_standard_webhooks_several_signatures_one_valid_is_enough(client: Client) -> None:
    body = json.dumps(ORDER).encode()
    headers = standard_headers(body)
    wrong = standard_headers(body, secret=OTHER_SECRET, msg_id=headers["webhook-id"])
    headers["webhook-signature"] = f"{wrong['webhook-signature']} {headers['webhook-signature']}"

    assert post(client, "partner", body, headers).status_code == 202


def test_standard_webhooks_secret_rotation_accepts_either(client: Client) -> None:
    body = json.dumps(ORDER).encode()
    with override_settings(TEST_PARTNER_SECRET=[OTHER_SECRET, PARTNER_SECRET]):
        response = post(client, "partner", body, standard_headers(body))
    assert response.status_code == 202
    assert records()[0].headers["caller"] == "standard-webhooks:TEST_PARTNER_SECRET"


@pytest.mark.parametrize(
    "variant",
    [
        "tampered",
        "wrong_secret",
        "stale",
        "future",
        "other_id",
        "garbage_signature",
        "v2_only",
        "respelled_timestamp",
        "zero_padded_timestamp",
    ],
)
def test_standard_webhooks_forgeries_are_401(client: Client, variant: str) -> None:
    body = json.dumps(ORDER).encode()
    at = datetime.now(tz=UTC)
    if variant == "stale":
        at -= timedelta(minutes=5, seconds=30)
    if variant == "future":
        at += timedelta(minutes=5, seconds=30)
    secret = OTHER_SECRET if variant == "wrong_secret" else PARTNER_SECRET
    headers = standard_headers(body, secret=secret, at=at)
    if variant == "tampered":
        body = body.replace(b'"order_id": 7', b'"order_id": 8')
    if variant == "other_id":
        headers["webhook-id"] = "msg_not_signed"
    if variant == "garbage_signature":
        headers["webhook-signature"] = "v1,not base64!! nonsense"
    if variant == "v2_only":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    if variant == "respelled_timestamp":  # the library would read it as the signed time
        headers["webhook-timestamp"] += ".0"
    if variant == "zero_padded_timestamp":
        headers["webhook-timestamp"] = "0" + headers["webhook-timestamp"]

    response = post(client, "partner", body, headers)

    assert response.status_code == 401, response.content
    assert response.json()["error"] == "invalid_credentials"
    assert_nothing_published()


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_webhooks_unsigned_is_401_missing(client: Client, missing: str) -> None:
    body = json.dumps(ORDER).encode()
    headers = standard_headers(body)
    del headers[missing]

    response = post(client, "partner", body, headers)

    assert response.status_code == 401
    assert response.json()["error"] == "missing_credentials"
    assert_nothing_published()


def test_unlisted_type_is_acknowledged_and_ignored(client: Client) -> None:
    body = json.dumps({**ORDER, "type": "order.cancelled"}).encode()

    response = post(client, "partner", body, standard_headers(body))

    assert response.status_code == 202
    assert response.json() == {"ignored": "order.cancelled"}
    assert_nothing_published()


def test_unlisted_type_is_still_verified_first(client: Client) -> None:
    body = json.dumps({**ORDER, "type": "order.cancelled"}).encode()
    headers = standard_headers(body, secret=OTHER_SECRET)
    assert post(client, "partner", body, headers).status_code == 401


def test_schema_error_is_400_with_paths_in_the_body_sent(client: Client) -> None:
    body = json.dumps({**ORDER, "data": {"order_id": "seven", "total": -1}}).encode()

    response = post(client, "partner", body, standard_headers(body))

    assert response.status_code == 400
    answer = response.json()
    assert answer["error"] == "invalid_payload"
    # `payload: data` publishes the body's `data`: the paths say where the sender put them.
    assert sorted(p["path"] for p in answer["problems"]) == ["$.data.order_id", "$.data.total"]
    assert_nothing_published()


def test_body_without_the_published_part_is_400(client: Client) -> None:
    body = json.dumps({"type": "order.created", "timestamp": "x"}).encode()
    response = post(client, "partner", body, standard_headers(body))
    assert response.status_code == 400
    assert response.json()["problems"] == [{"path": "$.data", "message": "expected an object"}]


def test_paths_of_a_payload_nested_in_a_list_are_paths_of_the_body(client: Client) -> None:
    nested = Path(settings.BASE_DIR) / "manifests" / "sources_nested.yaml"
    headers = {"Authorization": "Bearer tok_123"}
    with wiring(MANIFESTS=[*MANIFESTS, nested]):
        body = json.dumps({"kind": "batch", "batch": [{"order_id": "seven"}]}).encode()
        invalid = post(client, "batched", body, headers)
        body = json.dumps({"kind": "batch", "batch": []}).encode()
        missing = post(client, "batched", body, headers)

    assert invalid.status_code == 400
    assert [p["path"] for p in invalid.json()["problems"]] == ["$.batch[0].order_id"]
    assert missing.status_code == 400
    assert missing.json()["problems"] == [{"path": "$.batch[0]", "message": "expected an object"}]
    assert_nothing_published()


def test_body_without_a_type_is_400(client: Client) -> None:
    body = json.dumps({"data": {"order_id": 1}}).encode()
    response = post(client, "partner", body, standard_headers(body))
    assert response.status_code == 400
    assert response.json()["error"] == "missing_type"


def test_a_non_whsec_secret_is_500_not_configured(client: Client, caplog) -> None:
    body = json.dumps(ORDER).encode()
    headers = standard_headers(body)
    with override_settings(TEST_PARTNER_SECRET="not base64 at all!"):
        response = post(client, "partner", body, headers)
    assert response.status_code == 500
    assert response.json()["error"] == "not_configured"
    assert "must be a Standard Webhooks secret" in caplog.text
    assert_nothing_published()


# -- GitHub: X-Hub-Signature-256, as GitHub documents it ----------------------------------------


def github_headers(body: bytes, secret: str = GITHUB_SECRET, event: str = "push") -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": str(uuid.uuid4()),
    }


def test_github_documented_test_vector_passes_verification(client: Client) -> None:
    # docs.github.com "Validating webhook deliveries": this secret and body give this digest.
    vector = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    headers = {"X-Hub-Signature-256": f"sha256={vector}", "X-GitHub-Event": "push"}

    response = post(client, "github", b"Hello, World!", headers)

    assert response.status_code == 400  # verified; then refused as not JSON
    assert response.json()["error"] == "invalid_json"
    bad = post(client, "github", b"Hello, World?", headers)
    assert bad.status_code == 401


def test_github_push_publishes_the_body(client: Client) -> None:
    body = json.dumps(PUSH).encode()
    headers = github_headers(body)

    response = post(client, "github", body, headers)

    assert response.status_code == 202, response.content
    (record,) = records()
    assert record.name == "github.push"
    assert record.payload == PUSH
    assert record.headers["source_type"] == "push"
    assert record.headers["idempotency_key"] == headers["X-GitHub-Delivery"]
    assert record.headers["caller"] == "github:TEST_GITHUB_SECRET"


def test_github_ping_is_ignored(client: Client) -> None:
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    response = post(client, "github", body, github_headers(body, event="ping"))
    assert (response.status_code, response.json()) == (202, {"ignored": "ping"})
    assert_nothing_published()


def test_github_redelivery_publishes_once(client: Client) -> None:
    body = json.dumps(PUSH).encode()
    headers = github_headers(body)
    first = post(client, "github", body, headers)
    again = post(client, "github", body, headers)
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true"
    assert len(records()) == 1


def test_github_replay_with_a_new_delivery_header_publishes_once(client: Client) -> None:
    # X-GitHub-Delivery is not signed: a replayer can change it, the body's digest stays.
    body = json.dumps(PUSH).encode()
    first = post(client, "github", body, github_headers(body))
    replay = post(client, "github", body, github_headers(body))
    assert replay.json() == first.json()
    assert len(records()) == 1


@pytest.mark.parametrize("variant", ["tampered", "wrong_secret", "sha1", "bare_hex"])
def test_github_forgeries_are_401(client: Client, variant: str) -> None:
    body = json.dumps(PUSH).encode()
    headers = github_headers(body, secret="wrong" if variant == "wrong_secret" else GITHUB_SECRET)
    if variant == "tampered":
        body = body.replace(b"main", b"prod")
    if variant == "sha1":
        digest = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha1).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha1={digest}"
    if variant == "bare_hex":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"].removeprefix("sha256=")

    response = post(client, "github", body, headers)

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_credentials"
    assert_nothing_published()


def test_github_unsigned_is_401(client: Client) -> None:
    body = json.dumps(PUSH).encode()
    headers = github_headers(body)
    del headers["X-Hub-Signature-256"]
    response = post(client, "github", body, headers)
    assert (response.status_code, response.json()["error"]) == (401, "missing_credentials")


def test_github_schema_error_is_400(client: Client) -> None:
    body = json.dumps({"ref": 3}).encode()
    response = post(client, "github", body, github_headers(body))
    assert response.status_code == 400
    assert {p["path"] for p in response.json()["problems"]} == {"$", "$.ref"}


# -- Stripe: Stripe-Signature, made by the stripe library's own helper ---------------------------


def stripe_event(event_id: str = "evt_1", type_: str = "payment_intent.succeeded") -> bytes:
    event = {
        "id": event_id,
        "object": "event",
        "type": type_,
        "data": {"object": {"id": "pi_1", "object": "payment_intent", "amount": 2000}},
    }
    return json.dumps(event).encode()


def stripe_headers(body: bytes, secret: str = STRIPE_SECRET, at: int | None = None):
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, at)
    return {"Stripe-Signature": header}


def test_stripe_event_publishes_and_the_stripe_library_agrees(client: Client) -> None:
    body = stripe_event()
    headers = stripe_headers(body)
    # The same call passes Stripe's own verification: we check what Stripe checks.
    assert stripe.WebhookSignature.verify_header(body, headers["Stripe-Signature"], STRIPE_SECRET)

    response = post(client, "stripe", body, headers, content_type="application/json")

    assert response.status_code == 202, response.content
    (record,) = records()
    assert record.name == "stripe.payment_succeeded"
    assert record.payload == json.loads(body)
    assert record.headers["idempotency_key"] == "evt_1"
    assert record.headers["caller"] == "stripe:TEST_STRIPE_SECRET"


def test_stripe_retry_of_the_same_event_publishes_once(client: Client) -> None:
    body = stripe_event("evt_retry")
    first = post(client, "stripe", body, stripe_headers(body, at=int(time.time()) - 60))
    again = post(client, "stripe", body, stripe_headers(body))
    assert again.json() == first.json()
    assert len(records()) == 1


def test_stripe_charset_in_content_type_is_json(client: Client) -> None:
    body = stripe_event()
    response = post(
        client, "stripe", body, stripe_headers(body), content_type="application/json; charset=utf-8"
    )
    assert response.status_code == 202


@pytest.mark.parametrize("variant", ["tampered", "wrong_secret", "stale", "no_v1", "no_t"])
def test_stripe_forgeries_are_401(client: Client, variant: str) -> None:
    body = stripe_event()
    at = int(time.time()) - (121 if variant == "stale" else 0)  # the source's tolerance: 120
    secret = "whsec_other" if variant == "wrong_secret" else STRIPE_SECRET
    headers = stripe_headers(body, secret=secret, at=at)
    if variant == "tampered":
        body = body.replace(b"2000", b"2")
    if variant == "no_v1":
        headers["Stripe-Signature"] = headers["Stripe-Signature"].replace("v1=", "v0=")
    if variant == "no_t":
        headers["Stripe-Signature"] = headers["Stripe-Signature"].split(",", 1)[1]

    response = post(client, "stripe", body, headers)

    assert response.status_code == 401, response.content
    assert_nothing_published()


def test_stripe_stale_within_tolerance_passes(client: Client) -> None:
    body = stripe_event()
    response = post(client, "stripe", body, stripe_headers(body, at=int(time.time()) - 100))
    assert response.status_code == 202


def test_stripe_unsigned_is_401(client: Client) -> None:
    response = post(client, "stripe", stripe_event(), {})
    assert (response.status_code, response.json()["error"]) == (401, "missing_credentials")


# -- hmac and token sources ---------------------------------------------------------------------


def test_hmac_source_type_from_a_header(client: Client) -> None:
    body = b'{"n": 1}'
    headers = {**signing.sign("signed-secret", body), "X-Event-Type": "signed"}
    response = post(client, "signed", body, headers)
    assert response.status_code == 202, response.content
    assert records()[0].name == "partner.signed"
    wrong = {**signing.sign("nope", body), "X-Event-Type": "signed"}
    assert post(client, "signed", body, wrong).status_code == 401


def test_hmac_exact_replay_publishes_once(client: Client) -> None:
    body = b'{"n": 1}'
    headers = {**signing.sign("signed-secret", body), "X-Event-Type": "signed"}
    first = post(client, "signed", body, headers)
    again = post(client, "signed", body, headers)
    assert again.json() == first.json()
    assert len(records()) == 1


def test_token_source_type_and_delivery_id_from_fields(client: Client) -> None:
    auth = {"Authorization": "Bearer tok_123"}
    body = b'{"kind": "token", "delivery": "d-1"}'
    first = post(client, "tokened", body, auth)
    again = post(client, "tokened", b'{"kind": "token", "delivery": "d-1", "x": 1}', auth)
    assert first.status_code == 202, first.content
    assert again.json() == first.json()
    assert records()[0].headers["idempotency_key"] == "d-1"
    assert post(client, "tokened", body, {"Authorization": "Bearer nope"}).status_code == 401
    assert post(client, "tokened", body, {}).status_code == 401


def test_a_delivery_id_or_type_that_cannot_be_a_key_is_400(client: Client) -> None:
    body = json.dumps(PUSH).encode()
    long_delivery = {**github_headers(body), "X-GitHub-Delivery": "d" * 300}
    auth = {"Authorization": "Bearer tok_123"}

    too_long = post(client, "github", body, long_delivery)
    empty = post(client, "tokened", b'{"kind": "", "delivery": "d-1"}', auth)

    assert (too_long.status_code, too_long.json()) == (
        400,
        {
            "error": "invalid_delivery_id",
            "detail": "The delivery id (header X-GitHub-Delivery) must be 1 to 200 characters.",
        },
    )
    assert (empty.status_code, empty.json()) == (
        400,
        {"error": "invalid_type", "detail": "The type (field 'kind') must be 1 to 200 characters."},
    )
    assert_nothing_published()


@pytest.mark.parametrize(
    ("delivery", "held"),
    [("null", "null"), ("1.5", "a number"), ('{"n": 1}', "an object"), ("[1]", "an array")],
)
def test_a_delivery_id_field_that_is_no_id_is_400_not_an_unkeyed_call(
    client: Client, delivery: str, held: str
) -> None:
    """Published without a key, each retry of the provider would be a new event."""
    auth = {"Authorization": "Bearer tok_123"}
    body = f'{{"kind": "token", "delivery": {delivery}}}'.encode()

    response = post(client, "tokened", body, auth)

    assert (response.status_code, response.json()) == (
        400,
        {
            "error": "invalid_delivery_id",
            "detail": "The delivery id (field 'delivery') must be a string or an integer, "
            f"not {held}.",
        },
    )
    assert_nothing_published()


def test_a_type_field_that_is_no_type_is_400(client: Client) -> None:
    auth = {"Authorization": "Bearer tok_123"}
    response = post(client, "tokened", b'{"kind": {"name": "token"}}', auth)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_type")
    assert response.json()["detail"] == (
        "The type (field 'kind') must be a string or an integer, not an object."
    )
    assert_nothing_published()


def test_a_call_without_its_delivery_id_is_published_unkeyed(client: Client) -> None:
    """As documented: no id, nothing to recognise a retry by (a signed call's exact replay
    is still refused, by its signature)."""
    auth = {"Authorization": "Bearer tok_123"}
    first = post(client, "tokened", b'{"kind": "token"}', auth)
    again = post(client, "tokened", b'{"kind": "token"}', auth)
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json() != again.json()
    assert all("idempotency_key" not in r.headers for r in records())


# -- what every source shares with the inbound endpoint ------------------------------------------


@pytest.mark.parametrize(
    ("source", "body", "forged", "challenge"),
    [
        (
            "partner",
            json.dumps(ORDER).encode(),
            standard_headers(b"{}", OTHER_SECRET),
            "Standard-Webhooks",
        ),
        ("github", json.dumps(PUSH).encode(), github_headers(b"{}", "nope"), "GitHub"),
        ("stripe", stripe_event(), stripe_headers(b"{}", "whsec_other"), "Stripe"),
        ("signed", b'{"n": 1}', signing.sign("nope", b"{}"), "HMAC-SHA256"),
    ],
)
def test_every_401_carries_a_challenge_naming_the_scheme(
    client: Client, source: str, body: bytes, forged: dict[str, str], challenge: str
) -> None:
    """RFC 9110 15.5.2: a 401 MUST carry WWW-Authenticate, providers' schemes included."""
    unsigned = post(client, source, body, {"X-Event-Type": "signed"})
    invalid = post(client, source, body, {**forged, "X-Event-Type": "signed"})

    assert (unsigned.status_code, unsigned.json()["error"]) == (401, "missing_credentials")
    assert (invalid.status_code, invalid.json()["error"]) == (401, "invalid_credentials")
    for response in (unsigned, invalid):
        assert response["WWW-Authenticate"] == f'{challenge} realm="django_events"'
    assert_nothing_published()


def test_unknown_source_is_404(client: Client) -> None:
    response = post(client, "gitlab", b"{}", {})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_source"


def test_get_is_405(client: Client) -> None:
    response = client.get(url("github"))
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert response.json()["error"] == "method_not_allowed"


def test_form_encoded_is_415(client: Client) -> None:
    body = b"payload=%7B%7D"
    response = post(
        client,
        "github",
        body,
        github_headers(body),
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 415
    assert_nothing_published()


def test_body_over_max_body_is_413(client: Client) -> None:
    body = json.dumps({"kind": "token", "pad": "x" * 300}).encode()
    response = post(client, "tokened", body, {"Authorization": "Bearer tok_123"})
    assert response.status_code == 413
    assert_nothing_published()


def test_missing_secret_setting_is_500(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_GITHUB_SECRET", raising=False)
    body = json.dumps(PUSH).encode()
    with override_settings():
        del settings.TEST_GITHUB_SECRET
        response = post(client, "github", body, github_headers(body))
    assert response.status_code == 500
    assert response.json() == {
        "error": "not_configured",
        "detail": "This endpoint is not configured.",
    }


def test_secret_from_the_environment(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GITHUB_SECRET", "from-env")
    body = json.dumps(PUSH).encode()
    with override_settings():
        del settings.TEST_GITHUB_SECRET
        response = post(client, "github", body, github_headers(body, secret="from-env"))
    assert response.status_code == 202
