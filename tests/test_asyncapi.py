"""`events_asyncapi`: the wiring as an AsyncAPI 3.0 document, valid for the official parser
(`@asyncapi/parser`, installed in tests/asyncapi/ by scripts/run_tests.sh) and against the
official JSON Schema (vendored in tests/asyncapi/, see its README)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from functools import cache
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from celery import Celery
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from jsonschema import Draft7Validator
from kombu import Exchange, Queue

from tests.brokers import REDIS_URL
from tests.conftest import wiring
from tests.test_example_project import EXAMPLE, manage_with
from tests.test_registry import typed_events  # noqa: F401 - a fixture

FOLDER = Path(__file__).resolve().parent / "asyncapi"
SCHEMA = FOLDER / "asyncapi-3.0.0.schema.json"
ROOT = FOLDER.parent.parent
ALL = Path(settings.BASE_DIR) / "manifests" / "asyncapi.yaml"


def parse(document: dict[str, Any] | str) -> list[dict[str, str]]:
    """The official parser's diagnostics of ``document`` (tests/asyncapi/validate.mjs)."""
    node = shutil.which("node")
    if node is None or not (FOLDER / "node_modules" / "@asyncapi" / "parser").is_dir():
        message = "the AsyncAPI parser is not installed: cd tests/asyncapi && npm ci"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    text = document if isinstance(document, str) else json.dumps(document)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        out.write(text)
    try:
        run = subprocess.run(
            [node, str(FOLDER / "validate.mjs"), out.name],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.unlink(out.name)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    return list(result["diagnostics"])


def parser_errors(document: dict[str, Any] | str) -> list[str]:
    """The diagnostics of error severity, as "path: message" lines."""
    return [
        f"{d['path']}: {d['code']}: {d['message']}"
        for d in parse(document)
        if d["severity"] == "error"
    ]


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
def example_document(broker: str = "filesystem://") -> str:
    # PYTHONPATH: this checkout's package, whatever the shared virtualenv has installed.
    env = {"PYTHONPATH": str(ROOT), "CELERY_BROKER_URL": broker}
    args = ("events_asyncapi", "--title", "Example shop", "--api-version", "2.1.0")
    result = manage_with(env, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "broker",
    ["amqp://guest:guest@127.0.0.1:5672//", "redis://:s3cret@127.0.0.1:6379/0", "filesystem://"],
)
def test_example_project_document_passes_the_official_parser(broker: str) -> None:
    text = example_document(broker)
    document = json.loads(text)

    assert parser_errors(text) == []
    assert schema_errors(document) == []
    assert dangling_refs(document) == []
    assert "guest" not in text and "s3cret" not in text


def test_example_project_document_describes_the_wire() -> None:
    document = json.loads(example_document("amqp://guest:guest@127.0.0.1:5672//"))

    assert document["asyncapi"] == "3.0.0"
    assert document["info"] == {"title": "Example shop", "version": "2.1.0"}
    assert document["servers"]["broker"] == {
        "host": "127.0.0.1:5672",
        "protocol": "amqp",
        "protocolVersion": "0.9.1",
        "title": "Celery broker",
        "description": "The broker of the Celery app (`CELERY_APP`).",
    }
    assert document["servers"]["http"]["pathname"] == "/events"
    manifests = [yaml.safe_load(p.read_text()) for p in sorted(EXAMPLE.rglob("events.yaml"))]
    declared = {name for m in manifests for name in m.get("events") or {}}
    assert {"orders.order_cancelled", "orders.order_placed"} <= declared
    assert {m for m in document["components"]["messages"] if "." not in m[-5:]} >= declared
    subscribed = {s["name"] for m in manifests for s in m.get("subscriptions") or []}
    received = [op for op in document["operations"].values() if op["action"] == "receive"]
    assert {
        op["x-django-events"]["subscription"]
        for op in received
        if "subscription" in op["x-django-events"]
    } == subscribed
    placed = document["components"]["schemas"]["orders.order_placed"]
    assert placed["required"] == ["order_id", "total", "email"]
    # The queue as Celery sends to it: AMQP's default exchange, routing key "billing" (the
    # delivery_info of a real message says so: tests/test_monitoring.py).
    billing = document["channels"]["queue.billing"]
    assert billing["address"] == "billing"
    assert billing["bindings"] == {
        "amqp": {
            "is": "routingKey",
            "exchange": {"type": "default", "vhost": "/"},
            "bindingVersion": "0.3.0",
        }
    }
    consumed = document["channels"]["queue.billing.consume"]
    assert consumed["address"] == "billing"
    assert consumed["bindings"]["amqp"]["queue"] == {
        "name": "billing",
        "durable": True,
        "exclusive": False,
        "autoDelete": False,
        "vhost": "/",
    }
    operations = document["operations"]
    send = operations["send.orders.order_placed.billing"]
    assert send["action"] == "send"
    assert send["channel"] == {"$ref": "#/channels/queue.billing"}
    assert send["bindings"]["amqp"]["deliveryMode"] == 2
    invoice = operations["billing.create_invoice"]
    assert invoice["action"] == "receive"
    assert invoice["channel"] == {"$ref": "#/channels/queue.billing.consume"}
    assert invoice["bindings"] == {"amqp": {"ack": True, "bindingVersion": "0.3.0"}}
    assert invoice["x-django-events"]["retry"]["max_attempts"] == 5
    assert operations["notifications.big_order_alert"]["x-django-events"]["when"] == {
        "total": {"gte": 1000}
    }
    # The orders.* pattern subscription: one operation per event it receives.
    assert sorted(k for k in operations if k.startswith("notifications.order_activity")) == [
        "notifications.order_activity.orders.order_cancelled",
        "notifications.order_activity.orders.order_placed",
    ]
    # The Celery task message, with the payload schema inside its one argument.
    task = document["components"]["messages"]["orders.order_placed.task"]
    assert task["headers"]["properties"]["task"] == {"const": "django_events.deliver"}
    [args, _, _] = task["payload"]["items"]
    event = args["items"][0]["properties"]["event"]
    # email is redacted: the message carries it masked, and the payload sealed.
    assert event["properties"]["payload"] == {
        "$ref": "#/components/schemas/orders.order_placed.masked"
    }
    assert "sealed" in event["properties"]
    # Inbound: an http channel and a POST operation.
    inbound = operations["inbound.payments.payment_succeeded"]
    assert inbound["bindings"]["http"]["method"] == "POST"
    channel = document["channels"]["http.payments.payment_succeeded"]
    assert channel["address"] == "/payments.payment_succeeded/"
    assert "secret" not in inbound["x-django-events"]


@pytest.mark.servers
@pytest.mark.django_db
def test_a_message_on_the_wire_matches_its_description() -> None:
    """A real task message, as `send_deliveries` put it on RabbitMQ and read back raw,
    validates against the document's schemas, and each of its keys is described."""
    from django.utils import timezone

    from django_events.delivery.broker import Unsent, send_deliveries
    from django_events.events import Event
    from django_events.wiring.registry import get_registry
    from tests import brokers

    brokers.require_server(brokers.AMQP_URL, "RabbitMQ")
    queue = f"asyncapi-{uuid.uuid4().hex[:8]}"
    subscription = {"event": "orders.placed", "handler": "tests.app.handlers.record"}
    with wiring(
        {**subscription, "mode": "async", "name": "billing"},
        DEFAULT_QUEUE=queue,
        CELERY_APP="tests.brokers.amqp",
    ):
        document = json.loads(asyncapi())
        ident = uuid.uuid4()
        data = {"order_id": 1, "total": 2.5, "email": "ada@example.com"}
        event = Event(ident, "orders.placed", data, {}, timezone.now(), ident, None, data)
        compiled = get_registry().event("orders.placed")
        assert send_deliveries([(event, True, compiled.async_)], "default") == Unsent()
    try:
        with brokers.amqp.connection_for_write() as conn:
            raw = conn.default_channel.basic_get(queue, no_ack=True)
    finally:
        with brokers.amqp.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    assert raw is not None
    headers = raw.headers  # as Celery sends them: ignore_result true, timelimit [null, null]
    body = json.loads(raw.body)
    task = document["components"]["messages"]["orders.placed.task"]
    resolver_root = {"components": document["components"]}

    def check(schema: dict[str, Any], value: Any) -> list[str]:
        validator = Draft7Validator({**schema, **resolver_root})
        return [e.message for e in validator.iter_errors(value)]

    assert check(task["payload"], body) == []
    assert check(task["headers"], headers) == []
    # A retry that ran nothing (the worker could not reach the database, or waits for a
    # newer release) is sent with one prior attempt less: below 0 on a first send's retry.
    body[0][0]["prior_attempts"] = -1
    assert check(task["payload"], body) == []
    body[0][0]["prior_attempts"] = 0
    # Nothing on the wire goes undescribed: every header, every key of the event.
    assert set(headers) <= set(task["headers"]["properties"])
    described = task["payload"]["items"][0]["items"][0]["properties"]["event"]
    assert set(body[0][0]["event"]) <= set(described["properties"])
    assert set(described["required"]) <= set(body[0][0]["event"])
    assert body[0][0]["event"]["payload"]["email"] == "•••" and "sealed" in body[0][0]["event"]
    body[0][0]["event"]["payload"]["total"] = -1
    assert check(task["payload"], body) != []
    body[0][0]["event"]["payload"].update(total=1, email="ada@example.com")  # not masked
    assert check(task["payload"], body) != []
    body[0][0]["event"]["payload"]["email"] = "•••"
    body[0][0]["event"]["version"] = 0
    assert check(task["payload"], body) != []


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
    events = {k for k in document["components"]["messages"] if not k.endswith((".task", ".http"))}
    assert len(operations) == len(events)
    flush = document["operations"]["cache-flush"]
    assert flush["x-django-events"]["exchange"] == "caches.broadcast"
    assert {"name": "broadcast"} in flush["tags"]
    assert "exchange" not in operations["record__all.catalog.tree"]["x-django-events"]


def test_an_event_named_like_another_ones_derived_keys_keeps_its_own() -> None:
    """Keys made from an event's (its task message, masked payload, $defs) never take the
    key of an event so named: ``x.task``, ``user.masked`` and ``tree.line`` are events."""

    def obj(*required: str) -> dict[str, Any]:
        properties = {name: {"type": "string"} for name in required}
        return {"schema": {"type": "object", "required": list(required), "properties": properties}}

    events = {
        "x": obj("a"),
        "x.task": obj("b"),
        "user": {**obj("email"), "redact": ["email"]},
        "user.masked": obj("reason"),
        "tree": TREE,
        "tree.line": obj("c"),
    }
    everything = {"event": "*", "handler": "tests.app.handlers.record", "mode": "async"}
    with wiring({**everything, "queue": "clash"}, EVENTS=events):
        document = json.loads(asyncapi())

    messages, schemas = document["components"]["messages"], document["components"]["schemas"]
    sent = document["channels"]["queue.clash"]["messages"]
    for name in events:
        task = messages[sent[name]["$ref"].rpartition("/")[2]]
        assert task["title"] == f"{name} (Celery task message)"
        delivery = task["payload"]["items"][0]["items"][0]
        payload = delivery["properties"]["event"]["properties"]["payload"]
        payload_schema = schemas[payload["$ref"].rpartition("/")[2]]
        if name == "user":
            assert payload_schema["required"] == ["email"]
            assert payload_schema["properties"]["email"]["const"] == "•••"
        else:
            assert payload_schema == schemas[name]
        assert messages[name]["payload"] == {"$ref": f"#/components/schemas/{name}"}
    assert schemas["user.masked"]["required"] == ["reason"]
    assert schemas["tree.line"]["required"] == ["c"]
    line = schemas["tree"]["properties"]["lines"]["items"]["$ref"].rpartition("/")[2]
    assert schemas[line]["properties"] == {"sku": {"type": "string"}}
    assert dangling_refs(document) == []
    assert parser_errors(document) == []


# The command runs every system check, as manage.py does: on Django 6.1 they are handed every
# database alias, and JSONField's check asks the database whether it supports JSON.
@pytest.mark.django_db(databases="__all__")
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
    messages = document["components"]["messages"]
    assert messages["o.v3"]["x-django-events"]["version"] == 3
    assert messages["o.v3"]["title"] == "o.v3 v3"
    assert messages["o.v1"]["x-django-events"]["version"] == 1


# A project's own routing: a topic exchange for billing, no queue created on demand.
ROUTED = Celery("asyncapi-routes", set_as_current=False)
ROUTED.conf.update(
    broker_url="amqp://guest:guest@127.0.0.1:5672/shop",
    task_create_missing_queues=False,
    task_queues=[
        Queue("billing", Exchange("billing-topic", type="topic"), routing_key="billing.#")
    ],
)
ROUTED_SUBSCRIPTIONS = [
    {"name": f"to-{q}", "event": "orders.placed", "handler": "tests.app.handlers.record"}
    | {"mode": "async", "queue": q}
    for q in ("billing", "audit")
]


def test_the_celery_apps_own_routes_and_no_inbound_endpoint() -> None:
    with (
        wiring(*ROUTED_SUBSCRIPTIONS, CELERY_APP="tests.test_asyncapi.ROUTED"),
        override_settings(ROOT_URLCONF="tests.app.urls_without_events"),
    ):
        document = json.loads(asyncapi("--description", "The shop's events."))

    assert schema_errors(document) == []
    assert document["info"]["description"] == "The shop's events."
    assert list(document["servers"]) == ["broker"]  # django_events.urls is not included
    assert document["servers"]["broker"]["pathname"] == "/shop"
    billing = document["channels"]["queue.billing"]
    assert billing["address"] == "billing.#"
    assert billing["bindings"]["amqp"]["exchange"] == {
        "name": "billing-topic",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "shop",
    }
    audit = document["channels"]["queue.audit"]  # not declared: Celery's default exchange
    assert audit["address"] == "audit"
    assert audit["bindings"]["amqp"]["exchange"] == {"type": "default", "vhost": "shop"}


def test_a_celery_app_that_does_not_import_leaves_the_broker_out() -> None:
    """events_check reports CELERY_APP; the document still describes the queues."""
    with wiring(*ROUTED_SUBSCRIPTIONS, CELERY_APP="tests.app.nope.app"):
        document = json.loads(asyncapi())

    assert schema_errors(document) == []
    assert "servers" not in document
    assert {k: c["address"] for k, c in document["channels"].items()} == {
        "queue.audit": "audit",
        "queue.billing": "billing",
    }
    assert all("bindings" not in c for c in document["channels"].values())


def every_feature_document(app: str = "tests.brokers.amqp") -> dict[str, Any]:
    with wiring(MANIFESTS=[ALL], CELERY_APP=app):
        return json.loads(asyncapi("--http-host", "shop.example.com"))


@pytest.mark.usefixtures("typed_events")
@pytest.mark.parametrize("app", ["tests.brokers.amqp", "tests.brokers.redis"])
def test_a_manifest_using_every_feature_passes_the_official_parser(app: str) -> None:
    document = every_feature_document(app)

    assert parser_errors(document) == []
    assert schema_errors(document) == []
    assert dangling_refs(document) == []


def test_every_feature_on_the_wire() -> None:
    document = every_feature_document()
    channels, operations = document["channels"], document["operations"]

    assert set(channels) == {
        "queue.audit",
        "queue.audit.consume",
        "queue.billing",
        "queue.billing.consume",
        "broadcast.caches",
        "broadcast.caches.consume",
        "in_process.shop.order_placed",
        "http.hooks.adjusted",
        "http.hooks.paid",
        "http.hooks.synced",
    }
    assert document["servers"]["http"] == {
        "host": "shop.example.com",
        "pathname": "/events",
        "protocol": "https",
        "title": "Inbound events",
        "description": "`django_events.urls`: POST an event's JSON payload.",
    }
    # Broadcasts: a fanout exchange; each worker consumes through a queue of its own.
    fanout = channels["broadcast.caches"]
    assert fanout["address"] == "caches.broadcast"
    assert fanout["bindings"]["amqp"]["exchange"]["type"] == "fanout"
    assert channels["broadcast.caches.consume"]["address"] is None
    assert channels["broadcast.caches.consume"]["bindings"]["amqp"]["queue"]["autoDelete"]
    # send: one operation per (event, queue); transient events are not persistent messages.
    sends = {k: op for k, op in operations.items() if op["action"] == "send"}
    assert set(sends) == {
        "send.hooks.adjusted.audit",
        "send.hooks.paid.audit",
        "send.hooks.synced.audit",
        "send.shop.cart_viewed.audit",
        "send.shop.order_placed.audit",
        "send.hooks.paid.billing",
        "send.shop.order_placed.billing",
        "send.shop.cart_viewed.caches",
        "send.shop.order_placed.caches",
    }
    assert sends["send.shop.order_placed.billing"]["x-django-events"]["subscriptions"] == [
        "big-orders",
        "invoice",
    ]
    assert sends["send.shop.cart_viewed.audit"]["bindings"]["amqp"]["deliveryMode"] == 1
    assert sends["send.shop.order_placed.audit"]["bindings"]["amqp"]["deliveryMode"] == 2
    # In-process subscriptions: no address, no bindings.
    for name in ("stock-reserve", "mail-confirm"):
        assert operations[name]["channel"] == {"$ref": "#/channels/in_process.shop.order_placed"}
        assert "bindings" not in operations[name]
    # Inbound: what the caller must send, per auth.
    messages = document["components"]["messages"]
    assert messages["hooks.paid.http"]["headers"]["required"] == [
        "Content-Type",
        "X-Events-Timestamp",
        "X-Events-Signature",
    ]
    assert "Authorization" in messages["hooks.synced.http"]["headers"]["required"]
    # An inbound event's view reads the Idempotency-Key header first, whatever else it has
    # (hooks.paid's `idempotency_key: payment_id` is the fallback when the header is absent).
    for name in ("hooks.paid.http", "hooks.synced.http"):
        assert "Idempotency-Key" in messages[name]["headers"]["properties"]
    assert operations["inbound.hooks.paid"]["x-django-events"] == {
        "event": "hooks.paid",
        "auth": "hmac",
        "source": "payments",
        "idempotency_key": "payment_id",
    }
    assert "TEST_HOOK" not in json.dumps(document)
    # Redacted fields travel sealed (delivery/sealing.py): the task message says so.
    [args, _, _] = messages["shop.order_placed.task"]["payload"]["items"]
    event = args["items"][0]["properties"]["event"]["properties"]
    assert event["payload"] == {"$ref": "#/components/schemas/shop.order_placed.masked"}
    masked = document["components"]["schemas"]["shop.order_placed.masked"]
    assert masked["properties"]["email"]["const"] == "•••"
    assert masked["properties"]["total"] == {"type": "number", "minimum": 0}
    assert event["sealed"]["contentEncoding"] == "base64"
    placed = messages["shop.order_placed"]["x-django-events"]
    assert placed == {"durable": True, "redact": ["email"], "version": 1}
    assert messages["shop.cart_viewed"]["x-django-events"]["record"] == "failures"


def test_webhooks_travel_the_broker_and_tasks_do_not() -> None:
    hook = {
        "name": "partner-hook",
        "event": "orders.placed",
        "mode": "webhook",
        "url": "https://partner.example.com/in?token=t0k3n",
        "secret": "WH_SECRET",
        "queue": "hooks",
    }
    ledger = {
        "name": "ledger",
        "event": "orders.placed",
        "handler": "tests.app.handlers.record",
        "mode": "async",
        "via": "tasks",
    }
    with (
        wiring(hook, ledger, CELERY_APP="tests.brokers.amqp"),
        override_settings(WH_SECRET="whsec_c2VjcmV0"),
    ):
        document = json.loads(asyncapi())
    assert parser_errors(document) == []
    assert schema_errors(document) == []
    assert dangling_refs(document) == []
    channels, operations = document["channels"], document["operations"]

    assert set(channels) == {"queue.hooks", "queue.hooks.consume", "tasks.orders.placed"}
    # The webhook's message is a Celery task message on its queue: sent, then received
    # (late acknowledgement) by the worker that POSTs it.
    assert operations["send.orders.placed.hooks"]["channel"] == {"$ref": "#/channels/queue.hooks"}
    received = operations["partner-hook"]
    assert received["channel"] == {"$ref": "#/channels/queue.hooks.consume"}
    assert received["bindings"]["amqp"]["ack"] is True
    assert "Celery worker, queue 'hooks'" in received["summary"]
    assert "partner.example.com" not in json.dumps(document)  # a URL may carry a token
    # via: tasks: no broker carries it, no send to a queue.
    assert channels["tasks.orders.placed"]["address"] is None
    assert "servers" not in channels["tasks.orders.placed"]
    assert operations["ledger"]["channel"] == {"$ref": "#/channels/tasks.orders.placed"}
    assert {"name": "via:tasks"} in operations["ledger"]["tags"]
    assert [k for k, op in operations.items() if op["action"] == "send"] == [
        "send.orders.placed.hooks"
    ]


def test_providers_webhooks_are_http_channels_of_their_source() -> None:
    sources = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "sources.yaml")]
    secrets = {
        "TEST_GITHUB_SECRET": "gh-secret-4711",
        "TEST_STRIPE_SECRET": "whsec_stripe_4712",
        "TEST_PARTNER_SECRET": "whsec_c2VjcmV0NDcxMw==",
        "TEST_SIGNED_SECRET": "signed-secret-4714",
        "TEST_TOKEN_SECRET": "tok_4715",
    }
    with wiring(MANIFESTS=sources), override_settings(**secrets):
        document = json.loads(asyncapi("--http-host", "shop.example.com"))
    assert parser_errors(document) == []
    assert schema_errors(document) == []
    assert dangling_refs(document) == []
    channels, operations = document["channels"], document["operations"]
    messages = document["components"]["messages"]

    addresses = {k: c["address"] for k, c in channels.items() if k.startswith("http.sources.")}
    assert addresses == {
        f"http.sources.{n}": f"/sources/{n}/"
        for n in ("github", "partner", "signed", "stripe", "tokened")
    }
    assert channels["http.sources.github"]["servers"] == [{"$ref": "#/servers/http"}]
    assert document["servers"]["http"]["host"] == "shop.example.com"
    # One message per type the source maps: GitHub names it in a header, signs the body.
    push = messages["github.push.source.github"]["headers"]
    assert push["properties"]["X-GitHub-Event"] == {"type": "string", "const": "push"}
    assert {"X-GitHub-Event", "X-Hub-Signature-256"} <= set(push["required"])
    assert messages["github.push.source.github"]["payload"] == {
        "$ref": "#/components/schemas/github.push"
    }
    # Standard Webhooks with `payload: data`: the event is the body's `data`, its type `type`.
    order = messages["partner.order_created.source.partner"]
    assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(
        order["headers"]["required"]
    )
    data, kind = order["payload"]["allOf"]
    assert data["properties"]["data"] == {"$ref": "#/components/schemas/partner.order_created"}
    assert kind["properties"]["type"] == {"type": "string", "const": "order.created"}
    # The header a retried call is made safe with: only the delivery id's own place. Stripe's
    # is the body's `id`, Standard Webhooks' `webhook-id`, GitHub's `X-GitHub-Delivery`;
    # `tokened` declares a body field; `signed` (hmac) keeps the default Idempotency-Key.
    idempotency = {
        source: {h for h in messages[key]["headers"]["properties"] if h in IDEMPOTENCY_HEADERS}
        for key in messages
        if ".source." in key
        for source in [key.rpartition(".source.")[2]]
    }
    assert idempotency == {
        "github": {"X-GitHub-Delivery"},
        "stripe": set(),
        "partner": {"webhook-id"},
        "signed": {"Idempotency-Key"},
        "tokened": set(),
    }
    received = operations["source.github"]
    assert received["action"] == "receive"
    assert received["bindings"]["http"]["method"] == "POST"
    assert received["x-django-events"]["events"] == {
        "push": "github.push",
        "issues": "github.issues",
    }
    assert not any(v in json.dumps(document) for v in secrets.values())


