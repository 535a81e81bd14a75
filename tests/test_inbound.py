"""The inbound endpoint through Django's test client: every answer, and what gets published."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection, connections, transaction
from django.test import Client, override_settings
from django.utils import timezone

from django_events.inbound import auth, signing
from django_events.inbound.idempotency import scoped_key
from django_events.models import EventRecord, IdempotencyKey
from django_events.wiring.redaction import MASK
from tests.app.models import HandlerRun
from tests.inbound import SECRET, body_of, inbound_wiring, post_raw, post_signed, url

pytestmark = pytest.mark.django_db

TOKEN = "tok_inventory_9c1d0f"
PAID = {"payment_id": "pay_1", "amount": 120.5}


@pytest.fixture(autouse=True)
def _inbound() -> Iterator[None]:
    with (
        inbound_wiring(),
        override_settings(TEST_HOOK_SECRET=SECRET, TEST_HOOK_TOKENS={"inventory": TOKEN}),
    ):
        yield


@pytest.fixture
def client() -> Client:
    return Client()


def records(name: str = "hooks.paid") -> list[EventRecord]:
    return list(EventRecord.objects.filter(name=name))


def assert_nothing_published() -> None:
    assert EventRecord.objects.count() == 0
    assert HandlerRun.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0


def signed_headers(body: bytes, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    return signing.sign(secret, body, timestamp=int(time.time() if at is None else at))


# -- accepted calls -----------------------------------------------------------------------------


def test_signed_call_publishes_through_publish_and_answers_202(
    client: Client, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = post_signed(client, "hooks.paid", PAID)

    assert response.status_code == 202, response.content
    assert response["Content-Type"] == "application/json"
    event_id = uuid.UUID(response.json()["id"])
    (record,) = records()
    assert record.id == event_id
    assert record.payload == PAID
    assert record.headers == {"source": "payments", "caller": "hmac:TEST_HOOK_SECRET"}
    assert len(callbacks) == 1  # delivery hooked on commit, as for any publish()
    record.refresh_from_db()
    assert record.status == "dispatched"  # the async subscription's message went out
    assert "Idempotent-Replayed" not in response


def test_token_call_runs_sync_subscriptions_and_names_the_caller(
    client: Client, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = post_raw(
            client, "hooks.synced", b'{"n": 1}', {"Authorization": f"Bearer {TOKEN}"}
        )

    assert response.status_code == 202, response.content
    (run,) = HandlerRun.objects.filter(handler="record")
    assert str(run.event_id) == response.json()["id"]
    assert run.payload == {"n": 1}
    (record,) = records("hooks.synced")
    assert record.headers == {"source": "http", "caller": "token:inventory"}


def test_structured_json_content_types_are_json(client: Client) -> None:
    body = body_of(PAID)
    response = post_raw(
        client,
        "hooks.paid",
        body,
        signed_headers(body),
        content_type="application/vnd.payments+json; charset=utf-8",
    )
    assert response.status_code == 202, response.content


# -- hmac ---------------------------------------------------------------------------------------


def test_tampered_body_signature_or_secret_is_refused_without_saying_why(client: Client) -> None:
    body = body_of(PAID)
    good = signed_headers(body)
    forged_digest = {**good, "X-Events-Signature": "sha256=" + "0" * 64}
    calls = [
        (body_of({**PAID, "amount": 1.0}), good),  # the body changed after signing
        (body, forged_digest),
        (body, {**good, "X-Events-Signature": good["X-Events-Signature"][7:]}),  # no scheme
        (body, signed_headers(body, secret="whsec_someone_else")),
        (body, {**good, "X-Events-Timestamp": str(int(good["X-Events-Timestamp"]) + 1)}),
        (body, {**good, "X-Events-Timestamp": "soon"}),
        (body, {**good, "X-Events-Timestamp": "9" * 5000}),  # int() would refuse to parse it
        (body, {**good, "X-Events-Signature": "sha256=é" * 3}),  # not even ASCII
    ]
    answers = [post_raw(client, "hooks.paid", b, h) for b, h in calls]

    assert {a.status_code for a in answers} == {401}
    assert {a.content for a in answers} == {
        b'{"error": "invalid_credentials", "detail": "The credentials are not valid."}'
    }
    assert answers[0]["WWW-Authenticate"] == 'HMAC-SHA256 realm="django_events"'
    assert_nothing_published()


def test_timestamps_outside_the_tolerance_are_refused(client: Client) -> None:
    body = body_of(PAID)
    now = time.time()
    for at in (now - 62, now + 62):  # hooks.paid: tolerance 60
        response = post_raw(client, "hooks.paid", body, signed_headers(body, at=at))
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_credentials"
    assert_nothing_published()
    assert (
        post_raw(client, "hooks.paid", body, signed_headers(body, at=now - 55)).status_code == 202
    )


def test_missing_signature_headers_say_so(client: Client) -> None:
    body = body_of(PAID)
    good = signed_headers(body)
    for headers in (
        {},
        {"X-Events-Signature": good["X-Events-Signature"]},
        {"X-Events-Timestamp": good["X-Events-Timestamp"]},
    ):
        response = post_raw(client, "hooks.paid", body, headers)
        assert response.status_code == 401
        assert response.json()["error"] == "missing_credentials"
    assert_nothing_published()


def test_an_exact_replay_publishes_nothing_new(client: Client) -> None:
    body = body_of(PAID)
    headers = signed_headers(body)
    first = post_raw(client, "hooks.paid", body, headers)
    replay = post_raw(client, "hooks.paid", body, headers)

    assert (first.status_code, replay.status_code) == (202, 202)
    assert replay.json() == first.json()
    assert replay["Idempotent-Replayed"] == "true"
    assert len(records()) == 1
    # The provider's real retry is signed anew: a new event, unless it carries a key.
    again = post_raw(client, "hooks.paid", body, signed_headers(body, at=time.time() + 1))
    assert again.status_code == 202
    assert again.json() != first.json()
    assert len(records()) == 2


def test_a_replay_with_another_idempotency_key_or_none_publishes_nothing_new(
    client: Client,
) -> None:
    """The Idempotency-Key header is not signed: a replay must not get past by changing it."""
    body = body_of(PAID)
    headers = signed_headers(body)
    first = post_raw(client, "hooks.paid", body, {**headers, "Idempotency-Key": "k-1"})
    replays = [
        post_raw(client, "hooks.paid", body, {**headers, "Idempotency-Key": "k-2"}),
        post_raw(client, "hooks.paid", body, headers),
    ]

    assert first.status_code == 202
    assert [(r.status_code, r.json(), r["Idempotent-Replayed"]) for r in replays] == [
        (202, first.json(), "true")
    ] * 2
    assert len(records()) == 1


def test_a_replay_with_fewer_of_its_signatures_publishes_nothing_new(client: Client) -> None:
    """A call signed with the old and the new secret, replayed with only one of them."""
    body = body_of(PAID)
    stamp = int(time.time())
    old, new = (signing.signature(s, str(stamp), body) for s in (SECRET, "whsec_new_0001"))
    stamped = {signing.TIMESTAMP_HEADER: str(stamp)}
    with override_settings(TEST_HOOK_SECRET=["whsec_new_0001", SECRET]):
        answers = [
            post_raw(client, "hooks.paid", body, {**stamped, signing.SIGNATURE_HEADER: given})
            for given in (f"{old},{new}", old, new)
        ]

    assert [r.status_code for r in answers] == [202] * 3
    assert {r.json()["id"] for r in answers} == {answers[0].json()["id"]}
    assert len(records()) == 1


def test_a_replay_after_the_tolerance_is_refused(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = body_of(PAID)
    headers = signed_headers(body)
    assert post_raw(client, "hooks.paid", body, headers).status_code == 202

    later = time.time() + 61  # the server's clock, a minute later (tolerance: 60 s)
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: later))
    replay = post_raw(client, "hooks.paid", body, headers)

    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_credentials"
    assert len(records()) == 1


def test_secret_rotation_accepts_the_old_and_the_new_secret(client: Client) -> None:
    with override_settings(TEST_HOOK_SECRET=["whsec_new_0001", SECRET]):
        old = post_signed(client, "hooks.paid", PAID)
        new = post_signed(
            client, "hooks.paid", {**PAID, "payment_id": "p2"}, secret="whsec_new_0001"
        )
        body = body_of({**PAID, "payment_id": "p3"})
        both = signing.sign("whsec_new_0001", body)
        both[signing.SIGNATURE_HEADER] = (
            signing.sign("whsec_retired", body)[signing.SIGNATURE_HEADER]
            + ", "
            + both[signing.SIGNATURE_HEADER]
        )
        several = post_raw(client, "hooks.paid", body, both)
    assert [old.status_code, new.status_code, several.status_code] == [202, 202, 202]


def test_secret_from_the_environment(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOOK_ENV_SECRET", "whsec_from_env_77")
    events = {
        "hooks.env": {"inbound": {"auth": "hmac", "secret": "TEST_HOOK_ENV_SECRET"}},
    }
    with inbound_wiring(EVENTS=events):
        response = post_signed(client, "hooks.env", {"x": 1}, secret="whsec_from_env_77")
    assert response.status_code == 202, response.content
    assert records("hooks.env")[0].headers["caller"] == "hmac:TEST_HOOK_ENV_SECRET"


def test_a_missing_secret_answers_500_and_logs(client: Client, caplog) -> None:
    with override_settings(TEST_HOOK_SECRET=None), caplog.at_level(logging.ERROR):
        response = post_signed(client, "hooks.paid", PAID)
    assert response.status_code == 500
    assert response.json()["error"] == "not_configured"
    assert "TEST_HOOK_SECRET" not in response.content.decode()
    assert "'TEST_HOOK_SECRET' is neither a setting nor an environment variable" in caplog.text
    assert_nothing_published()


# -- token --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (None, "missing_credentials"),
        ("Basic dXNlcjpwdw==", "missing_credentials"),
        ("Bearer ", "missing_credentials"),
        ("Bearer tok_guessed", "invalid_credentials"),
        (f"Bearer {TOKEN}x", "invalid_credentials"),
    ],
)
def test_bad_or_missing_tokens(client: Client, authorization: str | None, error: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = post_raw(client, "hooks.synced", b"{}", headers)
    assert response.status_code == 401
    assert response.json()["error"] == error
    assert response["WWW-Authenticate"] == 'Bearer realm="django_events"'
    assert_nothing_published()


def test_token_held_as_a_plain_setting_or_a_list(client: Client) -> None:
    for value in (TOKEN, ["tok_old", TOKEN]):
        with override_settings(TEST_HOOK_TOKENS=value):
            response = post_raw(client, "hooks.synced", b"{}", {"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 202
    assert {r.headers["caller"] for r in records("hooks.synced")} == {"token:TEST_HOOK_TOKENS"}


# -- permission ---------------------------------------------------------------------------------


@pytest.fixture
def alice() -> User:
    user = User.objects.create_user("alice")
    user.user_permissions.add(Permission.objects.get(codename="add_order"))
    return user


def test_permission_needs_a_logged_in_user_with_the_permission(alice: User) -> None:
    anonymous = post_raw(Client(), "hooks.adjusted", b"{}", {})
    assert anonymous.status_code == 403
    assert anonymous.json()["error"] == "not_authenticated"

    bob = User.objects.create_user("bob")
    client = Client()
    client.force_login(bob)
    denied = post_raw(client, "hooks.adjusted", b"{}", {})
    assert denied.status_code == 403
    assert denied.json()["error"] == "permission_denied"
    assert_nothing_published()


def test_session_callers_need_a_csrf_token(alice: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    refused = post_raw(client, "hooks.adjusted", b'{"delta": 1}', {})
    assert refused.status_code == 403
    assert refused.json()["error"] == "csrf_failed"
    assert_nothing_published()

    client.get("/admin/login/")  # any page that renders a form sets the csrftoken cookie
    token = client.cookies["csrftoken"].value
    accepted = post_raw(client, "hooks.adjusted", b'{"delta": 1}', {"X-CSRFToken": token})
    assert accepted.status_code == 202, accepted.content
    (record,) = records("hooks.adjusted")
    assert record.headers == {"source": "http", "caller": "user:alice"}


def test_the_projects_own_authentication_needs_no_csrf(alice: User) -> None:
    from django.conf import settings

    middleware = [*settings.MIDDLEWARE, "tests.app.middleware.HeaderUserMiddleware"]
    with override_settings(MIDDLEWARE=middleware):
        client = Client(enforce_csrf_checks=True)
        response = post_raw(client, "hooks.adjusted", b"{}", {"X-Test-User": "alice"})
    assert response.status_code == 202, response.content
    assert records("hooks.adjusted")[0].headers["caller"] == "user:alice"


# -- 404, 405, 413, 415, 400 --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hooks.internal", "orders.placed", "nope", "orders.placed.x"])
@pytest.mark.parametrize("method", ["post", "get"])
def test_events_without_an_inbound_block_do_not_exist(
    client: Client, name: str, method: str
) -> None:
    response = client.generic(method.upper(), url(name), b"{}", "application/json")
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_event"
    assert_nothing_published()


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete", "head", "options"])
def test_other_methods_answer_405(client: Client, method: str) -> None:
    response = getattr(client, method)(url("hooks.paid"))
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    if method != "head":
        assert response.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"]
)
def test_bodies_that_are_not_json_answer_415(client: Client, content_type: str) -> None:
    body = body_of(PAID)
    response = post_raw(client, "hooks.paid", body, signed_headers(body), content_type=content_type)
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert_nothing_published()


def test_bodies_over_the_limit_answer_413(client: Client) -> None:
    # hooks.synced: max_body 100 in its declaration
    auth = {"Authorization": f"Bearer {TOKEN}"}
    at_limit = body_of({"pad": "x" * 89})
    assert len(at_limit) == 100
    assert post_raw(client, "hooks.synced", at_limit, auth).status_code == 202
    over = post_raw(client, "hooks.synced", body_of({"pad": "x" * 90}), auth)
    assert over.status_code == 413
    assert over.json() == {"error": "payload_too_large", "detail": "The body is over 100 bytes."}

    # Others: DJANGO_EVENTS["INBOUND_MAX_BODY"], 256 KiB by default.
    body = body_of({**PAID, "pad": "x" * 256 * 1024})
    assert post_raw(client, "hooks.paid", body, signed_headers(body)).status_code == 413
    small = body_of(PAID)
    with inbound_wiring(INBOUND_MAX_BODY=len(small) - 1):
        response = post_raw(client, "hooks.paid", small, signed_headers(small))
    assert response.status_code == 413
    assert EventRecord.objects.filter(name="hooks.paid").count() == 0


def test_the_limit_is_not_djangos_upload_limit(client: Client) -> None:
    body = body_of({**PAID, "pad": "x" * 5000})
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000):
        response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 202


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"{'payment_id': 1}", b"\xff\xfe\x00", b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "truncated", "single-quotes", "not-utf8", "deeply-nested"],
)
def test_malformed_json_answers_400(client: Client, body: bytes) -> None:
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"
    assert_nothing_published()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_bodies_in_utf16_or_utf32_answer_400(client: Client, encoding: str) -> None:
    """json.loads(bytes) would detect these encodings; the endpoint reads UTF-8 only."""
    body = json.dumps(PAID).encode(encoding)
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 400, response.content
    assert response.json()["error"] == "invalid_json"
    assert_nothing_published()


def test_a_utf8_body_with_a_byte_order_mark_is_accepted(client: Client) -> None:
    body = b"\xef\xbb\xbf" + body_of(PAID)
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 202, response.content


@pytest.mark.parametrize("depth", [64, 500])
def test_payloads_nested_deeper_than_publish_allows_answer_400(client: Client, depth: int) -> None:
    """Valid JSON that json.loads reads, nested deeper than MAX_DEPTH (64 levels)."""
    body = b'{"payment_id": "p", "amount": 1, "deep": ' + b"[" * depth + b"]" * depth + b"}"
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 400, response.content
    assert response.json()["error"] == "invalid_payload"
    (problem,) = response.json()["problems"]
    assert problem == {"path": "$.deep" + "[0]" * 63, "message": "nested deeper than 64 levels"}
    assert_nothing_published()


def test_a_payload_nested_as_deep_as_publish_allows_answers_202(client: Client) -> None:
    body = b'{"payment_id": "p", "amount": 1, "deep": ' + b"[" * 63 + b"]" * 63 + b"}"
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 202, response.content


def test_payloads_failing_the_schema_answer_400_with_json_paths(client: Client) -> None:
    response = post_signed(client, "hooks.paid", {"amount": -1, "order": {"id": "seven"}})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_payload"
    assert body["problems"] == [
        {"path": "$", "message": "'payment_id' is a required property"},
        {"path": "$.amount", "message": "-1 is less than the minimum of 0"},
        {"path": "$.order.id", "message": "'seven' is not of type 'integer'"},
    ]
    assert_nothing_published()


def test_schema_problems_do_not_quote_redacted_values(client: Client) -> None:
    payload = {"payment_id": "p", "amount": -10, "card": {"cvv": 1234}}
    response = post_signed(client, "hooks.paid", payload)
    assert response.status_code == 400
    assert response.json()["problems"] == [
        {"path": "$.amount", "message": "-10 is less than the minimum of 0"},
        {"path": "$.card.cvv", "message": f"{MASK!r} is not of type 'string'"},
    ]
    assert_nothing_published()


@pytest.mark.parametrize(
    ("body", "path"),
    [(b"[1, 2]", "$"), (b'"text"', "$"), (b'{"amount": NaN, "payment_id": "p"}', "$.amount")],
)
def test_json_that_is_not_a_payload_answers_400(client: Client, body: bytes, path: str) -> None:
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_payload"
    assert [p["path"] for p in response.json()["problems"]] == [path]
    assert_nothing_published()


def test_a_null_body_is_not_taken_for_an_empty_payload(client: Client) -> None:
    body = b"null"
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_payload"
    assert response.json()["problems"] == [{"path": "$", "message": "expected an object, got null"}]
    assert_nothing_published()


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"payment_id": "a\\u0000b", "amount": 1}', "$.payment_id"),
        (b'{"payment_id": "a\\ud800", "amount": 1}', "$.payment_id"),
        (b'{"payment_id": "p", "amount": 1, "order": {"n\\u0000": [1, "\\udfff"]}}', "$.order"),
    ],
    ids=["nul", "lone-surrogate", "nested-key-and-item"],
)
def test_strings_no_database_can_store_answer_400(client: Client, body: bytes, path: str) -> None:
    """Valid JSON, but PostgreSQL refuses NUL and no UTF-8 column holds a lone surrogate."""
    response = post_raw(client, "hooks.paid", body, signed_headers(body))
    assert response.status_code == 400, response.content
    assert response.json()["error"] == "invalid_payload"
    assert response.json()["problems"][0]["path"] == path
    assert_nothing_published()


def test_an_unstorable_idempotency_key_field_answers_400(client: Client) -> None:
    body = b'{"refund": {"id": "re\\u0000"}}'
    response = post_raw(client, "hooks.refunded", body, signed_headers(body))
    assert response.status_code == 400, response.content
    assert [p["path"] for p in response.json()["problems"]] == ["$.refund.id"]
    assert_nothing_published()


def test_an_idempotency_key_field_that_is_not_a_key_leaves_the_call_unkeyed(
    client: Client,
) -> None:
    """``refund.id`` holding an object or a boolean: the schema decides, no key is kept, so
    the provider's retry (signed again) publishes again."""
    now = time.time()
    for body in (b'{"refund": {"id": {"n": 1}}}', b'{"refund": {"id": true}}'):
        for at in (now - 1, now):
            response = post_raw(client, "hooks.refunded", body, signed_headers(body, at=at))
            assert response.status_code == 202, response.content
            assert "Idempotent-Replayed" not in response

    published = records("hooks.refunded")
    assert len(published) == 4
    assert all("idempotency_key" not in r.headers for r in published)


