"""Who is calling: HMAC signatures, bearer tokens, or a Django user with a permission."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from django.contrib.auth import SESSION_KEY
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from django_events.inbound import signing
from django_events.inbound.policy import InboundPolicy, credentials
from django_events.inbound.refusal import Refusal

HMAC_CHALLENGE = {"WWW-Authenticate": 'HMAC-SHA256 realm="django_events"'}
TOKEN_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="django_events"'}


@dataclass(frozen=True)
class Caller:
    """An authenticated caller; ``replay_key`` names an exact replay of a signed call."""

    identity: str
    replay_key: str | None = None


def authenticate(request: HttpRequest, policy: InboundPolicy, body: bytes) -> Caller:
    """Return who is calling, or raise ``Refusal`` (401 or 403).

    Raises ``SecretNotConfigured`` when the policy's secret cannot be read.
    """
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


def _hmac(request: HttpRequest, policy: InboundPolicy, body: bytes) -> Caller:
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


def _replay_key(identity: str, stamp: str, body: bytes) -> str:
    # Not the signature: a call signed with two secrets, replayed with one, is the same call.
    digest = hashlib.sha256(f"{identity}\n{stamp}.".encode() + body).hexdigest()
    return f"signed:{digest}"


def _token(request: HttpRequest, policy: InboundPolicy) -> Caller:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _missing(TOKEN_CHALLENGE)
    for identity, secret in credentials(policy.secret or ""):
        if signing.matches(secret, token):
            return Caller(f"token:{identity}")
    raise _invalid(TOKEN_CHALLENGE)


def _permission(request: HttpRequest, policy: InboundPolicy) -> Caller:
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
