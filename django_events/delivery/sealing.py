"""Sealing payloads with ``redact`` fields, so that Celery's monitoring never shows them.

A task message's argument is what `celery inspect active|reserved|scheduled`, task events
and Flower display. For an event that declares ``redact``, the message carries the payload
masked as the admin shows it, plus ``sealed``: the whole payload encrypted with AES-256-GCM
under a key derived from ``SECRET_KEY``, bound to the event's id (a sealed payload moved to
another event does not open). Workers open it with ``SECRET_KEY`` or one of
``SECRET_KEY_FALLBACKS`` (key rotation, as Django's signing does).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.utils.crypto import salted_hmac

from django_events.wiring.redaction import redact

SALT = "django_events.delivery.sealing"
SECRET_SALT = "django_events.delivery.sealing.secrets"  # another key for stored secrets
NONCE = 12  # bytes: AES-GCM's standard nonce, random per message


class Unsealable(ValueError):
    """A sealed payload that none of this process's keys opens."""


def seal(
    data: dict[str, Any], paths: Sequence[str], event_id: str
) -> tuple[dict[str, Any], str | None]:
    """Return the payload masked at ``paths``, and the sealed payload (None: nothing masked)."""
    masked = redact(data, paths)
    if masked is data:  # none of the paths is in this payload: nothing to hide
        return data, None
    plain = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    nonce = os.urandom(NONCE)
    sealed = _ciphers(_secrets())[0].encrypt(nonce, plain, event_id.encode())
    return masked, base64.b64encode(nonce + sealed).decode("ascii")


def unseal(token: str, event_id: str) -> dict[str, Any]:
    """The payload sealed in ``token``; `Unsealable` if no key of this process opens it."""
    try:
        raw = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Unsealable("the sealed payload is not base64") from exc
    for cipher in _ciphers(_secrets()):
        try:
            plain = cipher.decrypt(raw[:NONCE], raw[NONCE:], event_id.encode())
        except InvalidTag:
            continue
        data = json.loads(plain)
        if isinstance(data, dict):
            return data
        raise Unsealable("the sealed payload is not an object")
    raise Unsealable("the sealed payload opens with neither SECRET_KEY nor SECRET_KEY_FALLBACKS")


def seal_event(message: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """An event's message body (`messages.event_body`) with its payload masked and ``sealed``."""
    if not paths:
        return message
    masked, token = seal(message["payload"], paths, message["id"])
    if token is None:
        return message
    return {**message, "payload": masked, "sealed": token}


def open_event(message: dict[str, Any]) -> dict[str, Any]:
    """The event's message with its sealed payload opened (as is when it has none)."""
    token = message.get("sealed")
    if token is None:
        return message
    if not isinstance(token, str):
        raise Unsealable(f"sealed is {type(token).__name__}, not a string")
    opened = {k: v for k, v in message.items() if k != "sealed"}
    opened["payload"] = unseal(token, str(message.get("id")))
    return opened


def seal_text(text: str, bound_to: str) -> str:
    """``text`` encrypted (AES-256-GCM, a key from ``SECRET_KEY``), bound to ``bound_to``.

    For secrets kept in the database (a webhook endpoint's signing secret): a copy of the
    table, or the admin's pages, never show them; a row's secret moved to another row does
    not open.
    """
    nonce = os.urandom(NONCE)
    sealed = _ciphers(_secrets(), SECRET_SALT)[0].encrypt(nonce, text.encode(), bound_to.encode())
    return base64.b64encode(nonce + sealed).decode("ascii")


def open_text(token: str, bound_to: str) -> str:
    """The text `seal_text` sealed; `Unsealable` if no key of this process opens it."""
    try:
        raw = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Unsealable("the sealed text is not base64") from exc
    for cipher in _ciphers(_secrets(), SECRET_SALT):
        try:
            return cipher.decrypt(raw[:NONCE], raw[NONCE:], bound_to.encode()).decode()
        except InvalidTag:
            continue
    raise Unsealable("the sealed text opens with neither SECRET_KEY nor SECRET_KEY_FALLBACKS")


def _secrets() -> tuple[str, ...]:
    fallbacks = getattr(settings, "SECRET_KEY_FALLBACKS", None) or ()
    return (settings.SECRET_KEY, *fallbacks)


@lru_cache(maxsize=8)
def _ciphers(secrets: tuple[str, ...], salt: str = SALT) -> list[AESGCM]:
    # The first seals, all open.
    return [
        AESGCM(salted_hmac(salt, "aes-256-gcm", secret=s, algorithm="sha256").digest())
        for s in secrets
    ]
