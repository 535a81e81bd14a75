"""Webhooks out (``mode: webhook``): one signed HTTP POST per (event, subscription).

The worker runs the sender as a subscription's handler, so retries, failure records, the
admin's "Retry selected" and replay are those of any async delivery. Signed per Standard
Webhooks (https://www.standardwebhooks.com/): ``webhook-id`` is the same on every attempt of a
delivery, ``webhook-timestamp`` and ``webhook-signature`` are made anew for each one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.conf import settings

from django_events.conf import conf
from django_events.events import Event

if TYPE_CHECKING:
    import httpx

    from django_events.wiring.compiled import Subscription

KEEP_BYTES = 1024  # of a response's body, kept on the Delivery; never more is read
DEFAULT_TIMEOUT = 10.0  # seconds, of each phase of the call (connect, write, read)
USER_AGENT = "django-event-wiring-webhooks"
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True)
class Response:
    """What a receiver answered: status, time taken and the start of its body."""

    status: int | None
    milliseconds: int
    body: str = ""


class WebhookFailed(Exception):
    """A webhook attempt did not succeed; ``retry`` says whether another may.

    ``retry_after`` is the receiver's ``Retry-After`` in seconds, if it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        retry: bool,
        retry_after: float | None = None,
        response: Response | None = None,
    ) -> None:
        super().__init__(message)
        self.retry, self.retry_after, self.response = retry, retry_after, response


class WebhookNotConfigured(LookupError):
    """A webhook's ``url`` or ``secret`` names a setting that is missing or unusable."""


_last_response: ContextVar[Response | None] = ContextVar("webhook_response", default=None)


def last_response() -> Response | None:
    """The answer to the last webhook this context sent (for the Delivery row)."""
    return _last_response.get()


def sender_for(subscription: Subscription) -> Callable[[Event], Response]:
    """The handler of a ``mode: webhook`` subscription: ``send(event)`` POSTs it."""

    def send(event: Event) -> Response:
        return deliver(subscription, event)

    send.__qualname__ = f"webhook[{subscription.name}]"
    return send


def message_id(event: Event, subscription: str) -> str:
    """The ``webhook-id`` of a delivery: the same on every attempt, distinct per subscription."""
    return f"msg_{uuid.uuid5(event.id, subscription).hex}"


def setting_value(name: str) -> Any:
    """The value of the setting ``name``, else of the environment variable ``name``."""
    value = getattr(settings, name, None)
    return os.environ.get(name) if value is None else value


def target_url(declared: str) -> str:
    """The URL a subscription's ``url`` gives: itself (``https://...``) or a setting's value."""
    if declared.startswith("https://"):
        return declared
    value = setting_value(declared)
    if value is None:
        raise WebhookNotConfigured(
            f"url {declared!r} is not a setting or environment variable holding an http(s) URL"
        )
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        held = f"a {type(value).__name__}" if not isinstance(value, str) else "text"
        raise WebhookNotConfigured(f"url {declared!r} holds {held}, not an http(s) URL")
    return value


SECRET_PREFIX = "whsec_"  # of Standard Webhooks secrets: https://www.standardwebhooks.com/


def signing_key(name: str) -> bytes:
    """The key of the secret the setting or env var ``name`` holds (``whsec_`` + base64)."""
    value = setting_value(name)
    if value is None or value == "":
        raise WebhookNotConfigured(f"secret {name!r} is not a setting or environment variable")
    if not isinstance(value, str):
        # A list is how inbound secrets rotate; an outgoing call is signed with one secret.
        raise WebhookNotConfigured(
            f"secret {name!r} holds a {type(value).__name__}, not one whsec_ secret"
        )
    try:
        return signing_key_of(value)
    except ValueError as exc:
        raise WebhookNotConfigured(f"secret {name!r} is not whsec_ followed by base64") from exc


