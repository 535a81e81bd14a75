"""Typed, read-on-access view of the ``DJANGO_EVENTS`` setting."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from os import PathLike, fspath
from pathlib import Path
from typing import Any

from django.conf import settings
from jsonschema import Draft202012Validator, validators

DEFAULT_RETRY: dict[str, Any] = {
    "max_attempts": 3,
    "backoff": 2,
    "max_backoff": 300,
    "jitter": True,
}

# Days kept: event records (without failures; pending ones always are), and inbound
# idempotency keys after their window expired. None keeps them for good.
DEFAULT_RETENTION: dict[str, float | None] = {"events": 30, "idempotency_keys": 0}

# Webhook endpoints registered at run time (models.WebhookEndpoint; docs/webhooks.md).
# queue None: DEFAULT_QUEUE; retry None: DEFAULT_RETRY; disable_after: seconds an endpoint may
# fail (every attempt since its last success) before it is disabled, Svix's 5 days (None:
# never);
# refresh: seconds a publishing process keeps the list of enabled endpoints.
DEFAULT_WEBHOOK_ENDPOINTS: dict[str, Any] = {
    "queue": None,
    "retry": None,
    "timeout": 10,
    "disable_after": 5 * 24 * 3600,
    "refresh": 5,
}

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
    "SUCCESS_RECORDS": "batched",
    "DELIVERY": "celery",
    "TASKS_BACKEND": "default",
    "LOCK_FILE": "events.lock.json",
    "PUBLISHER_CONFIRMS": True,
    "RESEND_UNFINISHED_AFTER": None,
    "RETENTION": DEFAULT_RETENTION,
    "WEBHOOKS_ALLOW_PRIVATE": False,
    "WEBHOOK_ENDPOINTS": DEFAULT_WEBHOOK_ENDPOINTS,
}


@dataclass(frozen=True)
class SettingProblem:
    """One key of ``DJANGO_EVENTS`` that is unknown (a warning) or does not match its schema."""

    key: str | None  # None: DJANGO_EVENTS itself
    message: str
    hint: str | None = None
    unknown: bool = False


def _schema(name: str) -> dict[str, Any]:
    text = resources.files("django_events").joinpath(f"schemas/{name}").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def settings_schema() -> dict[str, Any]:
    """The JSON Schema of ``DJANGO_EVENTS`` (its ``$defs`` are the manifest schema's)."""
    schema = _schema("settings.schema.json")
    schema["$defs"] = _schema("manifest.schema.json")["$defs"]
    return schema


@cache
def _validator() -> Draft202012Validator:
    # Settings are Python, not JSON: a tuple is as good as a list.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "array", lambda _checker, value: isinstance(value, list | tuple)
    )
    cls = validators.extend(Draft202012Validator, type_checker=checker)  # type: ignore[no-untyped-call]
    validator: Draft202012Validator = cls(settings_schema())
    return validator


def check_settings(value: Any) -> tuple[dict[str, Any], list[SettingProblem]]:
    """Split ``DJANGO_EVENTS`` into the keys that can be used and the problems of the others."""
    if not isinstance(value, dict):
        message = f"DJANGO_EVENTS must be a dict, got {type(value).__name__}"
        return {}, [SettingProblem(None, message)]
    problems = [
        SettingProblem(key, f"DJANGO_EVENTS has unknown key {key!r}", None, unknown=True)
        for key in value
        if key not in DEFAULTS
    ]
    bad: set[str] = set()
    for error in sorted(_validator().iter_errors(value), key=lambda e: list(map(str, e.path))):
        # Every error has a path: the schema's root constrains nothing but the type, ruled out
        # above (keys it does not know are W001, not schema errors).
        key = str(error.path[0])
        hint = settings_schema()["properties"][key].get("x-hint")
        # The value itself is wrong: show it; one of its keys or items: say where and why.
        if len(error.path) == 1 and error.validator not in ("additionalProperties", "required"):
            message = f"DJANGO_EVENTS[{key!r}] is {value[key]!r}"
        else:
            where = "".join(f"[{p!r}]" for p in list(error.path)[1:])
            message = f"DJANGO_EVENTS[{key!r}] is invalid: {where or '$'} {error.message}"
        problems.append(SettingProblem(key, message, hint))
        bad.add(key)
    for key, where in _path_problems(value):
        if key not in bad:
            hint = settings_schema()["properties"][key].get("x-hint")
            problems.append(SettingProblem(key, f"DJANGO_EVENTS[{key!r}] {where}", hint))
            bad.add(key)
    usable = {k: v for k, v in value.items() if k in DEFAULTS and k not in bad}
    return usable, problems


def _is_path(value: Any) -> bool:
    return isinstance(value, str | PathLike) and bool(fspath(value))


