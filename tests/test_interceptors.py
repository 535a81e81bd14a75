"""Interceptors: ``send`` at publish and ``handle`` around inline, sync and async handler runs,
their failures, and the two shipped ones (correlation logging, context values)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.db import transaction
from django.http import HttpResponse
from django.test import RequestFactory

from django_events import Event, InterceptorError, publish, publish_many
from django_events.delivery.messages import build_message, event_body
from django_events.delivery.worker import process_message
from django_events.interceptors import context
from django_events.interceptors.context import ContextMiddleware
from django_events.interceptors.correlation import CorrelationFilter
from django_events.models import Delivery, EventRecord
from tests.app import interceptors
from tests.app.models import HandlerRun
from tests.conftest import wiring

PAYLOAD = {"order_id": 1, "total": 12.5}
APP = "tests.app.interceptors"
CHAINS = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "chains.yaml")]


def sub(mode: str, handler: str = "tests.app.handlers.record") -> dict[str, str]:
    return {"event": "orders.placed", "handler": handler, "mode": mode, "name": f"{mode}-sub"}


@pytest.fixture(autouse=True)
def _no_calls() -> Iterator[None]:
    interceptors.calls.clear()
    yield
    interceptors.calls.clear()


def run_async(event: Event, subscription: str = "async-sub", prior_attempts: int = 0) -> str:
    """Run the message a worker would get for ``subscription`` (the test broker is memory://)."""
    message = build_message(event_body(event), subscription, "default", prior_attempts)
    return process_message(message, 0).status


# -- send and handle, in order, on every mode -----------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["inline", "sync", "async"])
def test_send_adds_headers_and_handle_wraps_the_handler_in_pipeline_order(mode: str) -> None:
    with wiring(sub(mode), PIPELINE=[f"{APP}.Outer", f"{APP}.Inner"]):
        with transaction.atomic():
            event = publish("orders.placed", PAYLOAD, headers={"given": "yes"})
        if mode == "async":
            assert run_async(event) == "succeeded"

    assert event.headers == {"given": "yes", "stamp": "outer"}
    assert EventRecord.objects.get(pk=event.id).headers == {"given": "yes", "stamp": "outer"}
    assert interceptors.calls == [
        ("outer", "send", "orders.placed"),
        ("inner", "send", "outer"),  # the second interceptor sees the first one's header
        ("outer", "before", f"{mode}-sub"),
        ("inner", "before", f"{mode}-sub"),
        ("outer", "after", f"{mode}-sub"),
    ]
    assert HandlerRun.objects.get().event_id == event.id


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["inline", "sync", "async"])
def test_an_interceptor_overriding_send_only_lets_every_handler_run(mode: str) -> None:
    with wiring(sub(mode), PIPELINE=[f"{APP}.StampsOnly"]):
        with transaction.atomic():
            event = publish("orders.placed", PAYLOAD)
        if mode == "async":
            assert run_async(event) == "succeeded"

    [handled] = HandlerRun.objects.all()
    assert handled.event_id == event.id
    assert EventRecord.objects.get(pk=event.id).headers == {"stamp": "only"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["inline", "sync", "async"])
