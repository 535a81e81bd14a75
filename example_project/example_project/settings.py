"""Settings of the example shop.

With no environment variables it needs no servers: SQLite and kombu's filesystem
transport, both under ``example_project/var/``. Two variables switch to real servers:

- ``DATABASE_URL``: ``postgres://user@127.0.0.1:5432/name`` or ``sqlite:///path``
- ``CELERY_BROKER_URL``: ``amqp://guest:guest@127.0.0.1:5672//`` or ``redis://127.0.0.1:6379/0``

``EVENTS_DELIVERY=tasks`` delivers through Django's Tasks framework instead of Celery: the
database backend (django-tasks-db) and its ``db_worker``, no broker at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"  # the SQLite database, the filesystem broker, logs
VAR_DIR.mkdir(exist_ok=True)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-example-shop-only")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_events",
    "orders",
    "billing",
    "notifications",
]

# Celery (default) or Django's Tasks framework: `scripts/run_example.sh --tasks` sets this.
EVENTS_DELIVERY = os.environ.get("EVENTS_DELIVERY", "celery")
if EVENTS_DELIVERY == "tasks":
    import django

    # The task rows live in this project's database, so they commit with the event.
    INSTALLED_APPS += [*(["django_tasks"] if django.VERSION < (6,) else []), "django_tasks_db"]
    TASKS = {
        "default": {
            "BACKEND": "django_tasks_db.DatabaseBackend",
            "QUEUES": ["billing", "notifications"],  # events_queues: a queue left out is E213
        }
    }

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


# Database: SQLite under var/ unless DATABASE_URL is set ------------------------------------

SQLITE = {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": VAR_DIR / "db.sqlite3",
    # The worker processes and the publisher write at the same time: wait for the lock
    # instead of failing, and take it at BEGIN so a transaction never fails half-way.
    "OPTIONS": {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL;",
    },
}


def database_from_url(url: str) -> dict[str, object]:
    """Parse ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``postgres://...``."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        return {**SQLITE, "NAME": parsed.path[1:]}
    if parsed.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parsed.path.lstrip("/"),
            "USER": unquote(parsed.username or "postgres"),
            "PASSWORD": unquote(parsed.password or ""),
            "HOST": parsed.hostname or "127.0.0.1",
            "PORT": str(parsed.port or 5432),
            # Workers keep their connection (with CELERY_DB_REUSE_MAX below): check W215.
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    raise ValueError(f"Unsupported DATABASE_URL scheme {parsed.scheme!r}: {url!r}")


_database_url = os.environ.get("DATABASE_URL")
DATABASES = {"default": database_from_url(_database_url) if _database_url else SQLITE}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# Celery (read by example_project/celery.py: every CELERY_* setting) -----------------------

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    # kombu's filesystem transport: each message is a file in this folder. The publisher
    # writes where the worker reads, so "in" and "out" are the same folder. django_events'
    # variant writes each file whole before a worker can see it (kombu's own does not).
    BROKER_DIR = VAR_DIR / "broker"
    BROKER_DIR.mkdir(exist_ok=True)
    CELERY_BROKER_TRANSPORT = "django_events.contrib.filesystem_transport:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR),
        "data_folder_out": str(BROKER_DIR),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = 2  # a publisher with the broker down fails fast
# Celery closes a worker's database connections after every task unless this is set, whatever
# CONN_MAX_AGE says (`manage.py check --deploy` warns: django_events.W215).
CELERY_DB_REUSE_MAX = 1000


# django_events: who handles what is in events.yaml next to manage.py; the events themselves
# are declared in each app's events.yaml (orders/events.yaml), which is read automatically.

DJANGO_EVENTS = {
    "MANIFESTS": [BASE_DIR / "events.yaml"],
    "CELERY_APP": "example_project.celery.app",
    "DELIVERY": EVENTS_DELIVERY,  # "celery" or "tasks"
    # Webhook endpoints added in the admin are sent from a queue the workers already consume.
    "WEBHOOK_ENDPOINTS": {"queue": "notifications"},
}

# The payment provider signs its webhooks with this shared secret. billing/events.yaml names
# the setting (`secret: PAYMENTS_WEBHOOK_SECRET`), never the value. Outside this demo, set the
# environment variable and drop the default.
PAYMENTS_WEBHOOK_SECRET = os.environ.get("PAYMENTS_WEBHOOK_SECRET", "whsec_example_shop_demo_only")


# Logging: handlers' log lines show in the console (and in var/worker.log for the worker) --

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}


# The rest is Django's usual ---------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
