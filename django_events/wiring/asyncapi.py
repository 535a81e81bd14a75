"""The wiring as an AsyncAPI 3.0 document, described as it is on the wire.

Servers: the Celery broker (no credentials) and, for inbound events, the HTTP endpoint.
Channels: the queues (and fanout exchanges) that async and webhook deliveries travel
through, with their AMQP or Redis bindings; each inbound event's URL; an address-less
channel per event that has in-process (inline, sync) subscriptions, and one per event that
has ``via: tasks`` subscriptions (Django's Tasks framework: no broker). Messages: the Celery
task message of each event (protocol 2: headers, and the body ``[args, kwargs, embed]``
whose one argument holds the event with its payload schema), the event as an inbound HTTP
body, the event itself.
Operations: ``send`` for each event the app publishes to a queue, ``receive`` for each
subscription and inbound endpoint.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from django_events.wiring.compiled import CompiledEvent, Registry, Subscription, exchange_name
from django_events.wiring.declarations import SourceDeclaration
from django_events.wiring.redaction import MASK

ASYNCAPI_VERSION = "3.0.0"
EXTENSION = "x-django-events"
TASK_NAME = "django_events.deliver"
AMQP_BINDING = "0.3.0"
HTTP_BINDING = "0.3.0"
REDIS_BINDING = "0.1.0"
HEADERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The event's headers (interceptors, tenants, W3C trace context).",
    "additionalProperties": {"type": "string"},
}
_NOT_AN_ID = re.compile(r"[^A-Za-z0-9_.-]")
_NULLABLE_STRING = {"type": ["string", "null"]}
# Celery's task message headers (message protocol 2), as `app.amqp.as_task_v2` writes them.
TASK_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "Celery task message headers (message protocol 2).",
    "required": ["lang", "task", "id", "root_id", "retries", "argsrepr", "kwargsrepr"],
    "properties": {
        "lang": {"const": "py"},
        "task": {"const": TASK_NAME},
        "id": {"type": "string", "description": "The Celery task id (a new one per message)."},
        "root_id": {"type": "string"},
        "parent_id": _NULLABLE_STRING,
        "group": _NULLABLE_STRING,
        "group_index": {"type": ["integer", "null"]},
        "shadow": _NULLABLE_STRING,
        "eta": {
            "type": ["string", "null"],
            "description": "ISO 8601 time before which a retry is not run.",
        },
        "expires": _NULLABLE_STRING,
        "retries": {"type": "integer", "minimum": 0, "description": "Celery's retry count."},
        "timelimit": {
            "type": "array",
            "description": "[hard, soft] time limits in seconds (the subscription's timeout).",
            "items": {"type": ["number", "null"]},
        },
        "argsrepr": {
            "type": "string",
            "description": "What monitors show: (subscription, event id), never the payload.",
        },
        "kwargsrepr": {"const": "{}"},
        "origin": {"type": "string", "description": "<process>@<host> that sent the message."},
        "ignore_result": {
            "type": ["boolean", "null"],
            "description": "true: a delivery keeps no Celery result (false or null, by "
            "Celery version, from releases that left it to the task).",
        },
        "replaced_task_nesting": {"type": "integer"},
        "stamped_headers": {"type": ["array", "null"]},
        "stamps": {"type": "object"},
    },
}


@dataclass(frozen=True)
class Route:
    """Where messages for one queue go on the broker (Celery's routing of ``send_task``)."""

    exchange: str
    exchange_type: str
    routing_key: str
    durable: bool = True
    auto_delete: bool = False


@dataclass(frozen=True)
class Broker:
    """The broker the Celery app sends to, without credentials.

    ``protocol`` is kombu's transport (``amqp``, ``redis``, ``filesystem``, ...), ``host``
    ``host[:port]`` (empty for transports without one), ``pathname`` the AMQP virtual host or
    the Redis database; ``routes`` maps each queue to its exchange and routing key.
    """

    protocol: str
    host: str
    pathname: str = ""
    routes: Mapping[str, Route] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpServer:
    """Where ``django_events.urls`` answers: ``https://<host><pathname><event name>/``."""

    host: str
    pathname: str
    protocol: str = "https"


def asyncapi_document(
    registry: Registry,
    *,
    title: str,
    version: str,
    description: str = "",
    broker: Broker | None = None,
    http: HttpServer | None = None,
) -> dict[str, Any]:
    """Describe the wiring as it is on the wire (see the module's docstring).

    Without ``broker``, queues get no server and no bindings; without ``http``, inbound
    events are left out (their URLs are not routed).
    """
    return _Builder(registry, broker, http).build(title, version, description)


class _Builder:
    def __init__(self, registry: Registry, broker: Broker | None, http: HttpServer | None):
        self.registry, self.broker, self.http = registry, broker, http
        self.ids = _Ids()
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self.schemas: dict[str, Any] = {}
        self.event_key: dict[str, str] = {}
        self.task_key: dict[str, str] = {}  # event name -> its Celery task message's key
        self.amqp = broker is not None and broker.protocol in ("amqp", "amqps", "pyamqp")
        self.redis = broker is not None and broker.protocol in ("redis", "rediss")

    def build(self, title: str, version: str, description: str) -> dict[str, Any]:
        events = self.registry.events
        # Every event's key first: a key made from another's (its task message, its $defs)
        # then never takes an event's own name ("x.task" the event, not x's task message).
        for name in sorted(events):
            self.event_key[name] = self.ids.new(name)
        for name in sorted(events):
            key = self.event_key[name]
            self.schemas[key] = _payload_schema(events[name], key, self.schemas, self.ids)
            self.messages[key] = _message(events[name], key)
        subscriptions = sorted(self.registry.subscriptions.values(), key=lambda s: s.name)
        targets = {
            s.name: [n for n in sorted(events) if s in _subscribers(self.registry, n)]
            for s in subscriptions
        }
        self._queues(subscriptions, targets)
        self._in_process(subscriptions, targets)
        inbound = [n for n in sorted(events) if events[n].declaration.inbound]
        sources = [self.registry.inbound_sources[n] for n in sorted(self.registry.inbound_sources)]
        if self.http is not None:
            for name in inbound:
                self._inbound(events[name])
            for source in sources:
                self._source(source)
        info: dict[str, Any] = {"title": title, "version": version}
        if description:
            info["description"] = description
        document: dict[str, Any] = {"asyncapi": ASYNCAPI_VERSION, "info": info}
        servers = self._servers(bool(inbound or sources))
        if servers:
            document["servers"] = servers
        document.update(
            defaultContentType="application/json",
            channels=self.channels,
            operations=self.operations,
            components={"messages": self.messages, "schemas": self.schemas},
        )
        return document

    def _servers(self, inbound: bool) -> dict[str, Any]:
        servers: dict[str, Any] = {}
        if self.broker is not None:
            server: dict[str, Any] = {
                "host": self.broker.host or "localhost",
                "protocol": self.broker.protocol,
                "title": "Celery broker",
                "description": "The broker of the Celery app (`CELERY_APP`).",
            }
            if self.broker.pathname:
                server["pathname"] = self.broker.pathname
            if self.amqp:
                server["protocolVersion"] = "0.9.1"
            servers["broker"] = server
        if self.http is not None and inbound:
            servers["http"] = {
                "host": self.http.host,
                "pathname": self.http.pathname.rstrip("/") or "/",
                "protocol": self.http.protocol,
                "title": "Inbound events",
                "description": "`django_events.urls`: POST an event's JSON payload.",
            }
        return servers

    # Queues: one message per (event, async subscription), to the subscription's queue.

    def _queues(self, subscriptions: list[Subscription], targets: dict[str, list[str]]) -> None:
        by_queue: dict[tuple[str, bool], list[Subscription]] = {}
        for subscription in subscriptions:
            if _on_broker(subscription) and targets[subscription.name]:
                key = (subscription.queue, subscription.declaration.broadcast)
                by_queue.setdefault(key, []).append(subscription)
        for (queue, broadcast), subscribed in sorted(by_queue.items()):
            names = sorted({n for s in subscribed for n in targets[s.name]})
            send, consume = self._queue_channels(queue, broadcast, names)
            for name in names:
                on_it = [s for s in subscribed if name in targets[s.name]]
                self._send(name, queue, send, on_it, broadcast)
            for subscription in subscribed:
                self._receive(subscription, targets[subscription.name], consume)

    def _queue_channels(self, queue: str, broadcast: bool, names: list[str]) -> tuple[str, str]:
        """The channel messages are sent to and the one they are consumed from (AMQP tells
        an exchange and routing key from a queue; other transports have one address)."""
        messages = {
            self.event_key[n]: {"$ref": f"#/components/messages/{self._task_message(n)}"}
            for n in names
        }
        route = self._route(queue, broadcast)
        what = f"broadcasts of queue {queue!r}" if broadcast else f"queue {queue!r}"
        send: dict[str, Any] = {
            "address": route.routing_key,
            "title": what,
            "messages": messages,
        }
        if self.broker is not None:
            send["servers"] = [{"$ref": "#/servers/broker"}]
        if self.redis and broadcast:
            # kombu's Redis fanout: PUBLISH on "/<db>.<exchange>/<routing key>" (its defaults
            # fanout_prefix and fanout_patterns), one subscriber per worker.
            db = (self.broker.pathname if self.broker else "").strip("/") or "0"
            send["address"] = f"/{db}.{route.exchange}/{route.routing_key}"
            send["description"] = "A Redis pub/sub channel: every worker gets each message."
        elif self.redis:
            send["description"] = "A Redis list (kombu LPUSHes, workers BRPOP)."
        send_id = self.ids.new(f"{'broadcast' if broadcast else 'queue'}.{queue}")
        self.channels[send_id] = send
        if self.amqp:
            send["bindings"] = {
                "amqp": {
                    "is": "routingKey",
                    "exchange": _exchange(route, self._vhost()),
                    "bindingVersion": AMQP_BINDING,
                }
            }
        elif self.redis:
            send["bindings"] = {"redis": {"bindingVersion": REDIS_BINDING}}
        if not self.amqp:
            return send_id, send_id
        consume: dict[str, Any] = {
            "title": f"{what}: consumed",
            "messages": messages,
            "servers": [{"$ref": "#/servers/broker"}],
        }
        queue_binding: dict[str, Any] = {"vhost": self._vhost()}
        if broadcast:
            # Each worker binds an auto-delete queue of its own (kombu Broadcast, unique).
            consume["address"] = None
            consume["description"] = (
                f"One auto-delete queue per worker, `{route.exchange}.<worker>.<uuid>`, "
                f"bound to the fanout exchange {route.exchange!r}."
            )
            queue_binding.update(durable=False, exclusive=False, autoDelete=True)
        else:
            consume["address"] = queue
            queue_binding.update(
                name=queue, durable=route.durable, exclusive=False, autoDelete=route.auto_delete
            )
        consume["bindings"] = {
            "amqp": {"is": "queue", "queue": queue_binding, "bindingVersion": AMQP_BINDING}
        }
        consume_id = self.ids.new(f"{send_id}.consume")
        self.channels[consume_id] = consume
        return send_id, consume_id

    def _route(self, queue: str, broadcast: bool) -> Route:
        if broadcast:
            name = exchange_name(queue)
            return Route(name, "fanout", name, durable=True, auto_delete=False)
        if self.broker is not None and queue in self.broker.routes:
            return self.broker.routes[queue]
        return Route("", "default", queue)  # how Celery sends to a queue it creates on demand

    def _vhost(self) -> str:
        path = self.broker.pathname if self.broker else ""
        return path[1:] if path.startswith("/") and len(path) > 1 else "/"

    def _send(
        self,
        name: str,
        queue: str,
        channel: str,
        subscriptions: list[Subscription],
        broadcast: bool,
    ) -> None:
        compiled = self.registry.events[name]
        key = self.event_key[name]
        operation: dict[str, Any] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{key}"}],
            "title": f"publish {name}",
            "summary": (
                f"publish() sends one message per subscription: "
                f"{', '.join(s.name for s in subscriptions)}."
            ),
            EXTENSION: {
                "event": name,
                "queue": queue,
                "subscriptions": [s.name for s in subscriptions],
                "broadcast": broadcast,
            },
        }
        if self.amqp:
            operation["bindings"] = {
                "amqp": {
                    "deliveryMode": 2 if compiled.declaration.durable else 1,
                    "bindingVersion": AMQP_BINDING,
                }
            }
        self.operations[self.ids.new(f"send.{name}.{queue}")] = operation

    def _receive(self, subscription: Subscription, names: list[str], channel: str) -> None:
        for name in names:
            label = subscription.name if len(names) == 1 else f"{subscription.name}.{name}"
            operation = _operation(subscription, channel, self.event_key[name])
            if self.amqp:
                # Late acknowledgement: at least once (a killed worker's message comes back).
                operation["bindings"] = {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}}
            self.operations[self.ids.new(label)] = operation

    # Subscriptions no broker carries: in-process (inline, sync) and Django's Tasks
    # (``via: tasks``), one address-less channel per event and kind.

    def _in_process(self, subscriptions: list[Subscription], targets: dict[str, list[str]]) -> None:
        channel_of: dict[tuple[str, str], str] = {}
        for subscription in subscriptions:
            if _on_broker(subscription):
                continue
            kind = "tasks" if subscription.is_queued else "in_process"
            for name in targets[subscription.name]:
                if (kind, name) not in channel_of:
                    key = self.event_key[name]
                    channel_of[kind, name] = self.ids.new(f"{kind}.{name}")
                    self.channels[channel_of[kind, name]] = {
                        "address": None,
                        "messages": {key: {"$ref": f"#/components/messages/{key}"}},
                        "title": f"{name} {_UNBROKERED[kind][0]}",
                        "description": _UNBROKERED[kind][1],
                    }
            for name in targets[subscription.name]:
                label = (
                    subscription.name
                    if len(targets[subscription.name]) == 1
                    else f"{subscription.name}.{name}"
                )
                channel = channel_of[kind, name]
                operation = _operation(subscription, channel, self.event_key[name])
                self.operations[self.ids.new(label)] = operation

    # Inbound HTTP: POST <prefix><event name>/ with the payload as JSON body.

    def _inbound(self, compiled: CompiledEvent) -> None:
        key = self.event_key[compiled.name]
        block = compiled.declaration.inbound or {}
        headers = _inbound_headers(block)
        message_key = self.ids.new(f"{key}.http")
        self.messages[message_key] = {
            "name": compiled.name,
            "title": f"{compiled.name} (inbound HTTP)",
            "contentType": "application/json",
            "headers": headers,
            "payload": {"$ref": f"#/components/schemas/{key}"},
            "bindings": {"http": {"headers": headers, "bindingVersion": HTTP_BINDING}},
        }
        channel = self.ids.new(f"http.{compiled.name}")
        self.channels[channel] = {
            "address": f"/{compiled.name}/",
            "title": f"POST {compiled.name}",
            "servers": [{"$ref": "#/servers/http"}],
            "messages": {key: {"$ref": f"#/components/messages/{message_key}"}},
        }
        details = {"event": compiled.name, **{k: v for k, v in block.items() if k != "secret"}}
        self.operations[self.ids.new(f"inbound.{compiled.name}")] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{key}"}],
            "title": f"POST {compiled.name}",
            "summary": 'Publishes the event; answers 202 {"id": <event id>}.',
            "bindings": {"http": {"method": "POST", "bindingVersion": HTTP_BINDING}},
            EXTENSION: details,
        }

    # Providers' webhooks: POST <prefix>sources/<source>/, the call's type names the event.

    def _source(self, source: SourceDeclaration) -> None:
        channel = self.ids.new(f"http.sources.{source.name}")
        messages: dict[str, Any] = {}
        for kind, name in sorted(source.events.items()):
            if name not in self.event_key:
                continue  # an undeclared event: a check error, the document is not printed
            message_key = self.ids.new(f"{self.event_key[name]}.source.{source.name}")
            headers = _source_headers(source, kind)
            self.messages[message_key] = {
                "name": name,
                "title": f"{name} ({source.name}'s {kind!r} call)",
                "contentType": "application/json",
                "headers": headers,
                "payload": _source_body(source, kind, self.event_key[name]),
                "bindings": {"http": {"headers": headers, "bindingVersion": HTTP_BINDING}},
            }
            messages[message_key] = {"$ref": f"#/components/messages/{message_key}"}
        self.channels[channel] = {
            "address": f"/sources/{source.name}/",
            "title": f"POST sources/{source.name}",
            "servers": [{"$ref": "#/servers/http"}],
            "messages": messages,
        }
        details = {
            "source": source.name,
            "auth": source.auth,
            "events": dict(source.events),
            "type": source.type_at,
            "idempotency": source.idempotency_at,
        }
        if source.payload:
            details["payload"] = source.payload
        self.operations[self.ids.new(f"source.{source.name}")] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
            "title": f"POST sources/{source.name}",
            "summary": (
                "Verifies the provider's signature and publishes the event its type names; "
                'answers 202 {"id": <event id>}, or {"ignored": <type>} for a type not listed.'
            ),
            "bindings": {"http": {"method": "POST", "bindingVersion": HTTP_BINDING}},
            EXTENSION: details,
        }

    def _task_message(self, name: str) -> str:
        """The key of event ``name``'s Celery task message, made on first use."""
        if name in self.task_key:
            return self.task_key[name]
        compiled = self.registry.events[name]
        key = self.event_key[name]
        payload = key
        if compiled.declaration.redact:
            payload = self.ids.new(f"{key}.masked")
            self.schemas[payload] = _masked(self.schemas[key], compiled.declaration.redact)
        message: dict[str, Any] = {
            "name": TASK_NAME,
            "title": f"{compiled.name} (Celery task message)",
            "summary": "One message per (event, subscription): the task names the subscription.",
            "contentType": "application/json",
            "headers": TASK_HEADERS,
            "payload": _task_body(payload, sealed=bool(compiled.declaration.redact)),
            "correlationId": {
                "description": "The Celery task id (AMQP correlation_id).",
                "location": "$message.header#/id",
            },
        }
        version = getattr(compiled.declaration, "version", None)
        if version is not None:
            message[EXTENSION] = {"version": version}
        if self.amqp:
            message["bindings"] = {
                "amqp": {
                    "contentEncoding": "utf-8",
                    "messageType": TASK_NAME,
                    "bindingVersion": AMQP_BINDING,
                }
            }
        elif self.redis:
            message["description"] = (
                "kombu's Redis transport stores it as a JSON envelope "
                '{"body": <base64 of this payload>, "headers": <these headers>, '
                '"properties": {...}, "content-type": "application/json", '
                '"content-encoding": "utf-8"}.'
            )
        task_key = self.task_key[name] = self.ids.new(f"{key}.task")
        self.messages[task_key] = message
        return task_key