def test_an_interceptor_raising_in_send_aborts_the_publish(mode: str) -> None:
    with (
        wiring(sub(mode), PIPELINE=[f"{APP}.Outer", f"{APP}.RefusesToSend"]),
        pytest.raises(InterceptorError) as info,
    ):
        publish("orders.placed", PAYLOAD)

    error = info.value
    assert str(error) == (
        f"Interceptor {APP}.RefusesToSend refused event 'orders.placed': "
        "PermissionError: no tenant bound"
    )
    assert isinstance(error.__cause__, PermissionError) and error.name == "orders.placed"
    assert not EventRecord.objects.exists()
    assert not HandlerRun.objects.exists()  # not even the inline handler ran
    assert not Delivery.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_publish_many_sends_nothing_when_one_item_is_refused() -> None:
    with (
        wiring(sub("inline"), sub("sync"), PIPELINE=[f"{APP}.RefusesOrderTwo"]),
        pytest.raises(InterceptorError, match="order 2 is on hold"),
    ):
        publish_many([("orders.placed", {**PAYLOAD, "order_id": n}) for n in (1, 2, 3)])
    assert not EventRecord.objects.exists() and not HandlerRun.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_header_that_is_not_a_string_aborts_the_publish() -> None:
    with (
        wiring(sub("sync"), PIPELINE=[f"{APP}.BadHeader"]),
        pytest.raises(InterceptorError, match=r"header 'tenant' is 42; headers map str to str"),
    ):
        publish("orders.placed", PAYLOAD)
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_header_that_is_not_a_string_names_the_interceptor_that_set_it() -> None:
    with (
        wiring(sub("sync"), PIPELINE=[f"{APP}.StampsOnly", f"{APP}.BadHeader", f"{APP}.Inner"]),
        pytest.raises(InterceptorError) as refused,
    ):
        publish("orders.placed", PAYLOAD)

    assert refused.value.interceptor == f"{APP}.BadHeader"
    assert str(refused.value).startswith(f"Interceptor {APP}.BadHeader refused event")
    assert refused.value.__cause__ is refused.value.error
    assert isinstance(refused.value.error, ValueError)
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_interceptor_raising_in_handle_inline_propagates_and_rolls_back() -> None:
    with (
        wiring(sub("inline"), PIPELINE=[f"{APP}.FailsToHandle"]),
        pytest.raises(LookupError, match="tenant of inline-sub is gone"),
        transaction.atomic(),
    ):
        publish("orders.placed", PAYLOAD)
    assert not EventRecord.objects.exists() and not HandlerRun.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_interceptor_raising_in_handle_sync_is_a_recorded_handler_failure() -> None:
    with wiring(sub("sync"), PIPELINE=[f"{APP}.FailsToHandle"]), transaction.atomic():
        event = publish("orders.placed", PAYLOAD)  # never raises into the committing code

    failure = Delivery.objects.get(event_id=event.id)
    assert (failure.subscription, failure.status, failure.attempts) == ("sync-sub", "failed", 1)
    assert failure.last_error == "LookupError: tenant of sync-sub is gone"
    assert "tests/app/interceptors.py" in failure.traceback
    assert not HandlerRun.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_interceptor_raising_in_handle_async_is_a_retried_then_failed_delivery() -> None:
    with wiring(sub("async"), PIPELINE=[f"{APP}.FailsToHandle"]):
        event = publish("orders.placed", PAYLOAD)
        assert run_async(event) == "retry"
        delivery = Delivery.objects.get(event_id=event.id)
        assert (delivery.status, delivery.attempts) == ("pending", 1)
        assert run_async(event, prior_attempts=2) == "failed"  # the last allowed attempt

    failure = Delivery.objects.get(event_id=event.id)
    assert (failure.status, failure.attempts) == ("failed", 3)
    assert failure.last_error == "LookupError: tenant of async-sub is gone"
    assert not HandlerRun.objects.exists()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (f"{APP}.OnlySends", "it has no handle method"),
        (f"{APP}.NeedsArguments", "TypeError: NeedsArguments.__init__() missing 1 required"),
        ("tests.app.handlers.not_callable", "it has no send or handle method"),
    ],
)
def test_a_pipeline_entry_that_is_not_an_interceptor_is_E110_and_left_out(
    entry: str, reason: str
) -> None:
    from django_events.wiring.registry import get_registry

    with wiring(PIPELINE=[entry, f"{APP}.Inner"]):
        registry = get_registry()
        [problem] = registry.problems
        interceptor_types = [type(i).__name__ for i in registry.interceptors]

    assert problem.id == "django_events.E110"
    assert problem.message.startswith(f"PIPELINE entry {entry!r} is not an interceptor: {reason}")
    assert interceptor_types == ["Inner"]


# -- the correlation interceptor ------------------------------------------------------------

CHAIN = {"event": "orders.placed", "handler": "tests.app.handlers.chain_next", "mode": "sync"}
SHIPPED = {"event": "orders.shipped", "handler": "tests.app.handlers.record", "name": "shipped"}


