"""System checks: every configuration problem with a stable id (docs/checks.md lists them)."""

from __future__ import annotations

import functools
import inspect
import os
import pkgutil
import sys
from collections.abc import Sequence
from difflib import get_close_matches
from typing import TYPE_CHECKING, Any

from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string

from django_events.conf import conf
from django_events.wiring.compiled import (
    HandlerImportError,
    HandlerInitError,
    HandlerWithoutHandle,
    Subscription,
    is_async_handler,
    resolve_handler,
)
from django_events.wiring.contracts import compare, lock_data, read_lock
from django_events.wiring.declarations import Problem
from django_events.wiring.registry import checked_registry
from django_events.wiring.upcasting import resolve_upcaster

if TYPE_CHECKING:
    from celery import Celery

# Every id this module can emit, with a one-line summary (kept in sync with docs/checks.md).
CHECK_IDS: dict[str, str] = {
    "django_events.E001": "DJANGO_EVENTS has an invalid value",
    "django_events.W001": "DJANGO_EVENTS has an unknown key",
    "django_events.E002": "a PIPELINE entry does not import",
    "django_events.W002": "no event is declared",
    "django_events.E101": "a manifest file is missing or unreadable",
    "django_events.E102": "a manifest has a YAML syntax error",
    "django_events.E103": "a manifest does not match the manifest schema",
    "django_events.E104": "an event's payload schema is not valid JSON Schema",
    "django_events.E105": "a subscription names an undeclared event",
    "django_events.W101": "a subscription pattern matches no declared event",
    "django_events.W102": "an async-only option on a non-async subscription",
    "django_events.E106": "an event is declared twice",
    "django_events.E107": "a subscription is declared twice",
    "django_events.E108": "a subscription's when filter is invalid",
    "django_events.W108": "a when filter compares with an object a value the schema says is not",
    "django_events.E109": "an event's type is not a dataclass or pydantic model",
    "django_events.W112": "an event's redact path is not declared by its schema",
    "django_events.W113": "a when filter names a field the event's schema does not declare",
    "django_events.W114": "a when filter compares with a value of a type the schema rules out",
    "django_events.E110": "a PIPELINE entry is not an interceptor",
    "django_events.E111": "a broadcast subscription is also idempotent",
    "django_events.W110": "a broadcast subscription has a retry policy",
    "django_events.E160": "ordering_key on a subscription that is not async or webhook",
    "django_events.E161": "ordering_key on a broadcast subscription",
    "django_events.E162": "ordering_key names a path the event's schema does not have",
    "django_events.W160": "ordering_key names an optional property",
    "django_events.E120": "an inline subscription has an async def handler",
    "django_events.E130": "an event's upcast key is not an older version",
    "django_events.E131": "an upcaster does not import or is not callable",
    "django_events.W130": "the lock file no longer matches the declarations",
    "django_events.E201": "a handler does not import",
    "django_events.E202": "a handler is not callable",
    "django_events.E207": "a handler cannot be called with the event as its one argument",
    "django_events.E203": "async subscriptions but no Celery app",
    "django_events.E204": "the Celery app accepts pickle",
    "django_events.E208": "the Celery app's broker transport does not load",
    "django_events.W205": "the Celery app uses kombu's own filesystem transport",
    "django_events.W209": "workers share the event log's SQLite file, which locks late",
    "django_events.W206": "the filesystem transport's folder does not exist",
    "django_events.E210": "via: tasks, but no such task backend (or no django.tasks)",
    "django_events.E211": "a task backend without defer for a subscription that retries",
    "django_events.E212": "a broadcast subscription goes via tasks",
    "django_events.E213": "a subscription's queue is not served by its task backend",
    "django_events.E214": "a handler via tasks has a timeout, which no task backend enforces",
    "django_events.W215": "(deploy) Celery workers connect to their databases for every delivery",
    "django_events.E301": "an inbound secret setting or environment variable is missing",
    "django_events.E302": "an inbound secret has the wrong shape or is empty",
    "django_events.W301": "an inbound permission is declared by no model",
    "django_events.W302": "an inbound option has no effect with the event's auth",
    "django_events.W303": "inbound events but django_events.urls is not included",
    "django_events.E310": "a source's auth is not a known kind",
    "django_events.E311": "a source maps a provider type to an undeclared event",
    "django_events.E312": "a source's secret setting or environment variable is missing",
    "django_events.E313": "a source's secret has the wrong shape or is empty",
    "django_events.E314": "a source is declared twice",
    "django_events.E315": "a standard-webhooks source without the standardwebhooks package",
    "django_events.W310": "a source option has no effect with its auth",
    "django_events.W311": "sources but django_events.urls is not included",
    "django_events.W312": "a stripe or standard-webhooks source's secret lacks whsec_",
    "django_events.E320": "a webhook's url names no setting or env var holding a URL",
    "django_events.E321": "a webhook's secret is missing or not whsec_ + base64",
    "django_events.W321": "a webhook's secret is base64 without the whsec_ prefix",
    "django_events.E322": "webhook subscriptions but httpx is not installed",
    "django_events.W320": "WEBHOOKS_ALLOW_PRIVATE is on with DEBUG = False",
    "django_events.E323": "a subscription's name starts with endpoint: (webhook endpoints')",
    "django_events.E324": "enabled webhook endpoints but httpx is not installed",
    "django_events.E325": "a webhook's url has a user name or password",
    "django_events.E326": "enabled webhook endpoints have a user name or password in their URL",
    "django_events.E327": "an enabled webhook endpoint's URL is refused (http://, private host)",
}
WEBHOOKS_EXTRA = "pip install 'django-event-wiring[webhooks]'"