def _masked(schema: Any, paths: tuple[str, ...]) -> Any:
    """``schema`` with the value at each redacted path the mask (lists walked item by item);
    a path it cannot follow (``$ref``, combinators) leaves that part of the schema open."""
    result = copy.deepcopy(schema)
    for path in paths:
        node = result
        keys = path.split(".")
        for i, name in enumerate(keys):
            while isinstance(node, dict) and isinstance(node.get("items"), dict):
                node = node["items"]
            properties = node.get("properties") if isinstance(node, dict) else None
            if not isinstance(properties, dict) or name not in properties:
                break
            if i == len(keys) - 1:
                properties[name] = {"const": MASK, "description": "Redacted: see `sealed`."}
            else:
                node = properties[name]
    description = (
        f"The payload with the values at {', '.join(paths)} replaced by {MASK!r}; "
        "the whole payload is in `sealed`."
    )
    return {**result, "description": description} if isinstance(result, dict) else result


def _exchange(route: Route, vhost: str) -> dict[str, Any]:
    if not route.exchange:  # AMQP's nameless default exchange: routes by queue name
        return {"type": "default", "vhost": vhost}
    return {
        "name": route.exchange,
        "type": route.exchange_type,
        "durable": route.durable,
        "autoDelete": False,
        "vhost": vhost,
    }