# -- idempotency --------------------------------------------------------------------------------


def test_a_retry_with_the_same_idempotency_key_returns_the_first_event(
    client: Client, django_capture_on_commit_callbacks
) -> None:
    key = {"Idempotency-Key": "order-7-payment"}
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        first = post_signed(client, "hooks.paid", PAID, headers=key)
        retry = post_signed(client, "hooks.paid", {**PAID, "amount": 1.0}, headers=key)
    assert (first.status_code, retry.status_code) == (202, 202)
    assert retry.json() == first.json()
    assert retry["Idempotent-Replayed"] == "true"
    assert len(callbacks) == 1  # the retry dispatched nothing
    (record,) = records()
    assert record.payload == PAID
    assert record.headers["idempotency_key"] == "order-7-payment"

    other_key = post_signed(
        client, "hooks.paid", {**PAID, "payment_id": "p2"}, headers={"Idempotency-Key": "other"}
    )
    assert other_key.json() != first.json()
    other_event = post_raw(
        client,
        "hooks.synced",
        b"{}",
        {"Authorization": f"Bearer {TOKEN}", **key},
    )
    assert other_event.status_code == 202
    assert "Idempotent-Replayed" not in other_event
    assert EventRecord.objects.count() == 3


def test_callers_do_not_share_idempotency_keys(client: Client) -> None:
    """Another caller's key (a guess, or the same order number) never swallows a call."""
    tokens = {"inventory": TOKEN, "billing": "tok_billing_5e2a91"}
    key = {"Idempotency-Key": "order-7"}
    with override_settings(TEST_HOOK_TOKENS=tokens):
        answers = [
            post_raw(client, "hooks.synced", b"{}", {"Authorization": f"Bearer {token}", **key})
            for token in (TOKEN, "tok_billing_5e2a91", TOKEN)
        ]

    first, other, retry = (r.json()["id"] for r in answers)
    assert first != other
    assert retry == first
    callers = sorted(r.headers["caller"] for r in records("hooks.synced"))
    assert callers == ["token:billing", "token:inventory"]


