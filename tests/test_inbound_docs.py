"""The signing recipes of docs/inbound.md, run as written against a live server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from django.test import override_settings

from django_events.models import EventRecord
from tests.inbound import SECRET, docs_blocks, docs_python_recipe, inbound_wiring

pytestmark = pytest.mark.django_db(transaction=True)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    """The test project served on a free loopback port (one thread, closed after the test)."""
    server = ThreadedWSGIServer(("127.0.0.1", 0), _QuietHandler)
    server.set_app(WSGIHandler())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        with inbound_wiring(), override_settings(TEST_HOOK_SECRET=SECRET):
            yield f"http://{host}:{port}/events/hooks.paid/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_python_recipe_is_accepted(endpoint: str) -> None:
    request = docs_python_recipe()(endpoint, SECRET, {"payment_id": "pay_py", "amount": 3})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        event_id = json.load(response)["id"]
    record = EventRecord.objects.get(pk=event_id)
    assert record.payload == {"payment_id": "pay_py", "amount": 3}


def test_the_curl_recipe_is_accepted(endpoint: str) -> None:
    (script,) = [b for b in docs_blocks("sh") if "curl" in b]
    # The documented body has order_id too; hooks.paid's schema accepts extra keys.
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "URL": endpoint, "PAYMENTS_WEBHOOK_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    event_id = json.loads(result.stdout)["id"]
    record = EventRecord.objects.get(pk=event_id)
    assert record.payload == {"payment_id": "pay_123", "order_id": 42, "amount": 120.0}
    assert record.headers["caller"] == "hmac:TEST_HOOK_SECRET"


def test_a_wrong_secret_in_the_curl_recipe_is_refused(endpoint: str) -> None:
    (script,) = [b for b in docs_blocks("sh") if "curl" in b]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "URL": endpoint, "PAYMENTS_WEBHOOK_SECRET": "not-the-secret"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert json.loads(result.stdout)["error"] == "invalid_credentials"
    assert EventRecord.objects.count() == 0