# The header an inbound event's caller, or a source that declares it, makes a retry safe with.
IDEMPOTENCY_HEADER = "Idempotency-Key"


def _inbound_headers(block: Mapping[str, Any], idempotency_header: bool = True) -> dict[str, Any]:
    """An inbound call's headers; ``idempotency_header``: the view reads ``Idempotency-Key``
    (an inbound event's always does; a source's only where its delivery id is that header)."""
    properties: dict[str, Any] = {
        "Content-Type": {"type": "string", "const": "application/json"},
    }
    if idempotency_header:
        properties[IDEMPOTENCY_HEADER] = {
            "type": "string",
            "maxLength": 200,
            "description": "Makes a retried call safe: the same key publishes once.",
        }
    required = ["Content-Type"]
    auth = block.get("auth")
    if auth == "hmac":
        properties["X-Events-Timestamp"] = {"type": "string", "description": "Unix time."}
        properties["X-Events-Signature"] = {
            "type": "string",
            "description": "HMAC-SHA256 of '<timestamp>.<body>' with the shared secret.",
        }
        required += ["X-Events-Timestamp", "X-Events-Signature"]
    elif auth == "token":
        properties["Authorization"] = {"type": "string", "pattern": "^Bearer "}
        required.append("Authorization")
    elif auth == "permission":
        properties["Cookie"] = {"type": "string", "description": "A Django session."}
    return {"type": "object", "required": required, "properties": properties}