def test_long_caller_names_and_keys_are_still_told_apart() -> None:
    key = {"Idempotency-Key": "k" * 200}  # with "user:<150 characters>": over the column
    ids = []
    for user in (User.objects.create_user("a" * 150), User.objects.create_user("b" * 150)):
        user.user_permissions.add(Permission.objects.get(codename="add_order"))
        client = Client()
        client.force_login(user)
        ids += [post_raw(client, "hooks.adjusted", b"{}", key).json()["id"] for _ in range(2)]

    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]
    assert len(records("hooks.adjusted")) == 2


def test_an_expired_key_publishes_again(client: Client) -> None:
    key = {"Idempotency-Key": "k-1"}
    first = post_signed(client, "hooks.paid", PAID, headers=key)
    IdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    later = post_signed(client, "hooks.paid", PAID, headers=key)
    assert later.status_code == 202
    assert later.json() != first.json()
    row = IdempotencyKey.objects.get(key__endswith=":k-1")
    assert str(row.event_id) == later.json()["id"]
    assert row.expires_at > timezone.now() + timedelta(seconds=86000)  # default retention


def test_a_payload_field_can_be_the_key(client: Client) -> None:
    first = post_signed(client, "hooks.refunded", {"refund": {"id": "re_1", "n": 1}})
    retry = post_signed(client, "hooks.refunded", {"refund": {"id": "re_1", "n": 2}})
    other = post_signed(client, "hooks.refunded", {"refund": {"id": 2}})
    header = post_signed(
        client, "hooks.refunded", {"refund": {"id": "re_1"}}, headers={"Idempotency-Key": "h"}
    )
    ids = [r.json()["id"] for r in (first, retry, other, header)]
    assert ids[0] == ids[1]
    assert len(set(ids)) == 3  # the header wins over the field
    assert sorted(r.headers["idempotency_key"] for r in records("hooks.refunded")) == [
        "2",
        "h",
        "re_1",
    ]


