"""Who is calling: HMAC signatures, bearer tokens, or a Django user with a permission."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import SESSION_KEY
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from django_events.inbound import signing
from django_events.inbound.policy import (
    InboundPolicy,
    SecretNotConfigured,
    SourcePolicy,
    credentials,
)
from django_events.inbound.refusal import Refusal

HMAC_CHALLENGE = {"WWW-Authenticate": 'HMAC-SHA256 realm="django_events"'}
TOKEN_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="django_events"'}
# Providers' schemes define no challenge of their own, but a 401 MUST carry one (RFC 9110
# 15.5.2, https://www.rfc-editor.org/rfc/rfc9110#status.401): each names its scheme, as the
# source's ``auth`` does. Providers ignore it; a person debugging a refused call reads it.
STANDARD_WEBHOOKS_CHALLENGE = {"WWW-Authenticate": 'Standard-Webhooks realm="django_events"'}
GITHUB_CHALLENGE = {"WWW-Authenticate": 'GitHub realm="django_events"'}
STRIPE_CHALLENGE = {"WWW-Authenticate": 'Stripe realm="django_events"'}

STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
# Svix, and the providers that send through it (Clerk, Resend, ...), name the same headers
# svix-*; its own libraries accept either spelling.
SVIX_HEADERS = {name: name.replace("webhook-", "svix-") for name in STANDARD_HEADERS}
GITHUB_HEADER = "X-Hub-Signature-256"
STRIPE_HEADER = "Stripe-Signature"
STANDARD_TOLERANCE = 300.0  # fixed by the Standard Webhooks specification (and library)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller; ``replay_key`` names an exact replay of a signed call,
    remembered ``replay_retention`` seconds (None: twice the policy's tolerance)."""

    identity: str
    replay_key: str | None = None
    replay_retention: float | None = None


def authenticate(request: HttpRequest, policy: InboundPolicy | SourcePolicy, body: bytes) -> Caller:
    """Return who is calling, or raise ``Refusal`` (401 or 403).

    Raises ``SecretNotConfigured`` when the policy's secret cannot be read.
    """
    if policy.auth == "standard-webhooks":
        return _standard_webhooks(request, policy, body)
    if policy.auth == "github":
        return _github(request, policy, body)
    if policy.auth == "stripe":
        return _stripe(request, policy, body)
    if policy.auth == "hmac":
        return _hmac(request, policy, body)
    if policy.auth == "token":
        return _token(request, policy)
    return _permission(request, policy)


def _missing(challenge: dict[str, str]) -> Refusal:
    return Refusal(401, "missing_credentials", "No credentials were given.", headers=challenge)


def _invalid(challenge: dict[str, str]) -> Refusal:
    # Never why (bad digest, stale timestamp, unknown key): that would help a forger.
    return Refusal(401, "invalid_credentials", "The credentials are not valid.", headers=challenge)


def _hmac(request: HttpRequest, policy: InboundPolicy | SourcePolicy, body: bytes) -> Caller:
    stamp = request.headers.get(signing.TIMESTAMP_HEADER)
    given = request.headers.get(signing.SIGNATURE_HEADER)
    if not stamp or not given:
        raise _missing(HMAC_CHALLENGE)
    pairs = credentials(policy.secret or "")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:  # int() caps digits
        raise _invalid(HMAC_CHALLENGE)
    if abs(time.time() - int(stamp)) > policy.tolerance:
        raise _invalid(HMAC_CHALLENGE)
    # Several comma-separated signatures let a sender sign with an old and a new secret.
    candidates = [c.strip() for c in given.split(",")]
    for identity, secret in pairs:
        expected = signing.signature(secret, stamp, body)
        if any(signing.matches(expected, c) for c in candidates):
            return Caller(f"hmac:{identity}", replay_key=_replay_key(identity, stamp, body))
    raise _invalid(HMAC_CHALLENGE)


def standard_webhooks_verifiers(name: str) -> list[tuple[str, Any]]:
    """The (identity, ``standardwebhooks.Webhook``) of each secret held by ``name``.

    Raises ``SecretNotConfigured`` for a secret that is not ``whsec_`` + base64, or when the
    ``standardwebhooks`` package (extra ``webhooks``) is not installed.
    """
    try:
        from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook
    except ImportError as exc:
        raise SecretNotConfigured(
            name,
            "needs the standardwebhooks package (django-event-wiring[webhooks])",
            missing=False,
        ) from exc
    verifiers = []
    for identity, secret in credentials(name):
        raw = secret.removeprefix("whsec_")
        try:
            # The library decodes leniently (any text passes): refuse what is not base64.
            base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
            verifiers.append((identity, Webhook(secret)))
        except (binascii.Error, ValueError, EmptyWebhookSecretError) as exc:
            raise SecretNotConfigured(
                name, "must be a Standard Webhooks secret: whsec_ and base64", missing=False
            ) from exc
    return verifiers