# The headers each kind of provider signs its calls with (the package's own hmac and token
# schemes are those of inbound events).
_PROVIDER_HEADERS: dict[str, dict[str, str]] = {
    "standard-webhooks": {
        "webhook-id": "The message id.",
        "webhook-timestamp": "Unix time.",
        "webhook-signature": "v1,<base64 HMAC-SHA256 of '<id>.<timestamp>.<body>'>",
    },
    "github": {"X-Hub-Signature-256": "sha256=<hex HMAC-SHA256 of the body>"},
    "stripe": {"Stripe-Signature": "t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.<body>'>"},
}


def _source_headers(source: SourceDeclaration, kind: str) -> dict[str, Any]:
    # A source reads its delivery id where `idempotency` (or its kind's default) says, and
    # nowhere else: Stripe's is the body's `id`, Standard Webhooks' the `webhook-id` header.
    headers = _inbound_headers(
        {"auth": source.auth}, source.idempotency_at == {"header": IDEMPOTENCY_HEADER}
    )
    for header, description in _PROVIDER_HEADERS.get(source.auth, {}).items():
        headers["properties"][header] = {"type": "string", "description": description}
        headers["required"].append(header)
    idempotency = source.idempotency_at
    if "header" in idempotency and idempotency["header"] not in headers["properties"]:
        headers["properties"][idempotency["header"]] = {
            "type": "string",
            "description": "The provider's delivery id: a call repeated with it publishes once.",
        }
    if "header" in source.type_at:
        headers["properties"][source.type_at["header"]] = {"type": "string", "const": kind}
        headers["required"].append(source.type_at["header"])
    return headers


