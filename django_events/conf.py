"""Typed, read-on-access view of the ``DJANGO_EVENTS`` setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings

DEFAULT_RETRY: dict[str, Any] = {
    "max_attempts": 3,
    "backoff": 2,
    "max_backoff": 300,
    "jitter": True,
}

# Days kept: event records (without failures; pending ones always are), and inbound
# idempotency keys after their window expired. None keeps them for good.
DEFAULT_RETENTION: dict[str, float | None] = {"events": 30, "idempotency_keys": 0}

DEFAULTS: dict[str, Any] = {
    "MANIFESTS": [],
    "AUTODISCOVER": True,
    "EVENTS": {},
    "SUBSCRIPTIONS": [],
    "CELERY_APP": None,
    "DEFAULT_QUEUE": "django_events",
    "DEFAULT_RETRY": DEFAULT_RETRY,
    "RECORD": "all",
    "PIPELINE": [],
    "INBOUND_MAX_BODY": 256 * 1024,
    "SUCCESS_RECORDS": "immediate",
    "PUBLISHER_CONFIRMS": True,
    "RETENTION": DEFAULT_RETENTION,
}

RECORD_CHOICES = ("all", "failures")
SUCCESS_RECORDS_CHOICES = ("immediate", "batched")


class Settings:
    """Each property reads ``settings.DJANGO_EVENTS`` anew, so ``override_settings`` works."""

    @property
    def raw(self) -> dict[str, Any]:
        value = getattr(settings, "DJANGO_EVENTS", {})
        return value if isinstance(value, dict) else {}

    def _get(self, key: str) -> Any:
        return self.raw.get(key, DEFAULTS[key])

    def _list(self, key: str) -> list[Any]:
        # A value of the wrong shape reads as empty; checks report it (E001) instead.
        value = self._get(key)
        return list(value) if isinstance(value, list | tuple) else []

    @property
    def MANIFESTS(self) -> list[Path]:
        return [Path(p) for p in self._list("MANIFESTS")]

    @property
    def AUTODISCOVER(self) -> bool:
        return bool(self._get("AUTODISCOVER"))

    @property
    def EVENTS(self) -> dict[str, Any]:
        value = self._get("EVENTS")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def SUBSCRIPTIONS(self) -> list[Any]:
        return self._list("SUBSCRIPTIONS")

    @property
    def CELERY_APP(self) -> str | None:
        value = self._get("CELERY_APP")
        return str(value) if value else None

    @property
    def DEFAULT_QUEUE(self) -> str:
        return str(self._get("DEFAULT_QUEUE"))

    @property
    def DEFAULT_RETRY(self) -> dict[str, Any]:
        value = self._get("DEFAULT_RETRY")
        return {**DEFAULT_RETRY, **value} if isinstance(value, dict) else dict(DEFAULT_RETRY)

    @property
    def RECORD(self) -> str:
        return str(self._get("RECORD"))

    @property
    def PIPELINE(self) -> list[str]:
        return self._list("PIPELINE")

    @property
    def SUCCESS_RECORDS(self) -> str:
        return str(self._get("SUCCESS_RECORDS"))

    @property
    def PUBLISHER_CONFIRMS(self) -> bool:
        return bool(self._get("PUBLISHER_CONFIRMS"))

    @property
    def RETENTION(self) -> dict[str, float | None]:
        value = self._get("RETENTION")
        merged = {**DEFAULT_RETENTION, **value} if isinstance(value, dict) else DEFAULT_RETENTION
        # A value of the wrong kind keeps its default; checks report it (E001).
        return {
            key: merged[key] if _days(merged[key], key == "idempotency_keys") else default
            for key, default in DEFAULT_RETENTION.items()
        }

    @property
    def INBOUND_MAX_BODY(self) -> int:
        value = self._get("INBOUND_MAX_BODY")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return int(DEFAULTS["INBOUND_MAX_BODY"])  # E001 reports it
        return value


def _days(value: object, zero: bool) -> bool:
    """Whether ``value`` is a retention: None, or a number of days (> 0, or >= 0 if ``zero``)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return False
    return value >= 0 if zero else value > 0


def retention_problems(value: object) -> list[str]:
    """What is wrong with a ``RETENTION`` value, each to follow ``DJANGO_EVENTS['RETENTION']``."""
    if not isinstance(value, dict):
        return [f" must be a dict, got {type(value).__name__}"]
    problems = [f" has unknown key {key!r}" for key in value if key not in DEFAULT_RETENTION]
    for key in DEFAULT_RETENTION:
        if key in value and not _days(value[key], key == "idempotency_keys"):
            problems.append(f"[{key!r}] is {value[key]!r}")
    return problems


conf = Settings()
