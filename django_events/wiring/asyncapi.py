"""The wiring as an AsyncAPI 3.0 document: channels are events, operations subscriptions."""

from __future__ import annotations

import copy
import re
from dataclasses import asdict
from typing import Any

from django_events.wiring.compiled import CompiledEvent, Registry, Subscription, exchange_name

ASYNCAPI_VERSION = "3.0.0"
EXTENSION = "x-django-events"
HEADERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The event's headers (interceptors, tenants, W3C trace context).",
    "additionalProperties": {"type": "string"},
}
_NOT_AN_ID = re.compile(r"[^A-Za-z0-9_.-]")


def asyncapi_document(
    registry: Registry, *, title: str, version: str, description: str = ""
) -> dict[str, Any]:
    """Describe every event (a channel with its message and payload schema) and every
    subscription (a ``receive`` operation with its mode, queue, filter and retry policy)."""
    ids = _Ids()
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    channel_of: dict[str, str] = {}
    for name in sorted(registry.events):
        key = channel_of[name] = ids.new(name)
        compiled = registry.events[name]
        schemas[key] = _payload_schema(compiled, key, schemas)
        messages[key] = _message(compiled, key)
        channels[key] = _channel(compiled, key)
    operations: dict[str, Any] = {}
    for subscription in sorted(registry.subscriptions.values(), key=lambda s: s.name):
        targets = [n for n in sorted(registry.events) if subscription in _subscribers(registry, n)]
        for event_name in targets:
            label = subscription.name if len(targets) == 1 else f"{subscription.name}.{event_name}"
            operations[ids.new(label)] = _operation(subscription, channel_of[event_name])
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


class _Ids:
    """Unique AsyncAPI identifiers (``[A-Za-z0-9_.-]+``) derived from names."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def new(self, name: str) -> str:
        base = _NOT_AN_ID.sub("_", name) or "_"
        key, n = base, 1
        while key in self.used:
            n += 1
            key = f"{base}_{n}"
        self.used.add(key)
        return key


def _subscribers(registry: Registry, event_name: str) -> tuple[Subscription, ...]:
    compiled = registry.events[event_name]
    return compiled.inline + compiled.sync + compiled.async_ + compiled.tasks


def _channel(compiled: CompiledEvent, key: str) -> dict[str, Any]:
    declaration = compiled.declaration
    channel: dict[str, Any] = {
        "address": compiled.name,
        "title": compiled.name,
        "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        EXTENSION: {
            "durable": declaration.durable,
            "redact": list(declaration.redact),
            "version": declaration.version,
        },
    }
    if declaration.record:
        channel[EXTENSION]["record"] = declaration.record
    if declaration.description:
        channel["description"] = declaration.description
    return channel


def _message(compiled: CompiledEvent, key: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": compiled.name,
        "title": compiled.name,
        "contentType": "application/json",
        "headers": HEADERS_SCHEMA,
        "payload": {"$ref": f"#/components/schemas/{key}"},
        # The payload contract's version (docs/evolving.md): messages carry it too.
        EXTENSION: {"version": compiled.declaration.version},
    }
    if compiled.declaration.description:
        message["summary"] = compiled.declaration.description
    return message


def _payload_schema(compiled: CompiledEvent, key: str, schemas: dict[str, Any]) -> Any:
    """The payload schema, its local ``$ref``s pointed at ``components/schemas``.

    ``$defs`` (pydantic models, nested dataclasses) become schemas of their own, named
    ``<event>.<def>``, since a ``#/...`` reference is read from the document's root.
    """
    schema = copy.deepcopy(compiled.validator.schema)
    if not isinstance(schema, dict):
        return schema
    schema.pop("$schema", None)
    schema.pop("$id", None)
    for keyword in ("$defs", "definitions"):
        for name, sub in (schema.pop(keyword, None) or {}).items():
            schemas[f"{key}.{name}"] = _rebase(sub, key)
    return _rebase(schema, key)


def _rebase(node: Any, key: str) -> Any:
    if isinstance(node, list):
        return [_rebase(item, key) for item in node]
    if not isinstance(node, dict):
        return node
    result = {k: _rebase(v, key) for k, v in node.items()}
    ref = result.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        for keyword in ("$defs", "definitions"):
            prefix = f"#/{keyword}/"
            if ref.startswith(prefix):
                name, _, rest = ref[len(prefix) :].partition("/")
                result["$ref"] = f"#/components/schemas/{key}.{name}" + (f"/{rest}" if rest else "")
                break
        else:
            result["$ref"] = f"#/components/schemas/{key}{ref[1:]}"
    return result


def _operation(subscription: Subscription, channel: str) -> dict[str, Any]:
    declaration = subscription.declaration
    details: dict[str, Any] = {
        "subscription": subscription.name,
        "event": declaration.event,
        "handler": declaration.handler,
        "mode": subscription.mode,
        "idempotent": declaration.idempotent,
        "when": declaration.when,
    }
    where = {"inline": "in the publisher's transaction", "sync": "in-process after commit"}.get(
        subscription.mode, f"on a Celery worker, queue {subscription.queue!r}"
    )
    tags = [{"name": subscription.mode}]
    if subscription.mode == "async":
        details.update(
            queue=subscription.queue,
            retry=asdict(subscription.retry),
            broadcast=declaration.broadcast,
            timeout=declaration.timeout,
        )
        tags.append({"name": f"queue:{subscription.queue}"})
        if declaration.broadcast:
            # Every worker consuming the queue gets a copy, through this fanout exchange.
            details["exchange"] = exchange_name(subscription.queue)
            tags.append({"name": "broadcast"})
    return {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{channel}"}],
        "title": subscription.name,
        "summary": f"{declaration.handler} runs {where}.",
        "tags": tags,
        EXTENSION: details,
    }
