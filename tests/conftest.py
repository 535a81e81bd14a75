from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.db import OperationalError, connection
from django.test import TransactionTestCase, override_settings

from django_events.delivery import broker, endpoints
from django_events.wiring.registry import reset_registry
from tests.worker import wait_live_workers_idle


def pytest_configure(config: pytest.Config) -> None:
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings

    # Hypothesis's timing checks judge the host, not the code: a loaded 2-core CI machine
    # failed "input generation is slow" (nothing is timed in this suite).
    hypothesis_settings.register_profile(
        "shared-host", deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    hypothesis_settings.load_profile("shared-host")


@pytest.fixture(scope="session", autouse=True)
def _marker_stopped_before_the_test_database_goes(
    django_db_setup: None, django_db_blocker: Any
) -> Iterator[None]:
    # The background marker's thread keeps a connection of its own to the test database;
    # PostgreSQL refuses to drop a database someone is connected to.
    yield
    from django_events.delivery import marking

    with django_db_blocker.unblock():  # the marks still waiting are written from this thread
        marking.stop()


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    reset_registry()
    endpoints.forget()  # a rolled-back test's endpoints
    yield
    reset_registry()
    endpoints.forget()


_EMPTYING_FIXTURES = frozenset({"transactional_db", "live_server", "django_db_reset_sequences"})


def _emptied_after(request: pytest.FixtureRequest) -> bool:
    """Whether pytest-django empties the test's database after it, by its own rule: the
    marker's ``transaction`` or ``reset_sequences``, or a fixture that asks for that."""
    if not _EMPTYING_FIXTURES.isdisjoint(request.fixturenames):
        return True
    marker = request.node.get_closest_marker("django_db")
    if marker is None:
        return False
    transaction, reset_sequences = (*marker.args, False, False)[:2]
    return bool(
        marker.kwargs.get("transaction", transaction)
        or marker.kwargs.get("reset_sequences", reset_sequences)
    )


@pytest.fixture(autouse=True)
def _workers_idle_before_the_database_is_emptied(request: pytest.FixtureRequest) -> Iterator[None]:
    # After a transactional test pytest-django empties its database (TRUNCATE). A worker still
    # running one of the test's tasks writes meanwhile, and PostgreSQL can deadlock the two:
    # CI once failed so, in `flush`, with "deadlock detected". The workers finish first.
    if not _emptied_after(request):
        yield
        return
    # Set up before this fixture (a test without the marker asks for it in its arguments,
    # which come after the autouse fixtures), so torn down, emptied, after this one.
    request.getfixturevalue("transactional_db")
    yield
    wait_live_workers_idle()


@pytest.fixture(autouse=True)
def _broker_reachable() -> None:
    # The publisher remembers an outage per process (to log it once); a test that cut the
    # broker must not make the next test's first failure a silent "still unreachable".
    broker.health.reset()


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue of its own for the admin/operations tests, with their shop wiring on it."""
    from tests.ops import shop_wiring

    name = f"ops-{uuid.uuid4().hex[:8]}"
    with shop_wiring(name):
        yield name


@pytest.fixture
def publish_now(django_capture_on_commit_callbacks: Any, queue: str) -> Callable[..., Any]:
    """``publish()`` with its on-commit deliveries run at once (the test's transaction stays)."""

    from django_events import publish

    def publish_now(name: str, payload: dict[str, Any], **kwargs: Any) -> Any:
        with django_capture_on_commit_callbacks(execute=True):
            return publish(name, payload, **kwargs)

    return publish_now


@contextmanager
def inserts_refused(table: str) -> Iterator[None]:
    """The default database refuses every INSERT into ``table`` (``OperationalError``), as a
    full disk or a connection lost mid-publish would."""

    def refuse(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("INSERT INTO") and table in sql.split("(")[0]:
            raise OperationalError(f"{table}: the rows cannot be written")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse):
        yield


def wiring(*subscriptions: dict[str, Any], **keys: Any) -> override_settings:
    """Override DJANGO_EVENTS with the base test settings plus these subscriptions/keys."""
    value = {**settings.DJANGO_EVENTS, "SUBSCRIPTIONS": list(subscriptions), **keys}
    return override_settings(DJANGO_EVENTS=value)


# pytest-django's public fixtures that open the test database to a test (admin_client and
# the like request `db`; `item.fixturenames` holds what a test's fixtures request in turn).
_DATABASE_FIXTURES = frozenset(
    {
        "db",
        "transactional_db",
        "django_db_reset_sequences",
        "django_db_serialized_rollback",
        "live_server",
    }
)


def uses_a_database(item: pytest.Item) -> bool:
    """Whether the test can reach a database: pytest-django keeps every other test away from
    one, unless it starts a worker (``servers``), which opens its own."""
    cls = getattr(item, "cls", None)
    return (
        item.get_closest_marker("django_db") is not None
        or item.get_closest_marker("servers") is not None
        or not _DATABASE_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
        or (cls is not None and issubclass(cls, TransactionTestCase))
    )


def pytest_itemcollected(item: pytest.Item) -> None:
    # `-m database` selects them (run_tests.sh's SQLite passes select from them; the rest runs
    # on PostgreSQL, and on Django 6.1 without servers).
    if uses_a_database(item):
        item.add_marker("database")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """PostgreSQL-only tests run in the suite's PostgreSQL pass, not skipped in the other;
    ``long`` tests start first, so the rest of a pass runs beside them, not after them."""
    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        selected = [i for i in items if i.get_closest_marker("postgresql") is None]
        if len(selected) < len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in selected])
            items[:] = selected
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable


@pytest.fixture
def without_module(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make ``module`` fail to import, as when it is not installed (kombu's transports, and
    which of them this process found it has confirms, read afresh)."""
    import sys

    import kombu.transport

    def hide(module: str) -> None:
        monkeypatch.setitem(sys.modules, module, None)
        for loaded in [m for m in sys.modules if m.startswith("kombu.transport.")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setattr(kombu.transport, "_transport_cache", {})
        monkeypatch.setattr(broker, "_transport_kinds", weakref.WeakKeyDictionary())

    return hide