IDEMPOTENCY_HEADERS = {"Idempotency-Key", "X-GitHub-Delivery", "webhook-id"}


def test_redis_queues_are_lists_and_broadcasts_pub_sub_channels() -> None:
    document = every_feature_document("tests.brokers.redis")
    channels = document["channels"]
    # The Redis database of the URL the tests use (DJANGO_EVENTS_REDIS_URL; kombu's 0 without).
    db = urlsplit(REDIS_URL).path.strip("/")

    assert document["servers"]["broker"]["protocol"] == "redis"
    assert document["servers"]["broker"].get("pathname") == (f"/{db}" if db else None)
    assert "queue.billing.consume" not in channels  # one address: the list
    assert channels["queue.billing"]["address"] == "billing"
    assert channels["queue.billing"]["bindings"] == {"redis": {"bindingVersion": "0.1.0"}}
    fanout = f"/{db or 0}.caches.broadcast/caches.broadcast"
    assert channels["broadcast.caches"]["address"] == fanout
    invoice = document["operations"]["invoice"]
    assert invoice["channel"] == {"$ref": "#/channels/queue.billing"}


def test_the_official_parser_reports_a_broken_document() -> None:
    document = every_feature_document()
    document["operations"]["invoice"]["channel"] = {"$ref": "#/channels/nowhere"}
    document["operations"]["invoice"]["action"] = "consume"

    errors = parser_errors(document)

    assert any("invoice" in e for e in errors), errors


def test_a_subscriptions_ordering_give_up_and_carrier_are_in_its_operation() -> None:
    ordered = {
        "name": "ordered",
        "event": "orders.placed",
        "handler": "tests.app.handlers.record",
        "mode": "async",
        "queue": "billing",
        "ordering_key": "order_id",
        "give_up_after": 600,
    }
    ledger = {
        "name": "ledger",
        "event": "orders.placed",
        "handler": "tests.app.handlers.record",
        "mode": "async",
        "via": "tasks",
    }
    with wiring(ordered, ledger, CELERY_APP="tests.brokers.amqp"):
        document = json.loads(asyncapi())
    assert parser_errors(document) == []
    assert schema_errors(document) == []
    operations = document["operations"]

    # A consumer reading the catalogue learns that one order's events come one at a time.
    details = operations["ordered"]["x-django-events"]
    assert (details["ordering_key"], details["give_up_after"], details["via"]) == (
        "order_id",
        600,
        "celery",
    )
    assert {"name": "ordered:order_id"} in operations["ordered"]["tags"]
    details = operations["ledger"]["x-django-events"]
    assert (details["ordering_key"], details["give_up_after"], details["via"]) == (
        None,
        None,
        "tasks",
    )