@pytest.mark.django_db(transaction=True)
def test_correlation_interceptor_logs_each_step_of_a_chain_with_both_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "django_events.interceptors.correlation")
    with wiring(
        CHAIN, SHIPPED, PIPELINE=["django_events.interceptors.correlation.CorrelationInterceptor"]
    ):
        placed = publish("orders.placed", PAYLOAD)
    shipped = EventRecord.objects.get(name="orders.shipped")

    logged = [
        (r.getMessage().split(" (")[0], r.correlation_id, r.causation_id) for r in caplog.records
    ]
    root, child = str(placed.id), str(shipped.id)
    assert [(m.split(" in ")[0], c, k) for m, c, k in logged] == [
        (f"Published orders.placed {root}", root, None),
        (f"Published orders.shipped {child}", root, root),
        (f"Handled orders.shipped {child} by shipped", root, root),
        (f"Handled orders.placed {root} by {CHAIN['event']}:{CHAIN['handler']}", root, None),
    ]
    assert f"(correlation {root}, caused by {root})" in caplog.records[1].getMessage()
    assert {r.event_name for r in caplog.records} == {"orders.placed", "orders.shipped"}
    assert caplog.records[2].subscription == "shipped"


@pytest.mark.django_db(transaction=True)
def test_correlation_interceptor_logs_a_failed_handler_and_lets_it_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = sub("sync", "tests.app.handlers.always_fails")
    with wiring(
        failing, PIPELINE=["django_events.interceptors.correlation.CorrelationInterceptor"]
    ):
        event = publish("orders.placed", PAYLOAD)

    [warning] = [
        r
        for r in caplog.records
        if r.name == "django_events.interceptors.correlation" and r.levelno == logging.WARNING
    ]
    assert warning.getMessage().startswith(f"Handler sync-sub failed on orders.placed {event.id}")
    assert warning.getMessage().endswith("RuntimeError: boom for 1")
    assert warning.correlation_id == str(event.id)
    assert Delivery.objects.get(event_id=event.id).status == "failed"


def test_correlation_filter_adds_the_handled_events_ids_to_any_log_record() -> None:
    from django_events.events import handling

    event = SimpleNamespace(id="e1", name="orders.placed", correlation_id="c1", causation_id="p1")
    make = lambda: logging.LogRecord("app", logging.INFO, __file__, 1, "hello", None, None)  # noqa: E731
    outside, inside = make(), make()
    assert CorrelationFilter().filter(outside)
    with handling(event):  # type: ignore[arg-type]
        assert CorrelationFilter().filter(inside)

    assert (outside.correlation_id, outside.causation_id, outside.event_id) == ("-", "-", "-")
    assert (inside.correlation_id, inside.causation_id, inside.event_id) == ("c1", "p1", "e1")
    assert inside.event_name == "orders.placed"


LOGGING_OF_THE_DOCS = """
import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["django_events"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    DJANGO_EVENTS={
        "EVENTS": {"orders.shipped": None},
        "PIPELINE": ["django_events.interceptors.correlation.CorrelationInterceptor"],
    },
    LOGGING={  # docs/interceptors.md's, without disable_existing_loggers (true by default)
        "version": 1,
        "filters": {"events": {"()": "django_events.interceptors.correlation.CorrelationFilter"}},
        "formatters": {"plain": {"format": "%(levelname)s [%(correlation_id)s] %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain",
                                 "filters": ["events"]}},
        "root": {"handlers": ["console"], "level": "INFO"},
    },
)
django.setup()
from django.core.management import call_command
from django_events import publish

call_command("migrate", verbosity=0)
print(publish("orders.shipped", {}).id)
"""


def test_correlation_interceptor_logs_when_logging_names_its_filter() -> None:
    # LOGGING imports the filter's module; dictConfig() then disabled the loggers that
    # existed, and the interceptor's was one of them: it logged nothing.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    run = subprocess.run(
        [sys.executable, "-c", LOGGING_OF_THE_DOCS],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    event_id = run.stdout.strip()
    assert f"INFO [{event_id}] Published orders.shipped {event_id}" in run.stderr


# -- the context interceptor ----------------------------------------------------------------

CONTEXT = "django_events.interceptors.context.ContextInterceptor"


def forwarded() -> dict[str, dict[str, object]]:
    return {
        r.event_name: r.payload["context"] for r in HandlerRun.objects.filter(handler="forward")
    }


