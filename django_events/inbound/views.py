"""The inbound endpoint: ``POST <prefix>/<event name>/`` with a JSON body publishes the event."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from django_events.conf import conf
from django_events.exceptions import InvalidPayload
from django_events.inbound.auth import Caller, authenticate
from django_events.inbound.idempotency import publish_once, scoped_key
from django_events.inbound.policy import InboundPolicy, SecretNotConfigured, SourcePolicy
from django_events.inbound.refusal import Refusal, invalid_payload
from django_events.logs import log_extra
from django_events.wiring.filters import lookup
from django_events.wiring.manifest import format_path
from django_events.wiring.registry import get_registry
from django_events.wiring.validation import storable_text

logger = logging.getLogger("django_events.inbound")

MAX_KEY_LENGTH = 200  # the stored key adds nothing: the column holds 255


@csrf_exempt  # machine callers have no CSRF token; session callers are checked in auth
def inbound(request: HttpRequest, name: str) -> HttpResponse:
    """Publish the event ``name`` from an authenticated JSON call; answer 202 ``{"id": ...}``."""
    try:
        policy = _policy(name)
        caller, payload = read_call(request, policy)
        key = _idempotency_key(request, policy, payload)
        headers = {"source": policy.source, "caller": caller.identity}
        keys: dict[str, float] = {}
        if key is not None:
            headers["idempotency_key"] = key
            keys[scoped_key(caller.identity, key)] = policy.idempotency_retention
        if caller.replay_key is not None:
            # An exact replay of a signed call publishes nothing while its timestamp is valid,
            # whatever its Idempotency-Key header says: the signature does not cover it.
            keys[caller.replay_key] = 2 * policy.tolerance
        try:
            event_id, replayed = publish_once(name, payload, headers, keys)
        except InvalidPayload as exc:
            raise invalid_payload(name, exc) from exc
    except Refusal as refusal:
        if refusal.status in (401, 403):
            logger.warning(
                "Inbound call to %r refused: %s", name, refusal.error, extra=_log_extra(name)
            )
        return refusal.response()
    except SecretNotConfigured as exc:
        logger.error("Inbound call to %r cannot be checked: %s", name, exc, extra=_log_extra(name))
        return Refusal(500, "not_configured", "This endpoint is not configured.").response()
    response = JsonResponse({"id": str(event_id)}, status=202)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


def _log_extra(name: str) -> dict[str, Any]:
    return {**log_extra(), "event_name": name}  # no event exists yet, only its name


def _policy(name: str) -> InboundPolicy:
    compiled = get_registry().events.get(name)
    policy = InboundPolicy.of(compiled.declaration) if compiled is not None else None
    if policy is None:
        raise Refusal(404, "unknown_event", f"No event {name!r} accepts inbound calls.")
    return policy


def read_call(request: HttpRequest, policy: InboundPolicy | SourcePolicy) -> tuple[Caller, Any]:
    """The caller and the JSON document of a POST, checked in the order every inbound
    endpoint answers: method (405), media type (415), size (413), credentials, JSON (400)."""
    if request.method != "POST":
        raise Refusal(405, "method_not_allowed", "Use POST.", headers={"Allow": "POST"})
    require_json(request)
    body = read_body(request, policy.max_body or conf.INBOUND_MAX_BODY)
    caller = authenticate(request, policy, body)
    return caller, parse_json(body)


def require_json(request: HttpRequest) -> None:
    """Refuse (415) a body that is not ``application/json`` or ``application/*+json``."""
    content_type = request.content_type or ""
    if content_type != "application/json" and not (
        content_type.startswith("application/") and content_type.endswith("+json")
    ):
        raise Refusal(415, "unsupported_media_type", "Send the payload as application/json.")


def read_body(request: HttpRequest, limit: int) -> bytes:
    """Read at most ``limit`` bytes of the body; refuse (413) a longer one."""
    too_large = Refusal(413, "payload_too_large", f"The body is over {limit} bytes.")
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise too_large
    # read(), not .body: DATA_UPLOAD_MAX_MEMORY_SIZE must not override the endpoint's limit.
    body = request.read(limit + 1)
    if len(body) > limit:
        raise too_large
    return body


def parse_json(body: bytes) -> Any:
    """Parse a UTF-8 JSON body whose strings can be stored; refuse (400) anything else."""
    try:
        # Decoded here: json.loads(bytes) would also read UTF-16 and UTF-32 (RFC 8259: UTF-8).
        # A UTF-8 byte order mark is tolerated, as before.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Refusal(400, "invalid_json", f"The body is not UTF-8: {exc}") from exc
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise Refusal(400, "invalid_json", f"The body is not valid JSON: {exc}") from exc
    unstorable = _unstorable_strings(payload)
    if unstorable:
        raise Refusal(
            400,
            "invalid_payload",
            "The payload holds text that cannot be stored.",
            problems=[
                {"path": path, "message": "NUL (\\u0000) or a lone surrogate in a string"}
                for path in unstorable
            ],
        )
    return payload


def _unstorable_strings(payload: Any) -> list[str]:
    """JSON paths of strings (or of objects, for keys) with NUL or a lone surrogate.

    Valid JSON escapes both; PostgreSQL refuses them in jsonb (a 500 otherwise). Walked with
    a stack: the payload may nest as deep as json.loads allows.
    """
    found: list[str] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), payload)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not storable_text(value):
                found.append(format_path(path))
        elif isinstance(value, dict):
            if not all(storable_text(key) for key in value):
                found.append(format_path(path))
            stack.extend(((*path, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(value))))
    return found


def _idempotency_key(request: HttpRequest, policy: InboundPolicy, payload: Any) -> str | None:
    key: Any = request.headers.get("Idempotency-Key")
    where = "The Idempotency-Key header"
    if key is None and policy.idempotency_key is not None:
        key = lookup(payload, policy.idempotency_key) if isinstance(payload, dict) else None
        where = f"The idempotency key field {policy.idempotency_key!r}"
        if isinstance(key, bool) or not isinstance(key, str | int):
            return None  # absent (or not a key): the schema decides whether it is required
        key = str(key)
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH:
        raise Refusal(400, "invalid_idempotency_key", f"{where} must be 1 to 200 characters.")
    return str(key)