def test_unusable_idempotency_keys_answer_400(client: Client) -> None:
    for key in ("", "k" * 201):
        response = post_signed(client, "hooks.paid", PAID, headers={"Idempotency-Key": key})
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_idempotency_key"
    assert_nothing_published()


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_racing_calls_with_one_key_publish_once() -> None:
    """The second insert waits for the first transaction, fails, and answers its event."""
    winner = uuid.uuid4()
    inserted = threading.Event()
    saw_a_waiter: list[bool] = []

    def first_call() -> None:
        try:
            with transaction.atomic():
                IdempotencyKey.objects.create(
                    event_name="hooks.paid",
                    key=scoped_key("hmac:TEST_HOOK_SECRET", "race"),
                    event_id=winner,
                    expires_at=timezone.now() + timedelta(hours=1),
                )
                inserted.set()
                # Commit only once the endpoint's insert of the same key waits on this row.
                saw_a_waiter.append(_wait_for_a_lock_waiter(timeout=10))
        finally:
            connections.close_all()

    thread = threading.Thread(target=first_call)
    thread.start()
    assert inserted.wait(10)
    response = post_signed(Client(), "hooks.paid", PAID, headers={"Idempotency-Key": "race"})
    thread.join(10)

    assert response.status_code == 202, response.content
    assert saw_a_waiter == [True]  # the endpoint's lookup missed the row: a real race
    assert response.json() == {"id": str(winner)}
    assert response["Idempotent-Replayed"] == "true"
    assert EventRecord.objects.count() == 0  # our publish rolled back with the failed insert