def message_from_record(name: str) -> dict[str, object]:
    record = EventRecord.objects.get(name=name)
    return {
        "id": str(record.id),
        "name": record.name,
        "payload": record.payload,
        "headers": record.headers,
        "occurred_at": record.occurred_at.isoformat(),
        "correlation_id": str(record.correlation_id),
        "causation_id": str(record.causation_id) if record.causation_id else None,
    }


@pytest.mark.django_db(transaction=True)
def test_context_values_travel_in_headers_to_sync_and_async_handlers_and_down_the_chain() -> None:
    with wiring(MANIFESTS=CHAINS, PIPELINE=[CONTEXT]):
        with context.bind(tenant="acme", user_id=7), transaction.atomic():
            placed = publish("chain.placed", {"steps": ["chain.billed", "chain.shipped"]})
        assert context.values() == {}
        # The worker's side, in a context where nothing is bound: headers restore the values.
        message = build_message(message_from_record("chain.billed"), "chain-billed", "default")
        assert process_message(message, 0).status == "succeeded"
        message = build_message(message_from_record("chain.shipped"), "chain-shipped", "default")
        assert process_message(message, 0).status == "succeeded"

    assert placed.headers == {"context-tenant": "acme", "context-user_id": "7"}
    values = {"tenant": "acme", "user_id": "7"}
    assert forwarded() == {"chain.placed": values, "chain.billed": values, "chain.shipped": values}
    assert context.values() == {}  # restored after each handler run


@pytest.mark.django_db(transaction=True)
def test_a_handler_sees_the_values_of_its_event_not_those_bound_around_the_commit() -> None:
    with wiring(MANIFESTS=CHAINS, PIPELINE=["tests.app.interceptors.tenant_only"]):
        with context.bind(tenant="acme", user_id=7), transaction.atomic():
            event = publish("chain.placed", {})
            with context.bind(tenant="other"):  # the commit happens here, in another context
                pass
        with context.bind(tenant="globex"):
            publish("chain.placed", {})

    assert event.headers == {"context-tenant": "acme"}  # keys=["tenant"]: user_id stays home
    runs = HandlerRun.objects.filter(handler="forward").order_by("id")
    assert [r.payload["context"] for r in runs] == [{"tenant": "acme"}, {"tenant": "globex"}]


@pytest.mark.django_db(transaction=True)
def test_a_failing_handler_leaves_the_values_around_it_as_they_were() -> None:
    failing = sub("async", handler="tests.app.handlers.always_fails")
    with wiring(failing, PIPELINE=[CONTEXT]):
        with context.bind(tenant="acme"):
            event = publish("orders.placed", {**PAYLOAD, "total": 100})
        with context.bind(tenant="worker"):
            assert run_async(event, "async-sub") == "retry"
            assert context.values() == {"tenant": "worker"}
    assert context.values() == {}


def test_bind_nests_converts_to_str_and_unbinds_with_none() -> None:
    with context.bind(tenant="acme", user_id=7):
        with context.bind(user_id=None, request="r1"):
            assert context.values() == {"tenant": "acme", "request": "r1"}
            assert context.get("user_id") is None and context.get("user_id", "-") == "-"
        assert context.get("user_id") == "7"
    assert context.values() == {}


@pytest.mark.django_db(transaction=True)
def test_context_middleware_binds_the_user_id_for_the_request() -> None:
    seen: list[dict[str, str]] = []

    def view(request: object) -> HttpResponse:
        seen.append(publish("chain.placed", {}).headers)
        return HttpResponse("ok")

    class TenantMiddleware(ContextMiddleware):
        def context_for(self, request):
            return {**super().context_for(request), "tenant": request.headers["X-Tenant"]}

    request = RequestFactory().get("/", HTTP_X_TENANT="acme")
    with wiring(MANIFESTS=CHAINS, PIPELINE=[CONTEXT]):
        request.user = SimpleNamespace(is_authenticated=True, pk=7)
        ContextMiddleware(view)(request)
        request.user = SimpleNamespace(is_authenticated=False, pk=None)
        ContextMiddleware(view)(request)
        TenantMiddleware(view)(request)

    assert seen == [{"context-user_id": "7"}, {}, {"context-tenant": "acme"}]
    assert context.values() == {}
