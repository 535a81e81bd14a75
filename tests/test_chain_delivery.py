"""A handler chain through a real worker: sync -> async -> async, with the context values of
the publishing request restored around each handler (ContextInterceptor in PIPELINE)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory

from django_events import publish
from django_events.interceptors import context
from django_events.interceptors.context import ContextMiddleware
from django_events.models import EventRecord
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import WorkerProcess, start_worker, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

PIPELINE = [
    "django_events.interceptors.correlation.CorrelationInterceptor",
    "django_events.interceptors.context.ContextInterceptor",
]


@pytest.fixture
def worker(django_db_setup, django_db_blocker, tmp_path) -> Iterator[WorkerProcess]:
    env = {
        "DJANGO_EVENTS_TEST_PIPELINE": ",".join(PIPELINE),
        # Events the worker's handlers publish go through the broker too.
        "CELERY_BROKER_URL": brokers.AMQP_URL,
    }
    with start_worker("amqp", tmp_path, prefix="chain", manifest="chains.yaml", env=env) as process:
        try:
            with brokers.delivery_wiring("amqp", process.queue, "chains.yaml", PIPELINE=PIPELINE):
                yield process
        finally:
            process.stop(cold=True)  # the test waited for its deliveries: nothing is running


def test_a_sync_async_async_chain_shares_one_correlation_id_and_the_request_context(
    worker: WorkerProcess,
) -> None:
    published = []

    def place_order(request: HttpRequest) -> HttpResponse:  # a view
        with transaction.atomic():
            steps = ["chain.billed", "chain.shipped"]
            published.append(publish("chain.placed", {"steps": steps}))
        return HttpResponse(status=202)

    class TenantMiddleware(ContextMiddleware):
        def context_for(self, request: HttpRequest) -> dict[str, object]:
            return {**super().context_for(request), "tenant": request.headers["X-Tenant"]}

    request = RequestFactory().post("/orders/", HTTP_X_TENANT="acme")
    request.user = SimpleNamespace(is_authenticated=True, pk=7)  # as AuthenticationMiddleware
    assert TenantMiddleware(place_order)(request).status_code == 202
    assert context.values() == {}  # the request is over
    [first] = published

    last = wait_for(
        lambda: HandlerRun.objects.filter(handler="forward", event_name="chain.shipped").first(),
        what="the third step on the worker",
    )
    runs = {r.event_name: r for r in HandlerRun.objects.filter(handler="forward")}
    assert list(runs) == ["chain.placed", "chain.billed", "chain.shipped"]
    # The first step ran here (sync), the next two on the worker.
    assert runs["chain.placed"].pid == os.getpid()
    assert {runs["chain.billed"].pid, last.pid}.isdisjoint({os.getpid()})
    # The request-scoped values, set at publish time, seen by each async handler.
    expected = {"user_id": "7", "tenant": "acme"}
    assert [r.payload["context"] for r in runs.values()] == [expected] * 3
    # One correlation id; each causation id names the step before.
    records = {r.name: r for r in EventRecord.objects.filter(correlation_id=first.id)}
    assert sorted(records) == ["chain.billed", "chain.placed", "chain.shipped"]
    assert records["chain.placed"].causation_id is None
    assert records["chain.billed"].causation_id == records["chain.placed"].id
    assert records["chain.shipped"].causation_id == records["chain.billed"].id
    assert {r.correlation_id for r in runs.values()} == {first.id}
    assert last.causation_id == records["chain.billed"].id
    assert records["chain.shipped"].headers == {"context-user_id": "7", "context-tenant": "acme"}
