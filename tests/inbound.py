"""Helpers of the inbound tests: the signing recipe of docs/inbound.md, run as written."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.request import Request

from django.conf import settings
from django.test import Client
from django.test.client import Client as _Client

from tests.conftest import wiring

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "inbound.md"
MANIFESTS = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "inbound.yaml")]
SECRET = "whsec_test_2b7e151628aed2a6abf71589"


def inbound_wiring(**keys: Any):
    """DJANGO_EVENTS with tests/manifests/inbound.yaml loaded."""
    return wiring(MANIFESTS=MANIFESTS, **keys)


def docs_blocks(language: str) -> list[str]:
    text = DOCS.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def docs_python_recipe() -> Callable[[str, str, dict[str, Any]], Request]:
    """``signed_request`` exactly as docs/inbound.md writes it."""
    (block,) = [b for b in docs_blocks("python") if "def signed_request" in b]
    namespace: dict[str, Any] = {}
    exec(compile(block, str(DOCS), "exec"), namespace)
    return namespace["signed_request"]


def url(name: str) -> str:
    return f"/events/{name}/"


def post_signed(
    client: _Client | Client,
    name: str,
    payload: dict[str, Any],
    secret: str = SECRET,
    headers: dict[str, str] | None = None,
):
    """POST ``payload`` to the endpoint, signed by the docs' recipe."""
    request = docs_python_recipe()(f"http://testserver{url(name)}", secret, payload)
    sent = {k: v for k, v in request.header_items() if k.lower() != "content-type"}
    return client.post(
        url(name),
        data=request.data,
        content_type=request.get_header("Content-type"),
        headers={**sent, **(headers or {})},
    )


def post_raw(
    client, name: str, body: bytes, headers: dict[str, str], content_type: str = "application/json"
):
    # CONTENT_TYPE too: the test client leaves it out when the body is empty.
    return client.post(
        url(name), data=body, content_type=content_type, headers=headers, CONTENT_TYPE=content_type
    )


def body_of(payload: Any) -> bytes:
    return json.dumps(payload).encode()
