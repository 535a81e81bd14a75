"""One Celery app per real broker, so a test can pick its broker with CELERY_APP."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from celery import Celery
from celery.signals import celeryd_init, worker_process_init
from django.conf import settings

from django_events.delivery.broadcast import consume_broadcasts

AMQP_URL = os.environ.get("DJANGO_EVENTS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("DJANGO_EVENTS_REDIS_URL", "redis://127.0.0.1:6379/0")
FS_FOLDER = Path(os.environ.get("DJANGO_EVENTS_FS_BROKER") or tempfile.mkdtemp(prefix="events-fs-"))
URLS = {"amqp": AMQP_URL, "redis": REDIS_URL, "filesystem": "filesystem://"}


def make_app(kind: str, url: str | None = None) -> Celery:
    """The test app of broker ``kind``; ``url`` reaches it another way (a fault proxy)."""
    app = Celery(f"tests-{kind}", set_as_current=False)
    app.conf.update(
        broker_url=url or URLS[kind],
        accept_content=["json"],
        task_serializer="json",
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=4,
    )
    if os.environ.get("DJANGO_EVENTS_TEST_DB_REUSE_MAX"):  # a worker of test_worker_connections
        app.conf["CELERY_DB_REUSE_MAX"] = int(os.environ["DJANGO_EVENTS_TEST_DB_REUSE_MAX"])
    if kind == "redis":
        # Without it a Redis that accepts connections but never answers hangs a publisher.
        app.conf.broker_transport_options = {"socket_timeout": 5}
        if os.environ.get("DJANGO_EVENTS_REDIS_VISIBILITY_TIMEOUT"):  # the soak run's
            # kombu keeps unacknowledged messages per Redis database, and a worker hands back
            # every one it finds there older than its timeout: other tests' too.
            if "DJANGO_EVENTS_REDIS_URL" not in os.environ:
                raise RuntimeError(
                    "DJANGO_EVENTS_REDIS_VISIBILITY_TIMEOUT needs DJANGO_EVENTS_REDIS_URL: a "
                    "short visibility timeout on the suite's shared Redis database hands "
                    "other tests' unacknowledged messages back to their queues"
                )
            app.conf.broker_transport_options["visibility_timeout"] = float(
                os.environ["DJANGO_EVENTS_REDIS_VISIBILITY_TIMEOUT"]
            )
            # A worker looks for messages past their visibility timeout every second, not
            # every 10 x 10 s (kombu's unacked_restore_interval x unacked_restore_throttle).
            app.conf.broker_transport_options |= {
                "unacked_restore_interval": 1,
                "unacked_restore_throttle": 1,
            }
    if kind == "filesystem":
        FS_FOLDER.mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport = "django_events.contrib.filesystem_transport:Transport"
        app.conf.broker_transport_options = {
            "data_folder_in": str(FS_FOLDER),
            "data_folder_out": str(FS_FOLDER),
            "control_folder": str(FS_FOLDER / "control"),  # not ./control in the cwd
            "store_processed": False,
            "polling_interval": 0.05,  # the default 1 s would blur the retry delays measured
        }
    return app


amqp = make_app("amqp")
redis = make_app("redis")
filesystem = make_app("filesystem")
for _worker_app in (amqp, redis, filesystem):
    consume_broadcasts(_worker_app)  # broadcast subscriptions of the queues a worker consumes


# Coverage's configuration for a worker the measured pass starts (tests/worker.py), which
# `_measure_from_here` hands to coverage once the worker's imports are done.
DEFERRED_COVERAGE = "DJANGO_EVENTS_TEST_COVERAGE_CONFIG"


@celeryd_init.connect
def _measure_from_here(**kwargs: object) -> None:
    """Start coverage in a worker the measured pass started once Celery, Django and the
    package are imported and set up: the test processes measure that code, and measuring it
    in each worker too made a start and stop cost 2.2 s of CPU against 1.5 s
    (docs/contributing.md). What the worker runs from here on is measured as before: our
    start-up code (this signal comes before it), the pool processes, the deliveries."""
    config = os.environ.pop(DEFERRED_COVERAGE, None)
    if config is None:
        return
    import coverage

    os.environ["COVERAGE_PROCESS_CONFIG"] = config  # for the processes the worker starts
    if coverage.Coverage.current() is not None:  # started with the process (COVERAGE_PROCESS_START)
        return
    # Celery logs an exception a receiver raises and goes on: the worker would run
    # unmeasured, and the report lose its lines quietly. It stops instead.
    try:
        started = coverage.process_startup()
    except Exception as exc:
        raise SystemExit(f"coverage did not start in this worker: {exc!r}") from exc
    if started is None:
        raise SystemExit(f"coverage did not start from {DEFERRED_COVERAGE} in this worker")


@worker_process_init.connect
def _flush_interval(**kwargs: object) -> None:
    """A worker subprocess's SUCCESS_RECORDS = "batched" interval, set by a test."""
    interval = os.environ.get("DJANGO_EVENTS_TEST_FLUSH_INTERVAL")
    if interval:
        from django_events.delivery import batching

        batching.FLUSH_INTERVAL = float(interval)


def worker_kinds(*kinds: str) -> list[Any]:
    """``params`` of a test that runs real workers on each broker of ``kinds``: the filesystem
    transport with SQLite (the embedded default; marked ``embedded``, which run_tests.sh's
    PostgreSQL pass deselects unless the test is PostgreSQL-only), RabbitMQ and Redis with
    PostgreSQL (their pairing in production). Each pass ran the other's brokers the same way
    again, for minutes of the suite (docs/contributing.md)."""
    import pytest  # not at the top: this module is also every test worker's Celery app

    return [
        pytest.param(kind, marks=pytest.mark.embedded)
        if kind == "filesystem"
        else pytest.param(kind, marks=pytest.mark.postgresql)
        for kind in kinds
    ]


def delivery_wiring(app: str, queue: str, manifest: str, **keys: Any) -> Any:
    """DJANGO_EVENTS of a delivery test: base.yaml and ``manifest`` (from tests/manifests), the
    Celery app ``tests.brokers.<app>``, async deliveries on ``queue``, and ``keys``."""
    from django.test import override_settings  # this module is also a worker's Celery app

    folder = Path(settings.BASE_DIR) / "manifests"
    value = {
        **settings.DJANGO_EVENTS,
        "MANIFESTS": [folder / "base.yaml", folder / manifest],
        "CELERY_APP": f"tests.brokers.{app}",
        "DEFAULT_QUEUE": queue,
        **keys,
    }
    return override_settings(DJANGO_EVENTS=value)


def reachable(url: str) -> bool:
    parsed = urlparse(url)
    if not parsed.hostname:
        return True
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 0), timeout=2):
            return True
    except OSError:
        return False


def require_server(url: str, what: str) -> None:
    """Skip when a server is down on a laptop; fail under CI, where it must run."""
    if reachable(url):
        return
    import pytest  # not at the top: this module is also every test worker's Celery app

    message = f"{what} at {url} is not reachable"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI runs every server-backed test (see docs/contributing.md)")
    pytest.skip(message)


# Nothing listens on port 1 of loopback: a broker that refuses every connection.
unreachable = Celery("tests-unreachable", set_as_current=False)
unreachable.conf.update(
    broker_url="amqp://guest:guest@127.0.0.1:1//",
    accept_content=["json"],
    broker_connection_timeout=1,
)

# A broker URL whose transport kombu cannot load (a typo in the scheme).
unloadable = Celery("tests-unloadable", set_as_current=False)
unloadable.conf.update(broker_url="redsi://127.0.0.1:1/5", accept_content=["json"])
