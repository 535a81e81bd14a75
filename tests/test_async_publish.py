"""``apublish()`` / ``apublish_many()`` from ``async def`` views: Django's AsyncClient, and a
real ASGI server (uvicorn) in its own process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.exceptions import SynchronousOnlyOperation
from django.db import connection
from django.test import AsyncClient

from django_events import InvalidPayload, UnknownEvent, apublish, apublish_many, publish
from django_events.models import Delivery, EventRecord
from tests.app.models import HandlerRun
from tests.test_registry import typed_events  # noqa: F401 - a fixture
from tests.worker import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = Path(settings.BASE_DIR) / "manifests"
ORDER = {"order_id": 1, "total": 12.5}


@pytest.fixture
def wired() -> Iterator[None]:
    from django.test import override_settings

    value = {
        **settings.DJANGO_EVENTS,
        "MANIFESTS": [MANIFESTS / "base.yaml", MANIFESTS / "async_publish.yaml"],
    }
    with override_settings(DJANGO_EVENTS=value):
        yield


def handled(event_id: object) -> list[str]:
    return sorted(HandlerRun.objects.filter(event_id=event_id).values_list("handler", flat=True))


def _post(client: AsyncClient, body: dict[str, Any]) -> Any:
    return async_to_sync(client.post)("/async/orders/", body, content_type="application/json")


def test_async_view_apublish_delivers_at_once_through_async_client(wired: None) -> None:
    response = _post(AsyncClient(), {"payload": ORDER})
    assert response.status_code == 200, response.content
    [event_id] = response.json()["ids"]
    # Outside a transaction: delivered before the response, both handlers, both recorded.
    assert handled(event_id) == ["record", "record_async"]
    assert EventRecord.objects.get(pk=event_id).payload == ORDER
    assert set(Delivery.objects.filter(event_id=event_id).values_list("status", flat=True)) == {
        "succeeded"
    }
    # The async handler ran on the loop serving the request, not on a loop of its own.
    run = HandlerRun.objects.get(event_id=event_id, handler="record_async")
    assert run.payload["loop"] == response.json()["loop"]
    assert response.json()["current"] is False  # no event context leaks into the view


def test_async_view_apublish_many_publishes_each_item(wired: None) -> None:
    response = _post(AsyncClient(), {"many": [ORDER, {"order_id": 2, "total": 1}]})
    ids = response.json()["ids"]
    assert len(ids) == 2
    assert [handled(i) for i in ids] == [["record", "record_async"]] * 2


def test_async_view_apublish_validates_like_publish(wired: None) -> None:
    response = _post(AsyncClient(), {"payload": {"order_id": 1, "total": -1}})
    assert response.status_code == 400
    assert "$.total" in response.json()["error"]
    assert not EventRecord.objects.exists()
    assert not HandlerRun.objects.exists()


def test_apublish_raises_what_publish_raises(wired: None) -> None:
    with pytest.raises(UnknownEvent):
        async_to_sync(apublish)("no.such.event", {})
    with pytest.raises(InvalidPayload):
        async_to_sync(apublish_many)([("orders.placed", ORDER), ("orders.placed", {"total": 1})])
    assert not EventRecord.objects.exists()  # one bad item: nothing published


@pytest.mark.usefixtures("typed_events")
def test_apublish_refuses_a_typed_instance_with_a_payload_too(wired: None) -> None:
    from tests.app.typed_events import OrderPlaced

    order = OrderPlaced(order_id=1, total=9.5, placed_at=datetime(2024, 1, 2, tzinfo=UTC))
    with pytest.raises(
        TypeError, match="'typed.order_placed': the OrderPlaced instance is the payload"
    ):
        async_to_sync(apublish)(order, {"order_id": 2})
    with pytest.raises(
        TypeError, match="'typed.order_placed': the OrderPlaced instance is the payload"
    ):
        async_to_sync(apublish_many)([("orders.placed", ORDER), (order, {"order_id": 2})])
    assert not EventRecord.objects.exists()


def test_plain_publish_in_async_code_is_refused_by_django(wired: None) -> None:
    """Why apublish exists: publish() touches the database, which Django refuses in a loop."""

    async def call() -> None:
        publish("orders.placed", ORDER)

    with pytest.raises(SynchronousOnlyOperation, match=r"publish with `await apublish\(\.\.\.\)`"):
        async_to_sync(call)()


# A real ASGI server.


@pytest.fixture
def uvicorn_server(tmp_path: Path) -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    log = (tmp_path / "uvicorn.log").open("wb")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_WORKER_DB_NAME": connection.settings_dict["NAME"],
        "DJANGO_EVENTS_TEST_MANIFEST": "async_publish.yaml",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.asgi:application", "--fd", str(listener.fileno())],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        pass_fds=[listener.fileno()],
    )
    listener.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _reachable(url), timeout=30, what="uvicorn to answer")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        log.close()


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/async/orders/", timeout=2)
    except urllib.error.HTTPError:
        return True  # it answered (GET without a body is a 500 from json.loads)
    except OSError:
        return False
    return True


def _http_post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{url}/async/orders/",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.servers
def test_async_view_under_uvicorn_publishes_and_delivers(uvicorn_server: str) -> None:
    status, body = _http_post(uvicorn_server, {"payload": ORDER})
    assert status == 200, body
    [event_id] = body["ids"]
    assert handled(event_id) == ["record", "record_async"]  # before the response came back
    runs = HandlerRun.objects.filter(event_id=event_id)
    assert {r.pid for r in runs} - {os.getpid()}  # the server process ran them
    assert runs.get(handler="record_async").payload["loop"] == body["loop"]
    assert set(Delivery.objects.filter(event_id=event_id).values_list("status", flat=True)) == {
        "succeeded"
    }

    status, body = _http_post(uvicorn_server, {"many": [ORDER, ORDER]})
    assert status == 200 and len(body["ids"]) == 2
    assert [handled(i) for i in body["ids"]] == [["record", "record_async"]] * 2

    status, body = _http_post(uvicorn_server, {"payload": {"total": 3}})
    assert status == 400 and "order_id" in body["error"]