def _source_body(source: SourceDeclaration, kind: str, key: str) -> dict[str, Any]:
    """The provider's JSON body: its type at its place, the event's payload at ``payload``."""
    event: dict[str, Any] = {"$ref": f"#/components/schemas/{key}"}
    parts = [_at_path(source.payload, event) if source.payload else event]
    if "field" in source.type_at:
        parts.append(_at_path(source.type_at["field"], {"type": "string", "const": kind}))
    return parts[0] if len(parts) == 1 else {"allOf": parts}


def _at_path(path: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An object schema holding ``schema`` at the dotted ``path``."""
    for part in reversed(path.split(".")):
        schema = {"type": "object", "required": [part], "properties": {part: schema}}
    return schema


def _task_body(payload_key: str, sealed: bool) -> dict[str, Any]:
    """Celery's protocol 2 body, ``[args, kwargs, embed]``; ``args`` is the delivery, its
    payload the schema ``payload_key``; ``sealed``: redacted fields are masked there and the
    payload sealed alongside (delivery/sealing.py)."""
    payload: dict[str, Any] = {"$ref": f"#/components/schemas/{payload_key}"}
    event: dict[str, Any] = {
        "type": "object",
        "required": [
            "id",
            "name",
            "payload",
            "headers",
            "occurred_at",
            "correlation_id",
            "version",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "payload": payload,
            "headers": HEADERS_SCHEMA,
            "occurred_at": {"type": "string", "format": "date-time"},
            "correlation_id": {"type": "string", "format": "uuid"},
            "causation_id": {"type": ["string", "null"], "format": "uuid"},
            "version": {
                "type": "integer",
                "minimum": 1,
                "description": (
                    "The version of the event's contract the payload follows: the declared "
                    "one where it was published (a worker upcasts an older one)."
                ),
            },
        },
    }
    if sealed:
        event["properties"]["sealed"] = {
            "type": "string",
            "contentEncoding": "base64",
            "description": (
                "When a redacted field is present: the payload as JSON, encrypted with "
                "AES-256-GCM (12-byte nonce first; key derived from SECRET_KEY; the event id "
                "as associated data)."
            ),
        }
    delivery = {
        "type": "object",
        "required": ["v", "subscription", "event", "db", "prior_attempts"],
        "properties": {
            "v": {"type": "integer", "description": "Version of this message's format."},
            "subscription": {"type": "string", "description": "Looked up in the worker."},
            "event": event,
            "db": {"type": "string", "description": "The database alias of the event log."},
            "prior_attempts": {
                "type": "integer",
                "description": (
                    "Runs before this message's, less Celery's retries of it that ran "
                    "nothing (the database unreachable, a wait for a newer release): "
                    "below 0 then; the worker counts prior_attempts + retries."
                ),
            },
            "rerun": {"type": "boolean"},
            "uncounted": {
                "type": "integer",
                "minimum": 0,
                "description": "Of the runs so far, those not counted towards max_attempts.",
            },
        },
    }
    return {
        "type": "array",
        "description": "Celery message protocol 2 body: [args, kwargs, embed].",
        "minItems": 3,
        "maxItems": 3,
        "items": [
            {"type": "array", "minItems": 1, "maxItems": 1, "items": [delivery]},
            {"type": "object", "maxProperties": 0},
            {"type": "object", "description": "callbacks, errbacks, chain, chord (all null)."},
        ],
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


def _message(compiled: CompiledEvent, key: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": compiled.name,
        "title": compiled.name,
        "contentType": "application/json",
        "headers": HEADERS_SCHEMA,
        "payload": {"$ref": f"#/components/schemas/{key}"},
    }
    if compiled.declaration.description:
        message["summary"] = compiled.declaration.description
    # The payload contract's version (docs/evolving.md): records and messages carry it too.
    extension: dict[str, Any] = {
        "durable": compiled.declaration.durable,
        "redact": list(compiled.declaration.redact),
        "version": compiled.declaration.version,
    }
    if compiled.declaration.record:
        extension["record"] = compiled.declaration.record
    message["title"] = f"{compiled.name} v{compiled.declaration.version}"
    message[EXTENSION] = extension
    return message


def _payload_schema(compiled: CompiledEvent, key: str, schemas: dict[str, Any], ids: _Ids) -> Any:
    """The payload schema, its local ``$ref``s pointed at ``components/schemas``.

    ``$defs`` (pydantic models, nested dataclasses) become schemas of their own, named
    ``<event>.<def>``, since a ``#/...`` reference is read from the document's root.
    """
    schema = copy.deepcopy(compiled.validator.schema)
    if not isinstance(schema, dict):
        return schema
    schema.pop("$schema", None)
    schema.pop("$id", None)
    defs = {
        (keyword, name): sub
        for keyword in ("$defs", "definitions")
        for name, sub in (schema.pop(keyword, None) or {}).items()
    }
    keys = {found: ids.new(f"{key}.{found[1]}") for found in defs}
    for found, sub in defs.items():
        schemas[keys[found]] = _rebase(sub, key, keys)
    return _rebase(schema, key, keys)


def _rebase(node: Any, key: str, keys: dict[tuple[str, str], str]) -> Any:
    """``node`` with its local ``$ref``s pointed into ``components/schemas``: one to a
    ``$defs``/``definitions`` entry at that entry's schema (``keys``: (keyword, name) -> its
    key), any other into the event's schema ``key``."""
    if isinstance(node, list):
        return [_rebase(item, key, keys) for item in node]
    if not isinstance(node, dict):
        return node
    result = {k: _rebase(v, key, keys) for k, v in node.items()}
    ref = result.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        for keyword in ("$defs", "definitions"):
            prefix = f"#/{keyword}/"
            if ref.startswith(prefix):
                name, _, rest = ref[len(prefix) :].partition("/")
                target = keys.get((keyword, name), f"{key}.{name}")
                result["$ref"] = f"#/components/schemas/{target}" + (f"/{rest}" if rest else "")
                break
        else:
            result["$ref"] = f"#/components/schemas/{key}{ref[1:]}"
    return result


