"""The HMAC signature of inbound calls: what a sender computes and what the view checks.

A signature is ``sha256=<hex HMAC-SHA256 of "<timestamp>." + body>``, keyed with the shared
secret, sent in ``X-Events-Signature`` with the Unix timestamp in ``X-Events-Timestamp``.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Events-Timestamp"
SIGNATURE_HEADER = "X-Events-Signature"
SCHEME = "sha256="


def signature(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """Return the signature header value of ``body`` sent at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return SCHEME + digest


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """Return the headers that authenticate ``body`` (sent now, or at ``timestamp``)."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(secret, stamp, body)}


def matches(expected: str, given: str) -> bool:
    """Compare two signatures in constant time (any text given is safe to pass)."""
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))
