"""Webhook endpoints registered at run time (`WebhookEndpoint`, DESIGN 3.15).

Each enabled endpoint is one more ``mode: webhook`` subscription, named ``endpoint:<id>``,
for the events its patterns match: the same message, worker, signing, retries, failure
records, "Retry selected" and replay as a manifest's webhooks. Publishers keep the list of
enabled endpoints for ``WEBHOOK_ENDPOINTS["refresh"]`` seconds (a save or delete in the same
process clears it); workers read the endpoint at each attempt, so an edited URL or secret, or
a disabled endpoint, applies to the next attempt.

An endpoint whose every attempt has failed for ``WEBHOOK_ENDPOINTS["disable_after"]`` seconds
is disabled (Svix's behaviour): logged, `endpoint_disabled` sent, the reason on its admin page.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, router, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_events.conf import conf
from django_events.delivery import webhooks
from django_events.delivery.sealing import Unsealable, open_text, seal_text
from django_events.events import Event
from django_events.logs import log_extra
from django_events.models import CREDENTIALS_REFUSED, WebhookEndpoint, has_credentials
from django_events.signals import endpoint_disabled
from django_events.wiring.compiled import Subscription
from django_events.wiring.declarations import (
    ENDPOINT_PREFIX,
    Origin,
    RetryPolicy,
    SubscriptionDeclaration,
)
from django_events.wiring.describing import EndpointInfo, shown_url
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.endpoints")

PREFIX = ENDPOINT_PREFIX  # of the subscription names of endpoints; manifests may not use it
#: The error of a delivery whose endpoint was deleted (nothing can deliver it any more).
DELETED = "Webhook endpoint deleted"
#: The error of an attempt of a disabled endpoint (nothing is sent, no attempt counted).
DISABLED = "Webhook endpoint disabled: enable it, then retry this delivery"
SECRET_BYTES = 32
HINT_LENGTH = 12  # characters of a secret shown: "whsec_" and 6 of the key
PATTERN = re.compile(r"^[A-Za-z0-9_.*-]+$")  # event names (3.2), with * for patterns


@dataclass(eq=False)
class EndpointSubscription(Subscription):
    """The subscription of one endpoint: its patterns and, in a worker, its row."""

    endpoint_id: UUID | None = None
    patterns: tuple[str, ...] = ()
    endpoint: WebhookEndpoint | None = field(default=None, repr=False)

    def receives(self, event_name: str) -> bool:
        """Whether the endpoint's patterns match events named ``event_name``."""
        return any(fnmatchcase(event_name, pattern) for pattern in self.patterns)

    @property
    def disabled(self) -> bool:
        """Whether its row, as read with it, is disabled: each attempt fails without a call."""
        return self.endpoint is not None and not self.endpoint.enabled


def subscription_name(endpoint_id: UUID | str) -> str:
    """The ``Delivery.subscription`` of an endpoint's deliveries."""
    return f"{PREFIX}{endpoint_id}"


def is_endpoint_name(name: str) -> bool:
    return name.startswith(PREFIX)


def new_secret() -> str:
    """A fresh signing secret, ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(SECRET_BYTES)).decode("ascii")


def secret_hint(secret: str) -> str:
    """What is shown of a secret: its start, never enough to sign with."""
    return secret[:HINT_LENGTH] + "…"


def set_secret(endpoint: WebhookEndpoint, secret: str) -> None:
    """Store ``secret`` (``whsec_`` + base64) on ``endpoint``, encrypted; raises ValueError."""
    webhooks.signing_key_of(secret, prefixed=True)
    endpoint.secret_sealed = seal_text(secret, str(endpoint.pk))
    endpoint.secret_hint = secret_hint(secret)


def secret_of(endpoint: WebhookEndpoint) -> str:
    """The endpoint's signing secret (raises `Unsealable`)."""
    return open_text(endpoint.secret_sealed, str(endpoint.pk))


