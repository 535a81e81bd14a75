"""Settings of the benchmarks: PostgreSQL, RabbitMQ and Redis on loopback.

The runner creates a database of its own (``django_events_bench_<pid>``) and drops it at the
end; worker subprocesses get its name and the run's queue names through the environment.
"""

from __future__ import annotations

import os
from typing import Any

from tests.settings import database_from_url

SECRET_KEY = "django-events-benchmarks"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-events")

_db: dict[str, Any] = database_from_url(
    os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
)
_db["TEST"] = {"NAME": os.environ.get("BENCH_DB_NAME") or f"django_events_bench_{os.getpid()}"}
# Workers keep their connection between deliveries, as a production worker should: with
# Django's default 0 every delivery would open a new PostgreSQL connection
# (docs/performance-log.md, "What the profiles showed").
_db["CONN_MAX_AGE"] = int(os.environ.get("BENCH_CONN_MAX_AGE", "60"))
if os.environ.get("BENCH_WORKER_SYNCHRONOUS_COMMIT") == "off" and os.environ.get("BENCH_WORKER"):
    # Figure 4's floor line: the worker's commits do not wait for the WAL flush.
    _db["OPTIONS"] = {"options": "-c synchronous_commit=off"}
if os.environ.get("BENCH_WORKER"):
    _db["NAME"] = _db["TEST"]["NAME"]  # a worker connects to the database the runner made
DATABASES = {"default": _db}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_events",
    "django_celery_outbox",
    "benchmarks",
    # Figure 9: via: tasks through the database backend and db_worker (the backport on 5.2).
    *(["django_tasks"] if __import__("django").VERSION < (6,) else []),
    "django_tasks_db",
]
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []}}
TASKS_QUEUE, RAW_TASKS_QUEUE = "bench-tasks", "bench-tasks-raw"

# A typical 4-field payload schema (figure 5), shared by every benchmark event.
SCHEMA = {
    "type": "object",
    "required": ["order_id", "total"],
    "properties": {
        "order_id": {"type": "integer"},
        "total": {"type": "number", "minimum": 0},
        "email": {"type": "string"},
        "note": {"type": "string"},
    },
}
DJANGO_EVENTS = {
    "AUTODISCOVER": False,
    # A worker sends messages itself (an ordered delivery hands its key on): on its broker.
    "CELERY_APP": os.environ.get("BENCH_CELERY_APP", "benchmarks.celery_app.amqp"),
    "DEFAULT_QUEUE": QUEUE,
    "EVENTS": {
        "bench.sync": {"schema": SCHEMA, "record": "failures"},
        "bench.async": {"schema": SCHEMA},
        # Figure 4's context for check W215: a handler that writes a row.
        "bench.orm": {"schema": SCHEMA},
        # Figure 9: the same event with a redacted field (its messages carry it sealed).
        "bench.redacted": {"schema": SCHEMA, "redact": ["email"]},
        "bench.tasks": {"schema": SCHEMA},
        "bench.handler": {"schema": SCHEMA},  # figure 12: never published, run in-process
        # Figure 13: a webhook to a receiver on 127.0.0.1 (BENCH_HOOK_URL).
        "bench.webhook": {"schema": SCHEMA},
        # Figure 14: latency from commit to handler start.
        "bench.latency": {"schema": SCHEMA},
        # Figure 16: one subscription with ordering_key, the same one without.
        "bench.ordered": {"schema": SCHEMA},
        "bench.unordered": {"schema": SCHEMA},
    },
    "SUBSCRIPTIONS": [
        {"event": "bench.sync", "handler": "benchmarks.handlers.noop", "mode": "sync"},
        {"event": "bench.async", "handler": "benchmarks.handlers.count", "mode": "async"},
        {"event": "bench.orm", "handler": "benchmarks.handlers.count_with_row", "mode": "async"},
        {
            "event": "bench.tasks",
            "handler": "benchmarks.handlers.count",
            "mode": "async",
            "via": "tasks",
            "queue": TASKS_QUEUE,
        },
        *(
            {"name": f"bench.handler-{kind}", "event": "bench.handler", "mode": "async"}
            | {"handler": f"benchmarks.handlers.{handler}", "queue": "bench-unused"}
            for kind, handler in (("sync", "count"), ("async", "acount"))
        ),
        {
            "event": "bench.webhook",
            "name": "bench-webhook",
            "mode": "webhook",
            "url": "BENCH_HOOK_URL",
            "secret": "BENCH_HOOK_SECRET",
        },
        {"event": "bench.latency", "handler": "benchmarks.handlers.stamp", "mode": "async"},
        *(
            {"event": event, "handler": "benchmarks.handlers.count", "mode": "async"} | keyed
            for event, keyed in (
                ("bench.ordered", {"ordering_key": "order_id"}),
                ("bench.unordered", {}),
            )
        ),
    ],
    "WEBHOOKS_ALLOW_PRIVATE": True,  # the receiver is on loopback
    # Figure 2 without the commit path's publisher confirms (the default is on): BENCH_CONFIRMS=0.
    "PUBLISHER_CONFIRMS": os.environ.get("BENCH_CONFIRMS", "1") != "0",
}

# The peer, django-celery-outbox: no statsd traffic (we emit no metrics either).
CELERY_OUTBOX_APP = "benchmarks.celery_app.peer"
MONITORING_METRICS_ENABLED = False
# Figures 4, 11, 13 and 16 run their worker with the default (success rows batched) and, for
# context, with each success row written before the ack: BENCH_SUCCESS_RECORDS=immediate.
if os.environ.get("BENCH_SUCCESS_RECORDS"):
    DJANGO_EVENTS["SUCCESS_RECORDS"] = os.environ["BENCH_SUCCESS_RECORDS"]
LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
# The loopback receiver needs WEBHOOKS_ALLOW_PRIVATE; its warning (DEBUG is off here) would be
# printed by every worker and command the benchmarks start.
SILENCED_SYSTEM_CHECKS = ["django_events.W320"]