def signing_key_of(secret: str, *, prefixed: bool = False) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (raises ValueError).

    The base64 alone gives the same key, as the ``standardwebhooks`` libraries read it;
    ``prefixed`` refuses it, for a secret typed in now (check W321 warns of a setting's).
    """
    if prefixed and not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"not {SECRET_PREFIX} followed by base64")
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc
    if not key:
        raise ValueError("empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` of ``body``: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def body_of(event: Event, subscription: Subscription, msg_id: str) -> tuple[bytes, str]:
    """The body and content type of the POST, in the subscription's ``format``."""
    occurred = event.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if subscription.declaration.format == "cloudevents":
        # https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md
        document: dict[str, Any] = {
            "specversion": "1.0",
            "id": msg_id,
            "source": "django-event-wiring",
            "type": event.name,
            "time": occurred,
            "datacontenttype": "application/json",
            "data": event.data,
        }
        return json.dumps(document).encode(), "application/cloudevents+json"
    document = {"type": event.name, "timestamp": occurred, "data": event.data}
    return json.dumps(document).encode(), "application/json"


def deliver(subscription: Subscription, event: Event) -> Response:
    """POST ``event`` to the subscription's URL; return the answer, or raise WebhookFailed."""
    _last_response.set(None)
    declaration = subscription.declaration
    try:
        url = target_url(declaration.url or "")
        key = signing_key(declaration.secret or "")
    except WebhookNotConfigured as exc:
        raise WebhookFailed(f"Webhook not configured: {exc}", retry=False) from exc
    return send(url, key, event, subscription, declaration.timeout or DEFAULT_TIMEOUT)


def send(
    url: str, key: bytes, event: Event, subscription: Subscription, timeout: float
) -> Response:
    """POST ``event`` to ``url`` signed with ``key``; return the answer, or raise WebhookFailed.

    The path every webhook takes: manifest subscriptions and run-time endpoints alike.
    """
    _last_response.set(None)
    msg_id = message_id(event, subscription.name)
    body, content_type = body_of(event, subscription, msg_id)
    timestamp = int(time.time())
    headers = {
        "content-type": content_type,
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }
    response = post(url, body, headers, timeout)
    _last_response.set(response)
    return response


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Response:
    """POST to ``url``'s resolved address (checked once); classify the answer."""
    import httpx

    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise WebhookFailed(f"Invalid webhook URL: {exc}", retry=False) from exc
    allow_private = conf.WEBHOOKS_ALLOW_PRIVATE
    if target.scheme != "https" and not (target.scheme == "http" and allow_private):
        raise WebhookFailed(f"Refused: {target.scheme}:// URL (use https)", retry=False)
    if "@" in urlsplit(url).netloc:  # refused where declared; an older endpoint, an env change
        raise WebhookFailed(
            "Refused: the URL has a user name or password, which webhooks do not send "
            "(the receiver verifies the signature; a token can go in the path or query)",
            retry=False,
        )
    port = target.port or (443 if target.scheme == "https" else 80)
    address = resolve(target.host, port, allow_private)
    # Connect to the address checked above, not to a second lookup (DNS rebinding); the
    # Host header and TLS (SNI, certificate) still name the host.
    request = httpx.Request(
        "POST",
        target.copy_with(host=address),
        content=body,
        headers={**headers, "host": target.netloc.decode("ascii")},
        extensions={"timeout": httpx.Timeout(timeout).as_dict(), "sni_hostname": target.host},
    )
    from celery.exceptions import SoftTimeLimitExceeded

    started = time.perf_counter()
    try:
        answer = transport().handle_request(request)
        try:
            kept = _read_start(answer)
        finally:
            answer.close()
    except (httpx.TimeoutException, SoftTimeLimitExceeded) as exc:
        # SoftTimeLimitExceeded: the Celery task's time limit, for a call that outlasted all
        # its phases' timeouts together (see broker.soft_limit).
        elapsed = _ms(started)
        raise WebhookFailed(
            f"Timed out after {elapsed} ms ({type(exc).__name__})",
            retry=True,
            response=Response(None, elapsed),
        ) from exc
    except httpx.TransportError as exc:
        raise WebhookFailed(
            f"{type(exc).__name__}: {str(exc) or 'connection failed'}",
            retry=True,
            response=Response(None, _ms(started)),
        ) from exc
    response = Response(answer.status_code, _ms(started), kept)
    status = answer.status_code
    if 200 <= status < 300:
        return response
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(answer.headers.get("retry-after"))
        raise WebhookFailed(
            f"HTTP {status}", retry=True, retry_after=retry_after, response=response
        )
    if status == 410:
        raise WebhookFailed("HTTP 410 Gone: the receiver is gone", retry=False, response=response)
    if 300 <= status < 400:
        location = answer.headers.get("location", "")
        raise WebhookFailed(
            f"HTTP {status}: redirect to {location!r} not followed", retry=False, response=response
        )
    raise WebhookFailed(f"HTTP {status}", retry=False, response=response)


def _read_start(answer: httpx.Response) -> str:
    """The first KEEP_BYTES of the body as sent, read and no more (a huge answer is cut
    off; no ``Accept-Encoding`` was sent, so it is not compressed)."""
    kept = b""
    for chunk in answer.stream:  # type: ignore[union-attr]  # a transport's: SyncByteStream
        kept += chunk
        if len(kept) >= KEEP_BYTES:
            break
    return kept[:KEEP_BYTES].decode("utf-8", "replace")


def _ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to; raise WebhookFailed for one that is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        # A name that does not resolve now may later (DNS outage): worth retrying.
        raise WebhookFailed(f"Cannot resolve {host!r}: {exc}", retry=True) from exc
    address = str(infos[0][4][0])
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not allow_private and not ip.is_global:
        raise WebhookFailed(
            f"Refused: {host!r} resolves to {address}, not a public address "
            "(DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] allows it)",
            retry=False,
        )
    return address


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(tz=UTC)).total_seconds())


def retry_delay(exc: BaseException, computed: float, max_backoff: float) -> float:
    """The wait before retrying after ``exc``: the receiver's Retry-After (capped), if any."""
    if isinstance(exc, WebhookFailed) and exc.retry_after is not None:
        return min(exc.retry_after, max_backoff)
    return computed


_transport: httpx.HTTPTransport | None = None
_transport_pid = 0
_transport_lock = threading.Lock()


def transport() -> httpx.HTTPTransport:
    """This process's pool of HTTP connections (a forked worker child makes its own).

    Requests go to it straight, not through an ``httpx.Client``: a client's cookie jar would
    keep what one receiver sets and send it to the next receiver at that address, and its
    default headers, redirect and auth layers are work a signed POST does not need (a third
    of the time of a call to a receiver on loopback, docs/performance-log.md, "Issue 18"). A
    transport never follows redirects and reads no proxy from the environment.
    """
    global _transport, _transport_pid
    pid = os.getpid()
    if _transport is not None and _transport_pid == pid:
        return _transport
    import httpx

    with _transport_lock:
        if _transport is None or _transport_pid != pid:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
            # h11 writes the headers and the body apart: without TCP_NODELAY the body waits
            # for the receiver's delayed ACK (40 ms on Linux) on a kept-alive connection.
            _transport = httpx.HTTPTransport(socket_options=NODELAY, limits=limits)
            _transport_pid = pid
    return _transport