def check_url(url: str) -> None:
    """Raise ValidationError for a URL no webhook is sent to: the rules of the admin's form
    and `create_endpoint` alike.

    An ``https://`` URL (or ``http://`` with ``WEBHOOKS_ALLOW_PRIVATE``) whose host, given as
    an address (or ``localhost``, a name under it, in any case, with or without a fully
    qualified name's trailing dot), is public unless ``WEBHOOKS_ALLOW_PRIVATE``. A host name
    is checked where it resolves, at each attempt (`webhooks.resolve`); a user name or
    password is refused by the model's ``clean``.
    """
    parts = urlsplit(url)
    allow_private = conf.WEBHOOKS_ALLOW_PRIVATE
    shown = shown_url(url)  # not its path or query, which may hold a token
    if allow_private and parts.scheme not in ("https", "http"):
        raise ValidationError(
            _("Refused %(url)s: use an https:// or http:// URL (webhooks use no other)."),
            code="scheme",
            params={"url": shown},
        )
    if not allow_private and parts.scheme != "https":
        raise ValidationError(
            _(
                "Refused %(url)s: use an https:// URL (http:// only with "
                "DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] on)."
            ),
            code="scheme",
            params={"url": shown},
        )
    if allow_private:
        return
    host = _normal_host(parts.hostname or "")
    if host == "localhost" or host.endswith(".localhost"):  # always loopback (RFC 6761)
        public = False
    else:
        try:
            public = ipaddress.ip_address(host).is_global
        except ValueError:
            return  # a name: checked where it resolves, at each attempt
    if not public:
        raise ValidationError(
            _(
                "Refused %(url)s: %(address)s is not a public address (private, loopback, "
                "link-local and reserved ones only with DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] "
                "on)."
            ),
            code="address",
            params={"url": shown, "address": host},
        )


def url_refused(endpoint: WebhookEndpoint) -> list[str]:
    """Why the URL rules of new endpoints refuse ``endpoint``'s stored URL (one saved before
    they applied: E326, E327), empty if they take it.

    The reasons the admin's form gives (a user name or password; `check_url`): "Enable
    selected" enables no endpoint with one, as its form would not save it enabled.
    """
    reasons = [str(CREDENTIALS_REFUSED)] if has_credentials(endpoint.url) else []
    try:
        check_url(endpoint.url)
    except ValidationError as exc:
        reasons += exc.messages
    return reasons


def _normal_host(host: str) -> str:
    """``host`` as the rules compare it: lower-case, without the one trailing dot of a fully
    qualified name (``localhost.`` is ``localhost``, ``127.0.0.1.`` that address)."""
    return host.lower().removesuffix(".")


def check_patterns(patterns: Sequence[object]) -> list[str]:
    """Return ``patterns`` without repeats, or raise ValidationError naming each pattern
    refused and its rule: the rules of the admin's form and `create_endpoint` alike.

    At least one; each an event name or pattern (letters, digits, ``_ . - *``) that matches
    a declared event (``orders.*``, ``*``).
    """
    if not patterns:
        raise ValidationError(_("Name at least one event or pattern."), code="required")
    unique: list[object] = []
    for pattern in patterns:  # not dict.fromkeys: a bad one may be unhashable ([["a"]])
        if pattern not in unique:
            unique.append(pattern)
    declared = get_registry().events
    problems = []
    for pattern in unique:
        if not isinstance(pattern, str) or not PATTERN.match(pattern):
            problems.append(
                ValidationError(
                    _("%(pattern)r is not an event name or pattern."),
                    code="invalid",
                    params={"pattern": pattern},
                )
            )
        elif not any(fnmatchcase(name, pattern) for name in declared):
            problems.append(
                ValidationError(
                    _("%(pattern)r matches no declared event."),
                    code="undeclared",
                    params={"pattern": pattern},
                )
            )
    if problems:
        raise ValidationError(problems)
    return [p for p in unique if isinstance(p, str)]


def write_alias(using: str | None, action: str) -> str:
    """The alias the routers write endpoints to; ValueError when ``using`` names another.

    Publishers, workers and ``events_relay`` read endpoints only where the routers read
    `WebhookEndpoint` (a replica of this one, or this one): an endpoint written elsewhere
    would never be sent anything.
    """
    routed = router.db_for_write(WebhookEndpoint)
    if using is not None and using != routed:
        raise ValueError(
            f"{action}(using={using!r}): webhook endpoints are where DATABASE_ROUTERS write "
            f"WebhookEndpoint, {routed!r} (publishers and workers read them only there): one "
            f"in {using!r} would never be sent anything. Leave out using, or route "
            f"WebhookEndpoint to {using!r}."
        )
    return routed