def _standard_webhooks(
    request: HttpRequest, policy: SourcePolicy | InboundPolicy, body: bytes
) -> Caller:
    from standardwebhooks.webhooks import WebhookVerificationError

    headers = standard_webhook_headers(request)
    if not all(headers.values()):
        raise _missing(STANDARD_WEBHOOKS_CHALLENGE)
    # The library reads the time with float() and signs it floored: "1796458200.0" or
    # "01796458200" would pass too, and each spelling would be a new call to the replay key.
    stamp = headers["webhook-timestamp"]
    if not (stamp.isascii() and stamp.isdigit() and stamp == str(int(stamp))):
        raise _invalid(STANDARD_WEBHOOKS_CHALLENGE)
    for identity, verifier in standard_webhooks_verifiers(policy.secret or ""):
        try:
            # The library's own check: several "v1," signatures, 5 minutes either way.
            verifier.verify(body, headers, json_parse=False)
        except WebhookVerificationError:
            continue
        except ValueError:  # a malformed signature list, bad base64, a body not UTF-8
            raise _invalid(STANDARD_WEBHOOKS_CHALLENGE) from None
        key = _replay_key(identity, f"{headers['webhook-id']}.{headers['webhook-timestamp']}", body)
        return Caller(f"standard-webhooks:{identity}", key, 2 * STANDARD_TOLERANCE)
    raise _invalid(STANDARD_WEBHOOKS_CHALLENGE)


def standard_webhook_headers(request: HttpRequest) -> dict[str, str]:
    """A Standard Webhooks call's id, timestamp and signature headers, by their standard
    names ("" when absent): ``webhook-*``, else Svix's ``svix-*``."""
    headers = {name: request.headers.get(name, "") for name in STANDARD_HEADERS}
    if any(headers.values()):
        return headers
    return {name: request.headers.get(svix, "") for name, svix in SVIX_HEADERS.items()}


def _github(request: HttpRequest, policy: SourcePolicy | InboundPolicy, body: bytes) -> Caller:
    given = request.headers.get(GITHUB_HEADER)
    if not given:
        raise _missing(GITHUB_CHALLENGE)
    for identity, secret in credentials(policy.secret or ""):
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if signing.matches(expected, given.strip()):
            # GitHub signs no timestamp: a captured call is refused again for as long as a
            # delivery id is remembered, whatever X-GitHub-Delivery (unsigned) it carries.
            key = _replay_key(identity, "", body)
            return Caller(f"github:{identity}", key, policy.idempotency_retention)
    raise _invalid(GITHUB_CHALLENGE)


def _stripe(request: HttpRequest, policy: SourcePolicy | InboundPolicy, body: bytes) -> Caller:
    given = request.headers.get(STRIPE_HEADER)
    if not given:
        raise _missing(STRIPE_CHALLENGE)
    items = [item.strip().partition("=") for item in given.split(",")]
    stamps = [value for key, _, value in items if key == "t"]
    candidates = [value for key, _, value in items if key == "v1"]
    if not stamps or not candidates:
        raise _invalid(STRIPE_CHALLENGE)
    stamp = stamps[0]
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise _invalid(STRIPE_CHALLENGE)
    if abs(time.time() - int(stamp)) > policy.tolerance:
        raise _invalid(STRIPE_CHALLENGE)
    signed = stamp.encode() + b"." + body
    for identity, secret in credentials(policy.secret or ""):
        # Stripe keys the HMAC with the whole secret, whsec_ prefix included.
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        if any(signing.matches(expected, c) for c in candidates):
            return Caller(f"stripe:{identity}", replay_key=_replay_key(identity, stamp, body))
    raise _invalid(STRIPE_CHALLENGE)


def _replay_key(identity: str, stamp: str, body: bytes) -> str:
    # Not the signature: a call signed with two secrets, replayed with one, is the same call.
    digest = hashlib.sha256(f"{identity}\n{stamp}.".encode() + body).hexdigest()
    return f"signed:{digest}"


def _token(request: HttpRequest, policy: InboundPolicy | SourcePolicy) -> Caller:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _missing(TOKEN_CHALLENGE)
    for identity, secret in credentials(policy.secret or ""):
        if signing.matches(secret, token):
            return Caller(f"token:{identity}")
    raise _invalid(TOKEN_CHALLENGE)


def _permission(request: HttpRequest, policy: InboundPolicy | SourcePolicy) -> Caller:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise Refusal(403, "not_authenticated", "Log in to call this endpoint.")
    session = getattr(request, "session", None)
    if session is not None and session.get(SESSION_KEY) is not None:
        # The browser's session cookie authenticates this call: it must prove its origin.
        reason = _csrf_failure(request)
        if reason is not None:
            raise Refusal(403, "csrf_failed", f"CSRF check failed: {reason}")
    if not user.has_perm(policy.permission or ""):
        raise Refusal(403, "permission_denied", "You do not have permission to send this event.")
    return Caller(f"user:{user.get_username()}")


class _CsrfCheck(CsrfViewMiddleware):
    """Django's CSRF middleware, asked for its verdict instead of a 403 page."""

    def _reject(self, request: HttpRequest, reason: str) -> HttpResponse:
        response = HttpResponse(status=403)
        response.reason_phrase = reason
        return response


def _no_response(request: HttpRequest) -> HttpResponse:
    raise AssertionError("the CSRF check never calls the view")


def _csrf_failure(request: HttpRequest) -> str | None:
    check = _CsrfCheck(_no_response)
    check.process_request(request)
    response = check.process_view(request, _no_response, (), {})
    return None if response is None else response.reason_phrase