def _path_problems(value: dict[str, Any]) -> list[tuple[str, str]]:
    """The path keys whose value is not a path, each with what is wrong.

    Paths are Python objects (``str`` or ``os.PathLike``), which JSON Schema cannot describe.
    """
    found = []
    manifests = value.get("MANIFESTS")
    if isinstance(manifests, list | tuple):
        for index, item in enumerate(manifests):
            if not isinstance(item, str | PathLike):
                found.append(
                    ("MANIFESTS", f"is invalid: [{index}] {item!r} is not a str or os.PathLike")
                )
                break
    if "LOCK_FILE" in value and not _is_path(value["LOCK_FILE"]):
        found.append(("LOCK_FILE", f"is {value['LOCK_FILE']!r}"))
    return found


# What a project without DJANGO_EVENTS reads: one object, so it is checked once too.
_UNSET: dict[str, Any] = {}


class Settings:
    """Each property reads ``settings.DJANGO_EVENTS`` anew, so ``override_settings`` works.

    The value is checked against ``schemas/settings.schema.json`` once per setting object;
    a key that does not match reads as its default (system checks report it).
    """

    def __init__(self) -> None:
        self._source: Any = None
        self._usable: dict[str, Any] = {}
        self._problems: list[SettingProblem] = []

    def _load(self) -> dict[str, Any]:
        value = getattr(settings, "DJANGO_EVENTS", _UNSET)
        if value is not self._source:
            self._usable, self._problems = check_settings(value)
            self._source = value
        return self._usable

    @property
    def problems(self) -> list[SettingProblem]:
        """What is wrong with ``DJANGO_EVENTS``, key by key."""
        self._load()
        return list(self._problems)

    def _get(self, key: str) -> Any:
        return self._load().get(key, DEFAULTS[key])

    @property
    def MANIFESTS(self) -> list[Path]:
        return [Path(p) for p in self._get("MANIFESTS")]

    @property
    def AUTODISCOVER(self) -> bool:
        return bool(self._get("AUTODISCOVER"))

    @property
    def EVENTS(self) -> dict[str, Any]:
        return dict(self._get("EVENTS"))

    @property
    def SUBSCRIPTIONS(self) -> list[Any]:
        return list(self._get("SUBSCRIPTIONS"))

    @property
    def CELERY_APP(self) -> str | None:
        value = self._get("CELERY_APP")
        return str(value) if value else None

    @property
    def DEFAULT_QUEUE(self) -> str:
        return str(self._get("DEFAULT_QUEUE"))

    @property
    def DEFAULT_RETRY(self) -> dict[str, Any]:
        return {**DEFAULT_RETRY, **self._get("DEFAULT_RETRY")}

    @property
    def RECORD(self) -> str:
        return str(self._get("RECORD"))

    @property
    def PIPELINE(self) -> list[str]:
        return list(self._get("PIPELINE"))

    @property
    def SUCCESS_RECORDS(self) -> str:
        return str(self._get("SUCCESS_RECORDS"))

    @property
    def DELIVERY(self) -> str:
        """How async deliveries travel: ``"celery"`` or ``"tasks"`` (Django's Tasks)."""
        return str(self._get("DELIVERY"))

    @property
    def TASKS_BACKEND(self) -> str:
        return str(self._get("TASKS_BACKEND"))

    @property
    def PUBLISHER_CONFIRMS(self) -> bool:
        return bool(self._get("PUBLISHER_CONFIRMS"))

    @property
    def RESEND_UNFINISHED_AFTER(self) -> float | None:
        """Seconds after its dispatch an async delivery with no outcome is sent again
        (None: derived from the broker, see `operations.unfinished`)."""
        value = self._get("RESEND_UNFINISHED_AFTER")
        return None if value is None else float(value)

    @property
    def RETENTION(self) -> dict[str, float | None]:
        """Days kept: ``events`` (without failures), ``idempotency_keys``; None keeps for good."""
        return {**DEFAULT_RETENTION, **self._get("RETENTION")}

    @property
    def INBOUND_MAX_BODY(self) -> int:
        return int(self._get("INBOUND_MAX_BODY"))

    @property
    def WEBHOOKS_ALLOW_PRIVATE(self) -> bool:
        """Let webhooks reach private, loopback and link-local addresses (tests, intranets)."""
        return bool(self._get("WEBHOOKS_ALLOW_PRIVATE"))

    @property
    def WEBHOOK_ENDPOINTS(self) -> dict[str, Any]:
        """Run-time webhook endpoints: queue, retry, timeout, disable_after, refresh."""
        value = {**DEFAULT_WEBHOOK_ENDPOINTS, **self._get("WEBHOOK_ENDPOINTS")}
        value["queue"] = value["queue"] or self.DEFAULT_QUEUE
        value["retry"] = {**self.DEFAULT_RETRY, **(value["retry"] or {})}
        return value

    @property
    def LOCK_FILE(self) -> Path:
        return Path(self._get("LOCK_FILE"))


conf = Settings()
