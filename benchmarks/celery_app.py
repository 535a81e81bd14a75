"""Celery apps of the benchmarks: one per broker, and the peer's ``OutboxCelery``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from django_celery_outbox import OutboxCelery

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RAW_TASK = "bench.raw_count"
RAW_WEBHOOK_TASK = "bench.raw_webhook"
RAW_STAMP = "bench.raw_stamp"


def _raw_count(payload: dict[str, Any]) -> None:
    """The raw Celery task: the same work as our async handler."""
    from .handlers import bump

    bump(payload)


def _raw_stamp(payload: dict[str, Any]) -> None:
    """The raw Celery task of figure 10: notes when it started, as our handler does."""
    from .handlers import stamp_payload

    stamp_payload(payload)


def _configure(app: Celery, url: str) -> Celery:
    app.conf.update(
        broker_url=url,
        accept_content=["json"],
        task_serializer="json",
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # django_events.tasks needs Django's apps: imported once the worker set Django up.
        imports=["django_events.tasks"],
    )

    # Celery's Django fixup closes every database connection before and after each task
    # unless told how many tasks may reuse one (its only knob; CONN_MAX_AGE is not read).
    reuse = int(os.environ.get("BENCH_DB_REUSE_MAX", "0"))
    if reuse:
        app.conf["CELERY_DB_REUSE_MAX"] = reuse
    app.task(name=RAW_TASK, ignore_result=True)(_raw_count)
    app.task(
        name=RAW_WEBHOOK_TASK,
        ignore_result=True,
        acks_late=True,
        bind=True,
        max_retries=3,
    )(_raw_webhook)
    app.task(name=RAW_STAMP, ignore_result=True)(_raw_stamp)
    return app


_http: dict[int, Any] = {}


def _raw_webhook(task: Any, event_id: str, payload: dict[str, Any]) -> None:
    """The raw Celery task of figure 10: the signed POST a hand-written webhook task sends."""
    import base64
    import hashlib
    import hmac
    import json
    import socket
    import time
    from datetime import UTC, datetime

    import httpx

    client = _http.get(os.getpid())
    if client is None:  # one pooled client per (forked) process, as ours
        # TCP_NODELAY as ours: a hand-written task that forgot it would wait 40 ms a POST.
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        client = _http[os.getpid()] = httpx.Client(
            follow_redirects=False, transport=httpx.HTTPTransport(socket_options=nodelay)
        )
    secret = os.environ["BENCH_HOOK_SECRET"].removeprefix("whsec_")
    key = base64.b64decode(secret)
    body = json.dumps(
        {"type": "bench.webhook", "timestamp": datetime.now(tz=UTC).isoformat(), "data": payload}
    ).encode()
    stamp = str(int(time.time()))
    digest = hmac.new(key, f"{event_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    try:
        response = client.post(
            os.environ["BENCH_HOOK_URL"],
            content=body,
            headers={
                "content-type": "application/json",
                "webhook-id": event_id,
                "webhook-timestamp": stamp,
                "webhook-signature": "v1," + base64.b64encode(digest).decode(),
            },
            timeout=10,
        )
    except httpx.TransportError as exc:
        raise task.retry(countdown=1, exc=exc) from exc
    if response.status_code >= 500:
        raise task.retry(countdown=1)


amqp = _configure(Celery("bench-amqp", set_as_current=False), AMQP_URL)
redis = _configure(Celery("bench-redis", set_as_current=False), REDIS_URL)
peer = _configure(OutboxCelery("bench-peer", set_as_current=False), AMQP_URL)
# Figure 15's second line: an app that keeps Celery's task results in Redis, as many do.
amqp_with_results = _configure(Celery("bench-amqp-results", set_as_current=False), AMQP_URL)
amqp_with_results.conf.result_backend = REDIS_URL
APPS = {"amqp": amqp, "redis": redis}
URLS = {"amqp": AMQP_URL, "redis": REDIS_URL}