def create_endpoint(
    url: str,
    events: Sequence[str],
    *,
    secret: str | None = None,
    description: str = "",
    enabled: bool = True,
    using: str | None = None,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint from code; return it and its secret (new unless given).

    Refuses what the admin's form refuses: ValidationError (by field) for a URL it would not
    take (`check_url`, a user name or password) or events it would not take
    (`check_patterns`), ValueError for a secret that is not ``whsec_`` + base64. ``using``:
    only the alias the routers write endpoints to, the default (ValueError, `write_alias`).
    """
    alias = write_alias(using, "create_endpoint")
    if isinstance(events, str):  # a sequence of its characters
        raise TypeError(f"events is a list of names or patterns, not a string: [{events!r}]")
    endpoint = WebhookEndpoint(
        url=url, events=list(events), description=description, enabled=enabled
    )
    secret = secret or new_secret()
    set_secret(endpoint, secret)
    errors: dict[str, list[ValidationError]] = {}
    try:
        endpoint.full_clean(exclude=["secret_sealed", "secret_hint", "events"])
    except ValidationError as exc:
        errors = exc.update_error_dict(errors)
    if "url" not in errors:  # a URL at all, without a user name or password
        try:
            check_url(url)
        except ValidationError as exc:
            errors["url"] = exc.error_list
    try:
        endpoint.events = check_patterns(endpoint.events)
    except ValidationError as exc:
        errors["events"] = exc.error_list
    if errors:
        raise ValidationError(errors)
    endpoint.save(using=alias)
    return endpoint, secret


def enable(endpoints: Iterable[WebhookEndpoint], *, using: str | None = None) -> int:
    """Enable endpoints again (a fresh start: their failing time and reason are cleared).

    Enables none if the URL rules refuse the stored URL of any (saved before they applied:
    `url_refused`, E326, E327): ValidationError naming each, as its form would not save it
    enabled; give it another URL first. ``using``: only the alias the routers write
    endpoints to, the default (ValueError).
    """
    alias = write_alias(using, "enable")
    chosen = list(endpoints)
    refused = [
        f"Webhook endpoint {endpoint.pk}: {' '.join(reasons)}"
        for endpoint in chosen
        if (reasons := url_refused(endpoint))
    ]
    if refused:
        raise ValidationError(refused)
    ids = [e.pk for e in chosen]
    count = (
        WebhookEndpoint.objects.using(alias)
        .filter(pk__in=ids)
        .update(
            enabled=True,
            failing_since=None,
            disabled_at=None,
            disabled_reason="",
            updated_at=timezone.now(),
        )
    )
    forget()
    return count


def disable(endpoints: Iterable[WebhookEndpoint], *, using: str | None = None) -> int:
    """Disable endpoints by hand (nothing is sent to them; queued attempts fail, retryable).

    ``using``: only the alias the routers write endpoints to, the default (ValueError).
    """
    alias = write_alias(using, "disable")
    ids = [e.pk for e in endpoints]
    now = timezone.now()
    count = (
        WebhookEndpoint.objects.using(alias)
        .filter(pk__in=ids, enabled=True)
        .update(enabled=False, disabled_at=now, disabled_reason="", updated_at=now)
    )
    forget()
    return count


def state_of(endpoint: WebhookEndpoint) -> str:
    """``enabled``, ``failing since <time>``, ``disabled`` or ``disabled: failing too long``."""
    if not endpoint.enabled:
        return "disabled: failing too long" if endpoint.disabled_reason else "disabled"
    if endpoint.failing_since is not None:
        since = timezone.localtime(endpoint.failing_since).isoformat(timespec="seconds")
        return f"failing since {since}"
    return "enabled"


def describe(*, using: str | None = None) -> list[EndpointInfo]:
    """Every endpoint, oldest first, as the wiring page and ``events_list`` show it (raises
    DatabaseError).

    ``using``: the rows of that database (default: where the routers read endpoints, the
    only ones publishers and workers send to).
    """
    alias = using or router.db_for_read(WebhookEndpoint)
    found = []
    for endpoint in WebhookEndpoint.objects.using(alias).order_by("created_at", "pk"):
        subscription = subscription_for(endpoint, keep_row=False)
        found.append(
            EndpointInfo(
                name=subscription.name,
                url=shown_url(endpoint.url),
                events=list(subscription.patterns),
                queue=subscription.queue,
                enabled=endpoint.enabled,
                state=state_of(endpoint),
                description=endpoint.description,
                retry=asdict(subscription.retry),
                timeout=subscription.declaration.timeout,
                failing_since=endpoint.failing_since,
            )
        )
    return found


# Publishers: the enabled endpoints, per database alias, kept `refresh` seconds.


@dataclass
class _Routes:
    expires: float
    subscriptions: tuple[EndpointSubscription, ...]
    by_event: dict[str, tuple[EndpointSubscription, ...]] = field(default_factory=dict)


_routes: dict[str, _Routes] = {}
_routes_lock = threading.Lock()


def forget() -> None:
    """Drop this process's list of endpoints: the next publish reads them again."""
    _routes.clear()


def for_event(event_name: str) -> tuple[EndpointSubscription, ...]:
    """The subscriptions of the enabled endpoints that receive ``event_name`` (hot path)."""
    # Asking the routers costs more than the rest of this: only when there are some.
    alias = router.db_for_read(WebhookEndpoint) if router.routers else DEFAULT_DB_ALIAS
    routes = _routes.get(alias)
    if routes is None or routes.expires <= time.monotonic():
        routes = _load(alias)
    found = routes.by_event.get(event_name)
    if found is None:
        found = tuple(s for s in routes.subscriptions if s.receives(event_name))
        routes.by_event[event_name] = found
    return found


def _load(alias: str) -> _Routes:
    with _routes_lock:
        routes = _routes.get(alias)
        if routes is not None and routes.expires > time.monotonic():
            return routes  # another thread read them meanwhile
        try:
            rows = _read(alias)
        except DatabaseError:
            logger.exception(
                "Cannot read the webhook endpoints: none is sent to until they can be read",
                extra=log_extra(),
            )
            rows = []
        routes = _Routes(
            time.monotonic() + float(conf.WEBHOOK_ENDPOINTS["refresh"]),
            tuple(subscription_for(row, keep_row=False) for row in rows),
        )
        _routes[alias] = routes
        return routes


def _read(alias: str) -> list[WebhookEndpoint]:
    """The enabled endpoints, read inside the publisher's transaction if there is one."""
    connection = connections[alias]
    in_transaction = connection.in_atomic_block
    # A savepoint: a failed read (no table yet: migrations not run) must not break the
    # transaction it runs in.
    with transaction.atomic(using=alias):
        if in_transaction and connection.vendor == "sqlite":
            # SQLite: a transaction that reads and then writes fails at once ("database is
            # locked") when another one wrote meanwhile; one that writes first waits its turn.
            # The publisher writes next: take the write lock now, with an UPDATE of no row.
            WebhookEndpoint.objects.using(alias).filter(pk__isnull=True).update(
                enabled=F("enabled")
            )
        return list(
            WebhookEndpoint.objects.using(alias)
            .filter(enabled=True)
            .only("id", "events")
            .order_by("created_at")
        )


def subscription_for(endpoint: WebhookEndpoint, *, keep_row: bool = True) -> EndpointSubscription:
    """The subscription an endpoint stands for (with the row, for a worker's attempt)."""
    options = conf.WEBHOOK_ENDPOINTS
    name = subscription_name(endpoint.pk)
    patterns = tuple(p for p in endpoint.events or () if isinstance(p, str))
    declaration = SubscriptionDeclaration(
        name=name,
        event=" ".join(patterns),
        handler="",
        origin=Origin("webhook endpoint", f"WebhookEndpoint {endpoint.pk}"),
        mode="webhook",
        queue=options["queue"],
        timeout=float(options["timeout"]),
    )
    try:
        retry = RetryPolicy(**options["retry"])
    except TypeError:
        retry = RetryPolicy()  # a bad DEFAULT_RETRY is reported by the checks (E001)
    subscription = EndpointSubscription(
        declaration,
        retry,
        queue=options["queue"],
        endpoint_id=endpoint.pk,
        patterns=patterns,
        endpoint=endpoint if keep_row else None,
    )
    subscription.via = conf.DELIVERY
    subscription._handler = lambda event: deliver(subscription, event)
    return subscription


def enabled(*, using: str | None = None) -> list[EndpointSubscription]:
    """The subscriptions of the enabled endpoints, read now, with their rows (raises
    DatabaseError)."""
    alias = using or router.db_for_read(WebhookEndpoint)
    rows = WebhookEndpoint.objects.using(alias).filter(enabled=True).order_by("created_at")
    return [subscription_for(row) for row in rows]


def wired_since(subscription: EndpointSubscription) -> datetime:
    """Since when every publisher sends the endpoint the events its patterns match: its last
    change (created, enabled again, patterns edited: ``updated_at``) plus the ``refresh``
    seconds publishers may keep the list they read before."""
    endpoint = subscription.endpoint
    assert endpoint is not None, "a subscription read with its row (enabled(), find())"
    changed = max(endpoint.created_at, endpoint.updated_at)
    return changed + timedelta(seconds=float(conf.WEBHOOK_ENDPOINTS["refresh"]))


# Workers.


def find(name: str) -> EndpointSubscription | None:
    """The subscription of the endpoint ``name`` (``endpoint:<id>``), None if there is none.

    Reads the row (a worker's attempt, a retry, a replay); raises DatabaseError.
    """
    try:
        endpoint_id = UUID(name.removeprefix(PREFIX))
    except ValueError:
        return None
    alias = router.db_for_read(WebhookEndpoint)
    endpoint = WebhookEndpoint.objects.using(alias).filter(pk=endpoint_id).first()
    return None if endpoint is None else subscription_for(endpoint)


def deliver(subscription: EndpointSubscription, event: Event) -> webhooks.Response:
    """POST ``event`` to the endpoint, signed with its secret; keep its health."""
    endpoint = subscription.endpoint
    if endpoint is None and subscription.endpoint_id is not None:  # a publisher's: read it now
        alias = router.db_for_read(WebhookEndpoint)
        endpoint = WebhookEndpoint.objects.using(alias).filter(pk=subscription.endpoint_id).first()
    if endpoint is None:
        raise webhooks.WebhookFailed(DELETED, retry=False)
    if not endpoint.enabled:
        raise webhooks.WebhookFailed(DISABLED, retry=False)
    try:
        key = webhooks.signing_key_of(secret_of(endpoint))
    except (Unsealable, ValueError) as exc:
        error = webhooks.WebhookFailed(f"Webhook endpoint's secret is unusable: {exc}", retry=False)
        _failed(endpoint, error, event)
        raise error from exc
    timeout = subscription.declaration.timeout or webhooks.DEFAULT_TIMEOUT
    try:
        response = webhooks.send(endpoint.url, key, event, subscription, timeout)
    except webhooks.WebhookFailed as exc:
        _failed(endpoint, exc, event)
        raise
    if endpoint.failing_since is not None:
        _rows(endpoint).update(failing_since=None)
    return response


def _rows(endpoint: WebhookEndpoint) -> Any:
    alias = router.db_for_write(WebhookEndpoint)
    return WebhookEndpoint.objects.using(alias).filter(pk=endpoint.pk)


def _failed(endpoint: WebhookEndpoint, error: Exception, event: Event) -> None:
    """Note a failed attempt; disable the endpoint once it has failed for too long."""
    now = timezone.now()
    rows = _rows(endpoint)
    since = endpoint.failing_since
    if since is None:
        rows.filter(failing_since__isnull=True).update(failing_since=now)
        since = now
    limit = conf.WEBHOOK_ENDPOINTS["disable_after"]
    if limit is None or (now - since).total_seconds() < float(limit):
        return
    reason = f"Failing since {since.isoformat(timespec='seconds')}; last error: {error}"
    if not rows.filter(enabled=True).update(
        enabled=False, disabled_at=now, disabled_reason=reason, updated_at=now
    ):
        return  # disabled already (by hand, or by another worker just now)
    forget()
    name = subscription_name(endpoint.pk)
    # The id, not the URL: a URL may carry a token in its query.
    logger.warning(
        "Webhook endpoint %s disabled: %s", endpoint.pk, reason, extra=log_extra(event, name)
    )
    results = endpoint_disabled.send_robust(
        sender=WebhookEndpoint, endpoint=endpoint, reason=reason
    )
    for receiver, result in results:
        if isinstance(result, Exception):
            logger.error(
                "An endpoint_disabled receiver %r raised",
                receiver,
                exc_info=result,
                extra=log_extra(event, name),
            )