# Channels no broker carries, by kind: (the title after the event's name, the description).
_UNBROKERED = {
    "in_process": (
        "in-process",
        "No broker: inline handlers run in publish(), sync handlers in the publisher's "
        "process after commit.",
    ),
    "tasks": (
        "via Django's Tasks",
        "No broker: each delivery is a task of Django's Tasks framework (the backend "
        "`DJANGO_EVENTS['TASKS_BACKEND']`), run by that backend's worker.",
    ),
}


def _on_broker(subscription: Subscription) -> bool:
    """Carried by the Celery broker: async and webhook deliveries, unless ``via: tasks``."""
    return subscription.is_queued and subscription.via != "tasks"


def _operation(subscription: Subscription, channel: str, message: str) -> dict[str, Any]:
    declaration = subscription.declaration
    details: dict[str, Any] = {
        "subscription": subscription.name,
        "event": declaration.event,
        "handler": declaration.handler,
        "mode": subscription.mode,
        "idempotent": declaration.idempotent,
        "when": declaration.when,
    }
    if not subscription.is_queued:
        where = {"inline": "in the publisher's transaction", "sync": "in-process after commit"}
        runs = where[subscription.mode]
    elif subscription.via == "tasks":
        runs = f"as a task of Django's Tasks framework, queue {subscription.queue!r}"
    else:
        runs = f"on a Celery worker, queue {subscription.queue!r}"
    what = (
        "A signed POST of the event to the subscription's URL"
        if subscription.mode == "webhook"
        else declaration.handler
    )
    tags = [{"name": subscription.mode}]
    if subscription.via == "tasks":
        tags.append({"name": "via:tasks"})
    if subscription.is_queued:
        details.update(
            via=subscription.via,
            queue=subscription.queue,
            retry=asdict(subscription.retry),
            broadcast=declaration.broadcast,
            timeout=declaration.timeout,
            give_up_after=declaration.give_up_after,
            ordering_key=declaration.ordering_key,
        )
        tags.append({"name": f"queue:{subscription.queue}"})
        if declaration.ordering_key is not None:
            # One key's deliveries run one at a time, in the order their events were recorded.
            tags.append({"name": f"ordered:{declaration.ordering_key}"})
        if declaration.broadcast:
            # Every worker consuming the queue gets a copy, through this fanout exchange.
            details["exchange"] = exchange_name(subscription.queue)
            tags.append({"name": "broadcast"})
    return {
        "action": "receive",
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "title": subscription.name,
        "summary": f"{what} runs {runs}.",
        "tags": tags,
        EXTENSION: details,
    }