def to_message(problem: Problem) -> CheckMessage:
    """Turn a registry problem into a Django check message."""
    cls = Error if problem.is_error else Warning
    return cls(
        problem.message,
        hint=problem.hint,
        obj=str(problem.origin or "DJANGO_EVENTS"),
        id=problem.id,
    )


def check_configuration(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Settings, manifests, schemas, names and filters."""
    registry = checked_registry()
    messages = [to_message(p) for p in registry.problems]
    if not registry.events and not messages:
        messages.append(
            Warning(
                "No event is declared: MANIFESTS, EVENTS and @event classes declare none, so "
                "publish() and inbound sources have nothing to publish",
                hint="List your manifests in DJANGO_EVENTS['MANIFESTS']. A later "
                "DJANGO_EVENTS = {...} in settings replaces the whole dict: set one key "
                "with DJANGO_EVENTS['DELIVERY'] = ... instead.",
                obj="settings.DJANGO_EVENTS",
                id="django_events.W002",
            )
        )
    from django.conf import settings

    if conf.WEBHOOKS_ALLOW_PRIVATE and not settings.DEBUG:
        messages.append(
            Warning(
                "DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] is on with DEBUG = False: webhooks "
                "may reach private and loopback addresses",
                hint="Turn it off in production unless every webhook URL is trusted.",
                obj="settings.DJANGO_EVENTS",
                id="django_events.W320",
            )
        )
    return messages


def check_handlers(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Every subscription's handler imports and can be called (inline ones synchronously)."""
    messages: list[CheckMessage] = []
    for subscription in checked_registry().subscriptions.values():
        if subscription.mode == "webhook":  # no handler: its URL and secret instead
            messages += _webhook_problems(subscription)
            continue
        path = subscription.declaration.handler
        hint = "Fix the dotted path in 'handler'."
        try:
            handler = resolve_handler(path)
        except HandlerInitError as exc:  # it imports: one instance a process, no arguments
            code, reason = "E202", str(exc)
            hint = (
                "Give its __init__ arguments defaults, or use a function handler."
                if isinstance(exc.__cause__, TypeError)
                else "Its __init__ raised: it runs once a process, with no arguments."
            )
        except HandlerWithoutHandle as exc:
            code, reason = "E202", str(exc)
            hint = "Add a method handle(self, event) to the class."
        except HandlerImportError as exc:
            cause, reason = exc.__cause__, str(exc)
            if cause is None or isinstance(cause, ImportError):  # None: not callable
                code = "E201" if cause is not None else "E202"
                hint = _import_hint(path, cause) or _close_path(path) or hint
            else:
                code, module = "E201", path.rpartition(".")[0]
                hint = (
                    f"Its module raised while importing: python manage.py shell -c "
                    f"'import {module}'."
                )
        else:
            messages += _signature_problems(subscription, handler)
            if subscription.mode == "inline" and is_async_handler(handler):
                messages.append(
                    Error(
                        f"Subscription {subscription.name!r} is inline but its handler "
                        f"{path!r} is async def",
                        hint="Use mode: sync or async (inline runs inside publish()).",
                        obj=str(subscription.declaration.origin),
                        id="django_events.E120",
                    )
                )
            continue
        messages.append(
            Error(
                f"Subscription {subscription.name!r}: {reason}",
                hint=hint,
                obj=str(subscription.declaration.origin),
                id=f"django_events.{code}",
            )
        )
    return messages


def _signature_problems(subscription: Subscription, handler: Any) -> list[CheckMessage]:
    """A handler that cannot be called as ``handler(event)``: a TypeError at every delivery."""
    try:
        # The outermost signature: a decorator (functools.wraps) may supply other arguments.
        signature = inspect.signature(handler, follow_wrapped=False)
        signature.bind(None)
    except TypeError as exc:  # bind(): the event does not fit
        reason = str(exc)
    except ValueError:  # no signature to read (a builtin): not checked
        return []
    else:
        return []
    path = subscription.declaration.handler
    target = import_string(path)  # it imported: resolve_handler did
    shown, define = f"{path}{signature}", ""
    if isinstance(target, type):
        cls: Any = target  # a class with handle (resolve_handler checked it)
        handle = inspect.signature(cls.handle, follow_wrapped=False)
        shown, define = f"{path}.handle{handle}", "def handle(self, event)"
    elif inspect.isfunction(target) or inspect.ismethod(target):
        prefix = "async def" if inspect.iscoroutinefunction(target) else "def"
        define = f"{prefix} {target.__name__}(event)"
    elif not isinstance(target, functools.partial):  # an instance with __call__
        define = "def __call__(self, event)"
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    takes_one = any(p.kind in positional for p in signature.parameters.values())
    return [
        Error(
            f"Subscription {subscription.name!r}: handler {shown!r} cannot be called with the "
            f"event as its one argument: {reason}",
            hint=(
                "Give its other parameters defaults: it is called with the event only."
                if takes_one
                else f"Give it a parameter for the event{f': {define}' if define else ''}."
            ),
            obj=str(subscription.declaration.origin),
            id="django_events.E207",
        )
    ]


def _import_hint(path: str, error: BaseException | None) -> str | None:
    """The hint for a handler whose module imports a module that is missing (not the path's)."""
    missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    if not missing or path == missing or path.startswith(f"{missing}."):
        return None  # the path itself names what is missing
    return (
        f"The handler's module imports {missing!r}, which is not installed here: install it, "
        "or fix that import."
    )


def _close_path(path: str) -> str | None:
    """``Did you mean ...?`` for a handler path whose last name is misspelt: an attribute of
    its module, or a module of its package (both already imported: nothing more runs)."""
    module_path, _, name = path.rpartition(".")
    module = sys.modules.get(module_path)
    if module is not None:
        names = [n for n in dir(module) if n[:1] != "_" and callable(getattr(module, n, None))]
        close = get_close_matches(name, names, n=1)
        return f"Did you mean {f'{module_path}.{close[0]}'!r}?" if close else None
    package_path, _, module_name = module_path.rpartition(".")
    package = sys.modules.get(package_path)
    search = getattr(package, "__path__", None)
    if not package_path or search is None:
        return None
    modules = [info.name for info in pkgutil.iter_modules(search)]
    close = get_close_matches(module_name, modules, n=1)
    return f"Did you mean {f'{package_path}.{close[0]}.{name}'!r}?" if close else None


def check_upcasters(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Every upcaster imports and can be called."""
    messages: list[CheckMessage] = []
    for compiled in checked_registry().events.values():
        for step, path in sorted(compiled.declaration.upcast.items()):
            if not 1 <= step < compiled.version:
                continue  # E130 already: no delivery ever runs it
            try:
                resolve_upcaster(path)
            except Exception as exc:  # noqa: BLE001 - ImportError, TypeError, or the module raised
                messages.append(
                    Error(
                        f"Event {compiled.name!r}: upcaster v{step} -> v{step + 1} {path!r} "
                        f"is unusable: {type(exc).__name__}: {exc}",
                        hint="Point it at a function f(payload) -> payload.",
                        obj=str(compiled.declaration.origin),
                        id="django_events.E131",
                    )
                )
    return messages


def check_lock(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """A lock file that exists matches the declarations (``events_lock`` rewrites it)."""
    path = conf.LOCK_FILE
    if not path.is_file():
        return []
    try:
        locked = read_lock(path)
    except ValueError as exc:
        reason = str(exc)
    else:
        current = lock_data(checked_registry())
        if locked == current:
            return []
        changes = compare(locked, current)
        if changes:
            reason = f"{len(changes)} change(s) since it was written; first: {changes[0]}"
        else:  # a hand edit no change names (its list of queues, say)
            reason = "it differs from what events_lock writes now"
    return [
        Warning(
            f"Lock file {str(path)!r} is stale: {reason}",
            hint="Run manage.py events_compat to review, then manage.py events_lock.",
            obj=str(path),
            id="django_events.W130",
        )
    ]


def _webhook_problems(subscription: Subscription) -> list[CheckMessage]:
    from django_events.delivery import webhooks

    declaration, where = subscription.declaration, str(subscription.declaration.origin)
    name = subscription.name
    messages: list[CheckMessage] = []
    if not _has_httpx():
        messages.append(
            Error(
                f"Subscription {name!r} is a webhook but httpx is not installed",
                hint=WEBHOOKS_EXTRA,
                obj=where,
                id="django_events.E322",
            )
        )
    for code, read, value, hint in (
        ("E320", webhooks.target_url, declaration.url or "", "hold an https:// URL in it."),
        ("E321", webhooks.signing_key, declaration.secret or "", "hold whsec_ + base64 in it."),
    ):
        try:
            read(value)
        except webhooks.WebhookNotConfigured as exc:
            messages.append(
                Error(
                    f"Subscription {name!r}: webhook {exc}",
                    hint=f"Define settings.{value} or the environment variable {value}; {hint}",
                    obj=where,
                    id=f"django_events.{code}",
                )
            )
    messages.extend(_credentials_problems(subscription) + _unprefixed_secret(subscription))
    return messages


def _unprefixed_secret(subscription: Subscription) -> list[CheckMessage]:
    """W321: base64 alone signs with the same key (the ``standardwebhooks`` libraries decode
    it so too), but it is not the documented ``whsec_`` + base64: perhaps not the secret the
    receiver was given. Never quoted: it is the secret."""
    from django_events.delivery import webhooks

    name = subscription.declaration.secret or ""
    value = webhooks.setting_value(name)
    if not isinstance(value, str) or value.startswith(webhooks.SECRET_PREFIX):
        return []
    try:
        webhooks.signing_key_of(value)
    except ValueError:
        return []  # E321
    return [
        Warning(
            f"Subscription {subscription.name!r}: webhook secret {name!r} does not start with "
            f"{webhooks.SECRET_PREFIX}",
            hint=(
                f"Give {webhooks.SECRET_PREFIX} + base64 (as the receiver holds it); the base64 "
                "alone is read as the same key."
            ),
            obj=str(subscription.declaration.origin),
            id="django_events.W321",
        )
    ]


def _credentials_problems(subscription: Subscription) -> list[CheckMessage]:
    """A webhook URL's ``user:password@`` is never sent: refused (E325), never quoted."""
    from django_events.delivery import webhooks
    from django_events.models import has_credentials

    declared = subscription.declaration.url or ""
    try:
        url = webhooks.target_url(declared)
    except webhooks.WebhookNotConfigured:
        return []  # E320
    if not has_credentials(url):
        return []
    held = "" if declared == url else f" ({declared})"
    return [
        Error(
            f"Subscription {subscription.name!r}: webhook url{held} has a user name or password",
            hint=(
                "Remove them (webhooks do not send them); the receiver verifies the signature, "
                "and a token can go in the URL's path or query."
            ),
            obj=str(subscription.declaration.origin),
            id="django_events.E325",
        )
    ]


def _has_httpx() -> bool:
    """Whether httpx, which sends webhooks (the optional ``webhooks`` extra), imports."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        return False
    return True


def check_endpoints(
    app_configs: Sequence[Any] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """Enabled webhook endpoints need httpx, as webhook subscriptions do (E324); their URLs
    may have no user name or password (E326) and pass the rules new ones do (E327); workers
    send them, as W209 tells of. A disabled endpoint is sent nothing: none of these.

    They are rows: read only when the checks may query a database (``databases``: ``manage.py
    check --database default``, ``migrate`` before it migrates, and from Django 6.1 a ``check
    --tag`` without ``--database``, given every alias).
    """
    if not databases:
        return []
    from django.db import router

    from django_events.models import WebhookEndpoint, has_credentials

    messages: list[CheckMessage] = []
    for alias in databases:
        if not router.allow_migrate_model(alias, WebhookEndpoint):
            continue
        if not _has_endpoints_table(alias):
            continue  # not migrated yet: no endpoint
        rows = WebhookEndpoint.objects.using(alias)
        urls = rows.filter(enabled=True, url__contains="@").values_list("url", flat=True)
        with_credentials = sum(1 for url in urls if has_credentials(url))
        if with_credentials:
            messages.append(
                Error(
                    f"{with_credentials} enabled webhook endpoint(s) in database {alias!r} have "
                    "a user name or password in their URL",
                    hint="Remove them in the admin, or disable the endpoints: they are not sent, "
                    "and deliveries are refused.",
                    obj="django_events.WebhookEndpoint",
                    id="django_events.E326",
                )
            )
        messages.extend(_endpoints_refused(alias))
        enabled = 0 if _has_httpx() else rows.filter(enabled=True).count()
        if enabled:
            messages.append(
                Error(
                    f"{enabled} webhook endpoint(s) enabled in database {alias!r} but httpx "
                    "is not installed",
                    hint=f"{WEBHOOKS_EXTRA}, or disable them in the admin.",
                    obj="django_events.WebhookEndpoint",
                    id="django_events.E324",
                )
            )
    return messages + _endpoints_on_workers(databases)


def _endpoints_refused(alias: str) -> list[CheckMessage]:
    """E327 for each enabled endpoint whose stored URL the rules of new ones refuse (saved
    before `create_endpoint` applied them): each attempt to it is refused."""
    from django.core.exceptions import ValidationError

    from django_events.delivery.endpoints import check_url
    from django_events.models import WebhookEndpoint

    messages: list[CheckMessage] = []
    rows = WebhookEndpoint.objects.using(alias).filter(enabled=True).order_by("created_at")
    for endpoint in rows.only("id", "url", "description"):
        try:
            check_url(endpoint.url)
        except ValidationError as exc:
            # check_url shows the URL's scheme, host and port: never a token in its path.
            named = f" ({endpoint.description!r})" if endpoint.description else ""
            messages.append(
                Error(
                    f"Webhook endpoint {endpoint.pk}{named} in database {alias!r}: "
                    + " ".join(exc.messages),
                    hint="Each delivery to it is refused: give it an https:// URL of a public "
                    "address in the admin, or disable or delete it.",
                    obj="django_events.WebhookEndpoint",
                    id="django_events.E327",
                )
            )
    return messages


def _has_endpoints_table(alias: str) -> bool:
    """Whether the database ``alias`` has WebhookEndpoint's table (migrated)."""
    from django.db import connections

    from django_events.models import WebhookEndpoint

    connection = connections[alias]
    with connection.cursor() as cursor:
        return WebhookEndpoint._meta.db_table in connection.introspection.table_names(cursor)


def _endpoints_on_workers(databases: Sequence[str]) -> list[CheckMessage]:
    """W209 for the enabled endpoints of the database publishers read them from, which
    workers send to, when no declared subscription has told it already (check_database)."""
    from django.db import router

    from django_events.models import WebhookEndpoint

    late = _event_log_locking_late()
    if late is None or _subscriptions_on_workers() or not _on_workers(conf.DELIVERY):
        return []
    alias = router.db_for_read(WebhookEndpoint)
    if alias not in databases or not _has_endpoints_table(alias):
        return []
    if not WebhookEndpoint.objects.using(alias).filter(enabled=True).exists():
        return []
    return [_workers_share_sqlite(*late)]


def check_celery(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Async subscriptions need a Celery app that accepts only safe serializers."""
    if not _celery_subscriptions():
        return []
    app, reason = _celery_app()
    if app is None:
        return [
            Error(
                f"Async subscriptions exist but {reason}",
                hint=(
                    "Create a Celery app in proj/celery.py and import it in proj/__init__.py "
                    "(Celery's Django layout), or set DJANGO_EVENTS['CELERY_APP'] to its "
                    "dotted path, such as 'proj.celery.app'."
                ),
                obj="DJANGO_EVENTS",
                id="django_events.E203",
            )
        ]
    messages: list[CheckMessage] = []
    accepted = {str(c).lower() for c in app.conf.accept_content or ()}
    if accepted & {"pickle", "application/x-python-serialize"}:
        messages.append(
            Error(
                f"Celery app {app.main!r} accepts pickle: {sorted(accepted)!r}",
                hint="Set accept_content = ['json']; pickle runs code from the broker.",
                obj="DJANGO_EVENTS",
                id="django_events.E204",
            )
        )
    messages.extend(_transport_problems(app))
    if _transport_name(app) == "filesystem":
        messages.append(
            Warning(
                f"Celery app {app.main!r} uses kombu's own filesystem transport, which shows a "
                "worker a message file before it is written: the worker exits and the message "
                "is lost",
                hint="Set CELERY_BROKER_TRANSPORT = "
                '"django_events.contrib.filesystem_transport:Transport" (same folders).',
                obj="DJANGO_EVENTS",
                id="django_events.W205",
            )
        )
    for folder in _missing_broker_folders(app):
        messages.append(
            Warning(
                f"Celery app {app.main!r} uses the filesystem transport, but its folder "
                f"{folder!r} does not exist: every publish would find the broker unreachable "
                "and leave its events pending",
                hint=f"Create it (mkdir -p {folder}) wherever publishers and workers run, or "
                "set data_folder_in and data_folder_out in CELERY_BROKER_TRANSPORT_OPTIONS.",
                obj="DJANGO_EVENTS",
                id="django_events.W206",
            )
        )
    return messages


def _celery_app() -> tuple[Celery | None, str]:
    """The Celery app publishers send through, or None and why not (E203 tells it)."""
    from celery import Celery

    from django_events.delivery.broker import celery_app

    try:
        app: Any = celery_app()
    except Exception as exc:  # noqa: BLE001 - ImportError, or the module raised while importing
        return None, f"DJANGO_EVENTS['CELERY_APP'] does not import: {exc}"
    if app is None:
        return None, "no Celery app is configured"
    if not isinstance(app, Celery):
        return None, f"DJANGO_EVENTS['CELERY_APP'] is not a Celery app: {app!r}"
    return app, ""


def check_worker_connections(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """Warn (``check --deploy``) when Celery workers reconnect for every delivery.

    Celery's Django fixup closes the connections before and after each task unless
    ``CELERY_DB_REUSE_MAX`` is set (it does not read ``CONN_MAX_AGE``); the worker closes a
    connection ``CONN_MAX_AGE`` has aged before each delivery, as Django does at each
    request. What reconnects is a delivery that uses a database in its task: its handler's
    queries, a row written before the acknowledgement. SQLite is left out: its connection is
    a file opened.
    """
    if not _celery_subscriptions():
        return []
    app, _ = _celery_app()
    if app is None:
        return []  # E203
    from django.db import connections

    servers = {a: d for a, d in connections.settings.items() if not _is_sqlite(d)}
    if not servers:
        return []
    reuse = app.conf.get("CELERY_DB_REUSE_MAX")  # the key Celery's fixup reads
    if not _keeps_connections(reuse):
        closing = sorted(servers)
        value = "is not set" if reuse is None else f"is {reuse!r}, not a number of 2 or more"
        cause = (
            "Celery's Django fixup closes the workers' database connections before and after "
            f"every task (CELERY_DB_REUSE_MAX {value})"
        )
        hint = (
            "Set CELERY_DB_REUSE_MAX = 1000 where your Celery app reads its settings, and "
            "CONN_MAX_AGE (for example 60, with CONN_HEALTH_CHECKS = True) or a connection "
            "pool on the database."
        )
        obj = "CELERY_DB_REUSE_MAX"
    else:
        closing = sorted(
            alias
            for alias, database in servers.items()
            if database.get("CONN_MAX_AGE") == 0 and not (database.get("OPTIONS") or {}).get("pool")
        )
        if not closing:
            return []
        named = _listed(closing, "DATABASES[{!r}]")
        cause = (
            f"{named} {'has' if len(closing) == 1 else 'have'} CONN_MAX_AGE 0 and no pool, so "
            "a worker closes the connection before each delivery, as Django does at each request"
        )
        hint = (
            f"Set CONN_MAX_AGE (for example 60, with CONN_HEALTH_CHECKS = True) on {named}, or "
            "give it a connection pool."
        )
        obj = "DATABASES"
    return [
        Warning(
            f"{cause}: each delivery that uses {_listed(closing, 'database {!r}')} in its task "
            "(its handler's queries, a Delivery row written before the acknowledgement) "
            "connects again",
            hint=f"{hint} Silence this where a pooler such as PgBouncer makes connections cheap.",
            obj=obj,
            id="django_events.W215",
        )
    ]


def _keeps_connections(reuse: object) -> bool:
    """Whether Celery's Django fixup, given ``CELERY_DB_REUSE_MAX = reuse``, keeps connections
    across tasks: it closes them every 2 x ``reuse`` task signals, so below 2 at every task
    (tests/test_private_apis.py pins both)."""
    return isinstance(reuse, int | float) and not isinstance(reuse, bool) and reuse >= 2


def _listed(aliases: Sequence[str], form: str) -> str:
    """Each alias in ``form`` (``"database {!r}"``), joined with "and"."""
    return " and ".join(form.format(alias) for alias in aliases)


# Celery's bundles for the transports whose packages are not kombu's own dependencies.
CELERY_EXTRAS = {"redis": "redis", "rediss": "redis", "sentinel": "redis", "sqs": "sqs"}


def _transport_problems(app: Any) -> list[CheckMessage]:
    """Each broker URL's transport class loads (as kombu resolves it; nothing connects).

    kombu resolves it when a connection is made: a misspelt scheme or a missing package
    (redis://, without redis) would fail every publish, and the worker, at run time only.
    """
    from kombu import Connection

    conf = app.conf
    transport = conf.broker_transport
    if transport is not None and not isinstance(transport, str):
        return []  # a class, given as such: it loaded
    urls: list[str | None] = []  # None: Celery's default broker
    for url in (conf.broker_write_url or conf.broker_url, conf.broker_read_url or conf.broker_url):
        # A string with ";" between failover URLs, or a list of them (Celery takes both).
        listed = url.split(";") if isinstance(url, str) else list(url or [None])
        urls += [one for one in listed or [None] if one not in urls]
    checked: set[str] = set()
    messages: list[CheckMessage] = []
    for url in urls:
        scheme = url.partition("://")[0] if url and "://" in url else "amqp"
        if (transport or scheme) in checked:
            continue
        checked.add(transport or scheme)
        try:
            Connection(url or "", transport=transport).get_transport_cls()
        except Exception as exc:  # noqa: BLE001 - KeyError (no such alias) or what it raised
            messages.append(_transport_problem(app, transport, scheme, exc))
    return messages


def _transport_problem(app: Any, transport: str | None, scheme: str, exc: Exception) -> Error:
    """E208, naming the URL's scheme (never the URL: it may hold a password) and the cause."""
    extra = CELERY_EXTRAS.get(scheme) if transport is None else None
    bundle = f"pip install 'celery[{extra}]'" if extra else ""
    if isinstance(exc, KeyError):  # kombu's own message, with its "Did you mean ...?"
        cause = " ".join(str(exc.args[0] if exc.args else exc).split())
        hint = (
            "Fix the scheme of the broker URL (CELERY_BROKER_URL, or the app's broker_url): "
            "amqp://, redis://, sqs://, filesystem:// and the others kombu knows."
        )
    else:
        cause = f"{type(exc).__name__}: {exc}"
        missing = exc.name if isinstance(exc, ImportError) else None
        if missing:
            top = missing.partition(".")[0]
            hint = f"Install {top!r} wherever publishers and workers run" + (
                f" (for {scheme}://: {bundle})." if bundle else "."
            )
        elif bundle:
            hint = (
                f"Install its transport's packages ({bundle}) wherever publishers and workers run."
            )
        else:
            hint = "Make its transport importable wherever publishers and workers run."
    what = (
        f"broker URL scheme '{scheme}://' has no transport that loads"
        if transport is None
        else f"broker transport {transport!r} (broker_transport) does not load"
    )
    return Error(
        f"Celery app {app.main!r}: {what}: {cause}",
        hint=hint,
        obj="DJANGO_EVENTS",
        id="django_events.E208",
    )


def _missing_broker_folders(app: Any) -> list[str]:
    """The message folders of a ``filesystem://`` broker that do not exist (none are created:
    one missing may be a volume not mounted)."""
    url = app.conf.broker_write_url or app.conf.broker_url
    if not (isinstance(url, str) and url.startswith("filesystem:")):
        return []
    options = app.conf.broker_transport_options or {}
    folders = {
        str(options.get(k, d))
        for k, d in (("data_folder_in", "data_in"), ("data_folder_out", "data_out"))
    }
    return sorted(f for f in folders if not os.path.isdir(f))


def check_tasks(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Subscriptions ``via: tasks`` need a task backend that can do what they ask."""
    from django_events.conf import conf

    subscriptions = [
        s for s in checked_registry().subscriptions.values() if s.is_queued and s.via == "tasks"
    ]
    if not subscriptions:
        return []
    try:
        from django_events.delivery import tasks_backend

        backend: Any = tasks_backend.backend()
    except Exception as exc:  # noqa: BLE001 - ImportError, InvalidTaskBackendError, a bad class
        return [
            Error(
                f"Subscription {s.name!r} goes via tasks, but task backend "
                f"{conf.TASKS_BACKEND!r} is not usable: {type(exc).__name__}: {exc}",
                hint="Define it in settings.TASKS (on Django 5.2: pip install "
                "'django-event-wiring[tasks]'), or set DJANGO_EVENTS['TASKS_BACKEND'].",
                obj=str(s.declaration.origin),
                id="django_events.E210",
            )
            for s in subscriptions
        ]
    messages: list[CheckMessage] = []
    for s in subscriptions:
        where = str(s.declaration.origin)
        if s.declaration.broadcast:
            messages.append(
                Error(
                    f"Subscription {s.name!r} is broadcast, which task backends cannot do",
                    hint="Use via: celery for broadcast subscriptions.",
                    obj=where,
                    id="django_events.E212",
                )
            )
        elif s.retry.max_attempts > 1 and not backend.supports_defer:
            messages.append(
                Error(
                    f"Subscription {s.name!r} retries, but task backend "
                    f"{conf.TASKS_BACKEND!r} cannot defer tasks (run_after)",
                    hint="Use a backend with supports_defer, or retry: {max_attempts: 1}.",
                    obj=where,
                    id="django_events.E211",
                )
            )
        # A webhook's timeout is its HTTP client's, each phase of the call: any worker
        # enforces it. A handler's needs a time limit, which only Celery has.
        if s.declaration.timeout and s.mode != "webhook":
            messages.append(
                Error(
                    f"Subscription {s.name!r} has timeout {s.declaration.timeout!r}, which "
                    "task backends cannot enforce",
                    hint="Use via: celery for a time limit, or remove timeout.",
                    obj=where,
                    id="django_events.E214",
                )
            )
        if backend.queues and s.queue not in backend.queues:
            messages.append(
                Error(
                    f"Subscription {s.name!r} uses queue {s.queue!r}, which task backend "
                    f"{conf.TASKS_BACKEND!r} does not serve: {sorted(backend.queues)!r}",
                    hint="Add the queue to the backend's QUEUES, or change the queue.",
                    obj=where,
                    id="django_events.E213",
                )
            )
    return messages


def _transport_name(app: Any) -> str | None:
    """The transport the app's broker connections use, when a name (not a class) says it."""
    transport = app.conf.broker_transport
    if transport is None:
        url = app.conf.broker_write_url or app.conf.broker_url
        transport = url.partition("://")[0] if isinstance(url, str) and "://" in url else None
    return transport if isinstance(transport, str) else None


# SQLite transaction modes that take the write lock at BEGIN.
_LOCKS_AT_BEGIN = ("IMMEDIATE", "EXCLUSIVE")
# Django's SQLite backends: GeoDjango's spatialite one extends the sqlite3 one. Read from the
# ENGINE path: a check must not load a backend (the configured one may not import).
_SQLITE_ENGINES = ("sqlite3", "spatialite")


def check_database(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Workers write to the event log while the web process does: on SQLite a transaction
    that reads before it writes (the admin's retry, a replay) fails at once with "database is
    locked" unless it takes the write lock at BEGIN, where the busy timeout applies.

    Webhook endpoints are rows: ``check_endpoints`` tells of them, where checks read rows."""
    late = _event_log_locking_late()
    if late is None or not _subscriptions_on_workers():
        return []
    return [_workers_share_sqlite(*late)]


def _event_log_locking_late() -> tuple[str, object] | None:
    """The event log's alias and transaction_mode when it is SQLite that takes the write lock
    at a transaction's first write; None otherwise (nothing connects)."""
    from django.db import connections, router

    from django_events.models import Delivery

    alias = router.db_for_write(Delivery)
    database = connections.settings[alias]
    if not _is_sqlite(database):
        return None
    mode = (database.get("OPTIONS") or {}).get("transaction_mode")
    return None if str(mode).upper() in _LOCKS_AT_BEGIN else (alias, mode)


def _is_sqlite(database: dict[str, Any]) -> bool:
    """Whether a ``DATABASES`` entry is SQLite (Django's backend, or GeoDjango's)."""
    return str(database.get("ENGINE", "")).endswith(_SQLITE_ENGINES)


def _celery_subscriptions() -> bool:
    """Whether a declared subscription is delivered through Celery (async, webhook)."""
    return any(s.is_queued and s.via != "tasks" for s in checked_registry().subscriptions.values())


def _subscriptions_on_workers() -> bool:
    """Whether a declared subscription's deliveries run in worker processes."""
    queued = {s.via for s in checked_registry().subscriptions.values() if s.is_queued}
    return any(_on_workers(via) for via in queued)


def _on_workers(via: str) -> bool:
    """Whether deliveries ``via`` celery or tasks run in worker processes: not with a task
    backend that runs them in the publishing process (ImmediateBackend), or never."""
    if via != "tasks":
        return True
    try:
        from django_events.delivery import tasks_backend

        return tasks_backend.has_workers(tasks_backend.backend())
    except Exception:  # noqa: BLE001 - an unusable backend is E210's: counted as having workers
        return True


def _workers_share_sqlite(alias: str, mode: object) -> Warning:
    return Warning(
        f"Database {alias!r} (the event log's) is SQLite "
        + ("without a transaction_mode" if mode is None else f"with transaction_mode {mode!r}")
        + ", and workers write to it while this process does: a transaction that "
        "reads before it writes (the admin's retry, events_replay) fails at once with "
        '"database is locked"',
        hint=f'Add "transaction_mode": "IMMEDIATE" (and "timeout": 20) to '
        f"DATABASES[{alias!r}]['OPTIONS'], or use PostgreSQL.",
        obj="DATABASES",
        id="django_events.W209",
    )
