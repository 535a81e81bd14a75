"""Settings for the test suite. DATABASE_URL / CELERY_BROKER_URL select real servers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

BASE_DIR = Path(__file__).resolve().parent
VAR_DIR = Path(os.environ.get("DJANGO_EVENTS_TEST_VAR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = "django-events-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def database_from_url(url: str) -> dict[str, Any]:
    """A tiny DATABASE_URL parser: sqlite:///path or postgres://user@host:port/name."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":  # sqlite:///relative.db or sqlite:////absolute.db
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": parsed.path[1:]}
    if parsed.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parsed.path.lstrip("/") or "django_events",
            "USER": parsed.username or "postgres",
            "PASSWORD": parsed.password or "",
            "HOST": parsed.hostname or "127.0.0.1",
            "PORT": str(parsed.port or 5432),
        }
    raise ValueError(f"Unsupported DATABASE_URL {url!r}")


_db: dict[str, Any]
_url = os.environ.get("DATABASE_URL")
if _url:
    _db = database_from_url(_url)
else:
    # A file, not :memory:, so that a worker process can open the same test database.
    _db = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(VAR_DIR / "db.sqlite3"),
        # As check W209 asks (docs/checks.md): a transaction takes the write lock at BEGIN, so a
        # worker writing meanwhile makes it wait (the timeout), never fail half-way.
        "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
    }
_db["TEST"] = {
    "NAME": os.environ.get("DJANGO_EVENTS_TEST_DB_NAME")
    or (
        str(VAR_DIR / f"test-{os.getpid()}.sqlite3")
        if _db["ENGINE"].endswith("sqlite3")
        else f"test_django_events_{os.getpid()}"
    )
}
# A second alias, for publish(using=...) and the routers' tests (the event log elsewhere):
# the same backend as "default", so that PostgreSQL's statements (delivery/postgresql.py, the
# function of migrations 0011/0012, advisory locks, SKIP LOCKED) run on an alias not default.
_other: dict[str, Any]
if _db["ENGINE"].endswith("postgresql"):
    _other = {**_db, "TEST": {"NAME": f"test_django_events_other_{os.getpid()}"}}
else:
    _other = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(VAR_DIR / "other.sqlite3"),
        "TEST": {"NAME": str(VAR_DIR / f"test-other-{os.getpid()}.sqlite3")},
    }
DATABASES = {"default": _db, "other": _other}
# A worker subprocess connects straight to the databases the test process created.
for _alias, _variable in [
    ("default", "DJANGO_EVENTS_WORKER_DB_NAME"),
    ("other", "DJANGO_EVENTS_WORKER_OTHER_DB_NAME"),
]:
    if os.environ.get(_variable):
        DATABASES[_alias]["NAME"] = os.environ[_variable]
        if DATABASES[_alias]["ENGINE"].endswith("postgresql"):
            # As production workers should have them (docs/reliability.md); Celery still closes
            # the connection after each task unless its app sets CELERY_DB_REUSE_MAX (check
            # W215; tests/brokers.py sets it when DJANGO_EVENTS_TEST_DB_REUSE_MAX asks).
            DATABASES[_alias]["CONN_MAX_AGE"] = int(
                os.environ.get("DJANGO_EVENTS_WORKER_CONN_MAX_AGE", "60")
            )
            DATABASES[_alias]["CONN_HEALTH_CHECKS"] = True
if os.environ.get("DJANGO_EVENTS_TEST_ROUTERS"):  # a worker subprocess's (comma-separated)
    DATABASE_ROUTERS = os.environ["DJANGO_EVENTS_TEST_ROUTERS"].split(",")
