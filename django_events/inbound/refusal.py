"""A refused inbound call: the HTTP status and the JSON error the caller gets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.http import JsonResponse

from django_events.exceptions import InvalidPayload


class Refusal(Exception):
    """Raised while handling an inbound call; becomes a JSON error response."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.status, self.error, self.detail = status, error, detail
        self.headers = dict(headers or {})
        self.extra = extra
        super().__init__(f"{status} {error}: {detail}")

    def response(self) -> JsonResponse:
        """Return ``{"error": ..., "detail": ..., ...}`` with the status and headers."""
        body = {"error": self.error, "detail": self.detail, **self.extra}
        return JsonResponse(body, status=self.status, headers=self.headers)


def invalid_payload(name: str, exc: InvalidPayload, at: str = "$") -> Refusal:
    """The 400 answer to a payload that does not match the event's schema.

    ``at`` is the JSON path of the payload in the body (a source's ``payload``): the paths
    of the problems are given in the body the caller sent.
    """
    return Refusal(
        400,
        "invalid_payload",
        f"The payload does not match the schema of {name!r}.",
        problems=[{"path": _within(at, p.path), "message": p.message} for p in exc.problems],
    )


def _within(at: str, path: str) -> str:
    return at + path[1:] if path.startswith("$") else path
