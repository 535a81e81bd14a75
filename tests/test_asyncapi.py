"""`events_asyncapi`: the wiring as an AsyncAPI 3.0 document, valid against the official
JSON Schema (vendored in tests/asyncapi/, see its README)."""

from __future__ import annotations

import json
from functools import cache
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from jsonschema import Draft7Validator

from tests.conftest import wiring
from tests.test_example_project import EXAMPLE, manage
from tests.test_registry import typed_events  # noqa: F401 - a fixture

SCHEMA = Path(__file__).resolve().parent / "asyncapi" / "asyncapi-3.0.0.schema.json"


@cache
def validator() -> Draft7Validator:
    return Draft7Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))


def schema_errors(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator().iter_errors(document)
    ]


def dangling_refs(document: dict[str, Any]) -> list[str]:
    """Every local `$ref` in the document that points at nothing."""
    found: list[str] = []

    def target(ref: str) -> Any:
        node: Any = document
        for part in filter(None, ref[1:].split("/")):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                try:
                    target(ref)
                except (KeyError, IndexError, TypeError):
                    found.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    return found


def asyncapi(*args: str) -> str:
    out = StringIO()
    call_command("events_asyncapi", *args, stdout=out)
    return out.getvalue()


@cache
def example_document() -> str:
    result = manage("events_asyncapi", "--title", "Example shop", "--api-version", "2.1.0")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_example_project_document_is_valid_asyncapi_3() -> None:
    document = json.loads(example_document())

    assert schema_errors(document) == []
    assert dangling_refs(document) == []
    assert document["asyncapi"] == "3.0.0"
    assert document["info"] == {"title": "Example shop", "version": "2.1.0"}
    manifests = [yaml.safe_load(p.read_text()) for p in sorted(EXAMPLE.rglob("events.yaml"))]
    declared = {name for m in manifests for name in m.get("events") or {}}
    assert {"orders.order_cancelled", "orders.order_placed"} <= declared
    assert set(document["channels"]) == declared
    subscribed = {s["name"] for m in manifests for s in m.get("subscriptions") or []}
    assert {op["x-django-events"]["subscription"] for op in document["operations"].values()} == (
        subscribed
    )
    placed = document["components"]["schemas"]["orders.order_placed"]
    assert placed["required"] == ["order_id", "total", "email"]
    operations = document["operations"]
    invoice = operations["billing.create_invoice"]
    assert invoice["action"] == "receive"
    assert invoice["channel"] == {"$ref": "#/channels/orders.order_placed"}
    assert invoice["x-django-events"]["queue"] == "billing"
    assert invoice["x-django-events"]["retry"]["max_attempts"] == 5
    assert operations["notifications.big_order_alert"]["x-django-events"]["when"] == {
        "total": {"gte": 1000}
    }
    # The orders.* pattern subscription: one operation per event it receives.
    assert sorted(k for k in operations if k.startswith("notifications.order_activity")) == [
        "notifications.order_activity.orders.order_cancelled",
        "notifications.order_activity.orders.order_placed",
    ]
    assert (
        "queue"
        not in operations["notifications.order_activity.orders.order_placed"]["x-django-events"]
    )


TREE = {
    "schema": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}},
            "children": {"type": "array", "items": {"$ref": "#"}},
        },
        "$defs": {"line": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    }
}


@pytest.mark.django_db
@pytest.mark.usefixtures("typed_events")
def test_local_references_and_typed_events_stay_reachable() -> None:
    subscription = {
        "event": "*",
        "handler": "tests.app.handlers.record",
        "mode": "async",
        "name": "record: all",  # not an AsyncAPI identifier as it is
        "queue": "audit",
    }
    broadcast = {
        "event": "catalog.tree",
        "handler": "tests.app.handlers.record",
        "mode": "async",
        "name": "cache-flush",
        "queue": "caches",
        "broadcast": True,
    }
    with wiring(subscription, broadcast, EVENTS={"catalog.tree": TREE}):
        document = json.loads(asyncapi())
        as_yaml = yaml.safe_load(asyncapi("--format", "yaml"))

    assert schema_errors(document) == []
    assert dangling_refs(document) == []
    assert as_yaml == document
    schemas = document["components"]["schemas"]
    assert {"typed.order_placed", "typed.payment_received", "catalog.tree"} <= set(schemas)
    tree = schemas["catalog.tree"]
    assert "$defs" not in tree
    assert tree["properties"]["lines"]["items"] == {
        "$ref": "#/components/schemas/catalog.tree.line"
    }
    assert tree["properties"]["children"]["items"] == {"$ref": "#/components/schemas/catalog.tree"}
    assert schemas["catalog.tree.line"]["properties"] == {"sku": {"type": "string"}}
    operations = {k: op for k, op in document["operations"].items() if k.startswith("record__all.")}
    assert "record__all.catalog.tree" in operations
    assert all(
        op["x-django-events"]["subscription"] == "record: all"
        and op["x-django-events"]["queue"] == "audit"
        for op in operations.values()
    )
    assert len(operations) == len(document["channels"])
    flush = document["operations"]["cache-flush"]
    assert flush["x-django-events"]["exchange"] == "caches.broadcast"
    assert {"name": "broadcast"} in flush["tags"]
    assert "exchange" not in operations["record__all.catalog.tree"]["x-django-events"]


def test_a_broken_wiring_prints_no_document_but_the_check_error() -> None:
    out = StringIO()
    undeclared = {"event": "orders.nope", "handler": "tests.app.handlers.record", "name": "lost"}
    with wiring(undeclared), pytest.raises(SystemCheckError, match=r"E105.*'lost'"):
        call_command("events_asyncapi", stdout=out, skip_checks=False)  # as manage.py runs it

    assert out.getvalue() == ""


def test_the_vendored_schema_rejects_a_broken_document() -> None:
    document = json.loads(example_document())
    operation = next(iter(document["operations"].values()))
    operation["action"] = "consume"
    del document["info"]["version"]

    errors = schema_errors(document)

    assert any("'version' is a required property" in e for e in errors)
    assert any("consume" in e for e in errors)


def test_each_event_carries_its_version() -> None:
    events = {"o.v3": {"version": 3, "upcast": {1: "tests.app.upcasters.split_total"}}, "o.v1": {}}
    with wiring(EVENTS=events):
        document = json.loads(asyncapi())

    assert schema_errors(document) == []
    assert document["channels"]["o.v3"]["x-django-events"]["version"] == 3
    assert document["channels"]["o.v1"]["x-django-events"]["version"] == 1
    assert document["components"]["messages"]["o.v3"]["x-django-events"] == {"version": 3}