if os.environ.get("DJANGO_EVENTS_WORKER_DB_PORT"):
    # The fault tests put a proxy between a worker and PostgreSQL.
    DATABASES["default"]["PORT"] = os.environ["DJANGO_EVENTS_WORKER_DB_PORT"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_events",
    "tests.app",
    # DJANGO_EVENTS["DELIVERY"] = "tasks": the django-tasks backport on 5.2, the database backend
    *(["django_tasks"] if __import__("django").VERSION < (6,) else []),
    "django_tasks_db",
]
_TASKS_PACKAGE = "django_tasks" if __import__("django").VERSION < (6,) else "django.tasks"
TASKS = {
    "default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []},
    # For the checks: a backend that cannot defer, one that serves a single queue.
    "immediate": {"BACKEND": f"{_TASKS_PACKAGE}.backends.immediate.ImmediateBackend"},
    "narrow": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["only-this"]},
}
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _folder = Path(os.environ.get("DJANGO_EVENTS_FS_BROKER", VAR_DIR / "broker"))
    _folder.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT = "django_events.contrib.filesystem_transport:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_folder),
        "data_folder_out": str(_folder),
        "control_folder": str(_folder / "control"),
        "store_processed": False,
    }
DJANGO_EVENTS = {
    # A worker subprocess of the delivery tests loads the same extra manifest as the test.
    "MANIFESTS": [
        BASE_DIR / "manifests" / name
        for name in ["base.yaml", *filter(None, [os.environ.get("DJANGO_EVENTS_TEST_MANIFEST")])]
    ],
    "DEFAULT_QUEUE": os.environ.get("DJANGO_EVENTS_TEST_QUEUE", "django_events"),
    "AUTODISCOVER": False,
    # A worker that sends messages itself (ordered deliveries hand on) sends with its own app.
    "CELERY_APP": os.environ.get("DJANGO_EVENTS_TEST_CELERY_APP", "tests.celery_app.app"),
    "DEFAULT_RETRY": {"max_attempts": 3, "backoff": 0.1, "max_backoff": 1, "jitter": False},
    # Interceptors of a worker subprocess (comma-separated dotted paths).
    "PIPELINE": [p for p in os.environ.get("DJANGO_EVENTS_TEST_PIPELINE", "").split(",") if p],
    # Not the package's default ("batched"): most tests read a success row as soon as its
    # handler ran. The default's own tests: test_batching*, and test_soak (the package's
    # defaults through kills and cuts).
    "SUCCESS_RECORDS": os.environ.get("DJANGO_EVENTS_TEST_SUCCESS_RECORDS", "immediate"),
}
if os.environ.get("DJANGO_EVENTS_SOAK"):
    # The soak run (scripts/soak.py): the package's defaults, only the wiring is set.
    DJANGO_EVENTS = {
        "MANIFESTS": DJANGO_EVENTS["MANIFESTS"],
        "DEFAULT_QUEUE": DJANGO_EVENTS["DEFAULT_QUEUE"],
        "CELERY_APP": os.environ["DJANGO_EVENTS_TEST_CELERY_APP"],
    }
    if os.environ.get("DJANGO_EVENTS_SOAK_SUCCESS_RECORDS"):  # soak.py --success-records
        DJANGO_EVENTS["SUCCESS_RECORDS"] = os.environ["DJANGO_EVENTS_SOAK_SUCCESS_RECORDS"]
    if os.environ.get("DJANGO_EVENTS_SOAK_RESEND_AFTER"):  # soak.py --resend-unfinished-after
        DJANGO_EVENTS["RESEND_UNFINISHED_AFTER"] = float(
            os.environ["DJANGO_EVENTS_SOAK_RESEND_AFTER"]
        )
if os.environ.get("DJANGO_EVENTS_TEST_RETENTION"):  # a worker subprocess of test_retention
    DJANGO_EVENTS["RETENTION"] = json.loads(os.environ["DJANGO_EVENTS_TEST_RETENTION"])
if os.environ.get("DJANGO_EVENTS_TEST_WEBHOOKS_PRIVATE"):
    # The webhook tests' worker posts to a receiver on 127.0.0.1.
    DJANGO_EVENTS["WEBHOOKS_ALLOW_PRIVATE"] = True
if os.environ.get("DJANGO_EVENTS_TEST_WEBHOOK_ENDPOINTS"):  # their retry and disable_after
    DJANGO_EVENTS["WEBHOOK_ENDPOINTS"] = json.loads(
        os.environ["DJANGO_EVENTS_TEST_WEBHOOK_ENDPOINTS"]
    )
LOGGING = {"version": 1, "disable_existing_loggers": False}
