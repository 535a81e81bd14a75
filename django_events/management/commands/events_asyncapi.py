from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.urls import NoReverseMatch, reverse

from django_events.delivery.broker import celery_app
from django_events.wiring.asyncapi import Broker, HttpServer, Route, asyncapi_document
from django_events.wiring.registry import get_registry


class Command(BaseCommand):
    help = (
        "Print the wiring as an AsyncAPI 3.0 document: the broker and its queues, the task "
        "messages on the wire, send and receive operations, inbound HTTP endpoints."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--title", default="Events", help="info.title (default 'Events').")
        parser.add_argument(
            "--api-version", default="1.0.0", help="info.version (default '1.0.0')."
        )
        parser.add_argument("--description", default="", help="info.description.")
        parser.add_argument(
            "--format", choices=["json", "yaml"], default="json", help="Output format."
        )
        parser.add_argument(
            "--http-host",
            default=None,
            help="host[:port] of the inbound endpoints (default: the first ALLOWED_HOSTS "
            "entry that names a host, else localhost:8000).",
        )
        parser.add_argument(
            "--http-protocol", choices=["https", "http"], default="https", help="Default https."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        registry = get_registry()
        queues = {
            s.queue
            for s in registry.subscriptions.values()
            if s.mode == "async" and not s.declaration.broadcast
        }
        document = asyncapi_document(
            registry,
            title=options["title"],
            version=options["api_version"],
            description=options["description"],
            broker=describe_broker(queues),
            http=_http_server(options["http_host"], options["http_protocol"]),
        )
        if options["format"] == "yaml":
            self.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
        else:
            self.stdout.write(json.dumps(document, indent=2, ensure_ascii=False))


def describe_broker(queues: set[str]) -> Broker | None:
    """The Celery app's broker, without credentials, and how it routes ``queues``."""
    try:
        app = celery_app()
    except ImportError:
        return None  # events_check reports CELERY_APP (E-level); the document stays usable
    if app is None:
        return None
    url = str(app.conf.broker_url or "amqp://localhost//").split(";")[0].strip()
    parts = urlsplit(url if "://" in url else f"{url}://")
    scheme = parts.scheme.split("+")[-1]
    protocol = {"pyamqp": "amqp", "librabbitmq": "amqp", "sentinel": "redis"}.get(scheme, scheme)
    host = parts.hostname or ""
    if host and parts.port:
        host = f"{host}:{parts.port}"
    routes: dict[str, Route] = {}
    for queue in sorted(queues):
        try:
            declared = app.amqp.queues[queue]
        except KeyError:  # task_create_missing_queues off: Celery would refuse to send
            continue
        exchange = declared.exchange
        kind = (exchange.type if exchange.name else None) or "direct"
        if kind == "direct":
            # Celery sends to a direct exchange's queue through the default exchange
            # (celery.app.amqp send_task_message): exchange "", routing key the queue's name.
            routes[queue] = Route("", "default", queue, bool(declared.durable))
        else:
            routes[queue] = Route(
                exchange.name,
                kind,
                declared.routing_key or queue,
                bool(declared.durable),
                bool(declared.auto_delete),
            )
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if protocol == "amqp":  # the path is the virtual host, "/" when empty
        pathname = "" if path in ("", "/") else f"/{path}"
    else:  # the Redis database
        pathname = f"/{path}" if path else ""
    return Broker(protocol, host, pathname, routes)


def _http_server(host: str | None, protocol: str) -> HttpServer | None:
    try:
        example = reverse("django_events:inbound", kwargs={"name": "x"})
    except NoReverseMatch:
        return None  # django_events.urls is not included: no inbound endpoint exists
    if host is None:
        named = [h for h in settings.ALLOWED_HOSTS if h and h[0] not in ".*"]
        host = named[0] if named else "localhost:8000"
    return HttpServer(host, example[: -len("x/")], protocol)