def _wait_for_a_lock_waiter(timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            # Inside a transaction, pg_stat_activity is a snapshot taken at first use.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return True
            time.sleep(0.02)
    return False


def test_refused_calls_record_and_send_nothing(
    client: Client, django_capture_on_commit_callbacks
) -> None:
    body = body_of(PAID)
    bad = body_of({"payment_id": 1, "amount": "x"})
    calls = [
        ("hooks.paid", body, {**signed_headers(body), "X-Events-Signature": "sha256=00"}, None),
        ("hooks.paid", bad, signed_headers(bad), None),
        ("hooks.paid", b"{", signed_headers(b"{"), None),
        ("hooks.paid", body, signed_headers(body), "text/plain"),
        ("hooks.synced", body_of({"pad": "x" * 200}), {"Authorization": f"Bearer {TOKEN}"}, None),
        ("hooks.internal", body, {}, None),
        ("hooks.adjusted", body, {}, None),
    ]
    with django_capture_on_commit_callbacks() as callbacks:
        statuses = [
            post_raw(client, name, b, h, content_type or "application/json").status_code
            for name, b, h, content_type in calls
        ]
    assert statuses == [401, 400, 400, 415, 413, 404, 403]
    assert callbacks == []  # no delivery was hooked on commit: nothing can be sent
    assert_nothing_published()
