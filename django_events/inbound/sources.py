"""Webhooks from providers: ``POST <prefix>/sources/<source>/`` (a manifest's ``sources``).

The provider's call is verified (``standard-webhooks``, ``github``, ``stripe``, ``hmac`` or
``token``), its type looked up in the source's ``events`` and published as that event; a type
not listed is acknowledged and ignored, so the provider does not retry it.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from django_events.exceptions import InvalidPayload, UnknownEvent
from django_events.inbound.auth import SVIX_HEADERS
from django_events.inbound.idempotency import publish_once, scoped_key
from django_events.inbound.policy import SecretNotConfigured, SourcePolicy
from django_events.inbound.refusal import Refusal, invalid_payload
from django_events.inbound.views import MAX_KEY_LENGTH, read_call
from django_events.logs import log_extra
from django_events.wiring.filters import MISSING, lookup
from django_events.wiring.manifest import format_path
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.inbound")
# What a body field that is no id or type holds, in JSON's words (other numbers: fractions).
JSON_KINDS: dict[type, str] = {
    type(None): "null",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


@csrf_exempt  # providers have no CSRF token; they sign their calls
def source(request: HttpRequest, source: str) -> HttpResponse:
    """Publish the declared event of a verified provider call; answer 202 ``{"id": ...}``."""
    try:
        policy = _policy(source)
        caller, document = read_call(request, policy)
        kind = _locate(request, document, policy.type, "type")
        if kind is None:
            raise Refusal(
                400, "missing_type", f"The call does not say its type ({_where(policy.type)})."
            )
        name = policy.events.get(kind)
        if name is None:
            return JsonResponse({"ignored": kind}, status=202)
        delivery_id = _locate(request, document, policy.idempotency, "delivery id")
        headers = {"source": policy.name, "caller": caller.identity, "source_type": kind}
        keys: dict[str, float] = {}
        if delivery_id is not None:
            headers["idempotency_key"] = delivery_id
            keys[scoped_key(f"source:{policy.name}", delivery_id)] = policy.idempotency_retention
        if caller.replay_key is not None:
            keys[caller.replay_key] = caller.replay_retention or 2 * policy.tolerance
        payload = _payload(document, policy.payload)
        try:
            event_id, replayed = publish_once(name, payload, headers, keys)
        except InvalidPayload as exc:
            at = "$" if policy.payload is None else _json_path(document, policy.payload)
            raise invalid_payload(name, exc, at) from exc
    except Refusal as refusal:
        if refusal.status in (401, 403):
            logger.warning(
                "Webhook to source %r refused: %s", source, refusal.error, extra=log_extra()
            )
        return refusal.response()
    except (SecretNotConfigured, UnknownEvent) as exc:
        logger.error("Webhook to source %r cannot be handled: %s", source, exc, extra=log_extra())
        return Refusal(500, "not_configured", "This endpoint is not configured.").response()
    response = JsonResponse({"id": str(event_id)}, status=202)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


def _policy(name: str) -> SourcePolicy:
    declaration = get_registry().inbound_sources.get(name)
    if declaration is None:
        raise Refusal(404, "unknown_source", f"No source {name!r} receives webhooks.")
    return SourcePolicy.of(declaration)


def _where(locator: dict[str, str]) -> str:
    return f"header {locator['header']}" if "header" in locator else f"field {locator['field']!r}"


def _locate(request: HttpRequest, document: Any, locator: dict[str, str], what: str) -> str | None:
    """The value a header or a body field holds, as text; None when absent."""
    value: Any
    if "header" in locator:
        name = locator["header"]
        value = request.headers.get(name)
        if value is None and name.lower() in SVIX_HEADERS:  # webhook-id sent as svix-id
            value = request.headers.get(SVIX_HEADERS[name.lower()])
    else:
        value = _field(document, locator["field"], what)
    if value is None:
        return None
    if not value or len(value) > MAX_KEY_LENGTH:
        raise Refusal(
            400,
            f"invalid_{what.replace(' ', '_')}",
            f"The {what} ({_where(locator)}) must be 1 to {MAX_KEY_LENGTH} characters.",
        )
    return str(value)


def _field(document: Any, path: str, what: str) -> str | None:
    """The text of a body field; None when absent. A value that is no id or type (null, a
    boolean, a fraction, an object, an array) is refused: left unkeyed, each retry of the
    provider would publish again."""
    value = lookup(document, path) if isinstance(document, dict) else MISSING
    if value is MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        held = JSON_KINDS.get(type(value), "a number")
        raise Refusal(
            400,
            f"invalid_{what.replace(' ', '_')}",
            f"The {what} (field {path!r}) must be a string or an integer, not {held}.",
        )
    return str(value)


def _payload(document: Any, path: str | None) -> Any:
    if path is None:
        return document
    value = lookup(document, path) if isinstance(document, dict) else None
    if not isinstance(value, dict):
        raise Refusal(
            400,
            "invalid_payload",
            f"The body has no object at {path!r} to publish.",
            problems=[{"path": _json_path(document, path), "message": "expected an object"}],
        )
    return value


def _json_path(document: Any, path: str) -> str:
    """The dotted ``payload`` path as a JSON path of the body (``$.data``, ``$.items[0]``)."""
    parts: list[str | int] = []
    value = document
    for part in path.split("."):
        index = int(part) if isinstance(value, list) and part.isdigit() else None
        parts.append(part if index is None else index)
        value = lookup(value, part) if isinstance(value, dict | list) else None
    return format_path(parts)
