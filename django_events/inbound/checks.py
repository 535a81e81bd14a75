"""System checks of inbound declarations (django_events.E301-E319 / W301-W319) and of
webhook sources (E312, E313, E315, W311, W312)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import apps
from django.core.checks import CheckMessage, Error, Warning
from django.urls import NoReverseMatch, reverse

from django_events.inbound.auth import standard_webhooks_verifiers
from django_events.inbound.policy import InboundPolicy, SecretNotConfigured, credentials
from django_events.wiring.registry import checked_registry

# Options that mean something only for some kinds of auth (ignored elsewhere: W302).
ONLY_FOR: dict[str, tuple[str, ...]] = {
    "secret": ("hmac", "token"),
    "tolerance": ("hmac",),
    "permission": ("permission",),
}


def check_inbound(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Secrets exist, permissions exist, options fit the auth, and the URLs are included."""
    messages: list[CheckMessage] = []
    policies = [
        (compiled, policy)
        for compiled in checked_registry().events.values()
        if (policy := InboundPolicy.of(compiled.declaration)) is not None
    ]
    for compiled, policy in policies:
        where = str(compiled.declaration.origin)
        messages += _secret(policy, where) + _permission(policy, where)
        ignored = [
            option
            for option, kinds in ONLY_FOR.items()
            if option in (compiled.declaration.inbound or {}) and policy.auth not in kinds
        ]
        if ignored:
            messages.append(
                Warning(
                    f"Event {policy.event!r}: inbound {', '.join(ignored)} "
                    f"has no effect with auth: {policy.auth}",
                    hint="Remove it, or change 'auth'.",
                    obj=where,
                    id="django_events.W302",
                )
            )
    sources = checked_registry().inbound_sources
    for declaration in sources.values():
        messages += _source_secret(
            declaration.name, declaration.auth, declaration.secret or "", str(declaration.origin)
        )
    if sources and not _urls_included(None):
        messages.append(
            Warning(
                "Sources receive webhooks but django_events.urls is not included",
                hint='Add path("events/", include("django_events.urls")) to your URLconf.',
                obj="ROOT_URLCONF",
                id="django_events.W311",
            )
        )
    if policies and not _urls_included(policies[0][1].event):
        messages.append(
            Warning(
                "Events accept inbound calls but django_events.urls is not included",
                hint='Add path("events/", include("django_events.urls")) to your URLconf.',
                obj="ROOT_URLCONF",
                id="django_events.W303",
            )
        )
    return messages


def _secret(policy: InboundPolicy, where: str) -> list[CheckMessage]:
    if policy.auth not in ONLY_FOR["secret"] or policy.secret is None:
        return []
    try:
        credentials(policy.secret)
    except SecretNotConfigured as exc:
        code, hint = (
            ("E301", f"Define settings.{exc.name} or the environment variable {exc.name}.")
            if exc.missing
            else ("E302", "Hold a string, a list of strings or a dict of caller to string.")
        )
        return [
            Error(
                f"Event {policy.event!r}: inbound secret {exc.name!r} {exc.reason}",
                hint=hint,
                obj=where,
                id=f"django_events.{code}",
            )
        ]
    return []


def _source_secret(name: str, auth: str, secret: str, where: str) -> list[CheckMessage]:
    if auth == "standard-webhooks":
        try:
            import standardwebhooks  # noqa: F401
        except ImportError:
            return [
                Error(
                    f"Source {name!r}: auth standard-webhooks needs the standardwebhooks package",
                    hint="pip install 'django-event-wiring[webhooks]'",
                    obj=where,
                    id="django_events.E315",
                )
            ]
    try:
        if auth == "standard-webhooks":
            standard_webhooks_verifiers(secret)
        else:
            credentials(secret)
    except SecretNotConfigured as exc:
        code, hint = (
            ("E312", f"Define settings.{exc.name} or the environment variable {exc.name}.")
            if exc.missing
            else ("E313", "Hold the secret the provider gave you (a list while rotating).")
        )
        return [
            Error(
                f"Source {name!r}: secret {exc.name!r} {exc.reason}",
                hint=hint,
                obj=where,
                id=f"django_events.{code}",
            )
        ]
    return _provider_format(name, auth, secret, where)


# Stripe's API keys (secret, restricted, publishable), pasted where the endpoint's signing
# secret belongs: https://docs.stripe.com/keys
STRIPE_API_KEYS = ("sk_", "rk_", "pk_")
WHSEC_SOURCES = {
    "stripe": "Stripe's signing secrets",
    "standard-webhooks": "Standard Webhooks secrets",
}


def _provider_format(name: str, auth: str, secret: str, where: str) -> list[CheckMessage]:
    """E313 for a Stripe API key, W312 for another secret without ``whsec_`` (a readable one).

    Both providers' secrets start with ``whsec_``, but their libraries take others too (the
    ``stripe`` library keys its HMAC with any text, ``standardwebhooks`` decodes bare base64):
    only an API key is certainly wrong. The value is never quoted: it is the secret.
    """
    if auth not in WHSEC_SOURCES:
        return []
    values = [value for _, value in credentials(secret)]
    api_keys = [v for v in values if auth == "stripe" and v.startswith(STRIPE_API_KEYS)]
    if api_keys:
        return [
            Error(
                f"Source {name!r}: secret {secret!r} holds a Stripe API key "
                f"({api_keys[0][:3]}...), not the endpoint's signing secret (whsec_...)",
                hint="Put the endpoint's signing secret in it instead (Dashboard -> "
                "Developers -> Webhooks, or stripe listen).",
                obj=where,
                id="django_events.E313",
            )
        ]
    if all(value.startswith("whsec_") for value in values):
        return []
    return [
        Warning(
            f"Source {name!r}: secret {secret!r} does not start with whsec_, as "
            f"{WHSEC_SOURCES[auth]} do",
            hint="Check it is the secret the provider gave you (whsec_...); calls signed "
            "with another are refused (401).",
            obj=where,
            id="django_events.W312",
        )
    ]


def _permission(policy: InboundPolicy, where: str) -> list[CheckMessage]:
    if policy.auth != "permission" or policy.permission is None:
        return []
    if policy.permission in _declared_permissions():
        return []
    return [
        Warning(
            f"Event {policy.event!r}: no model declares permission {policy.permission!r}",
            hint="Use app_label.codename of a model's default or Meta.permissions entry.",
            obj=where,
            id="django_events.W301",
        )
    ]


def _declared_permissions() -> set[str]:
    """Permissions the installed models declare (the ones migrate creates)."""
    names: set[str] = set()
    for model in apps.get_models():
        opts = model._meta
        codenames = [f"{action}_{opts.model_name}" for action in opts.default_permissions]
        codenames += [codename for codename, _ in opts.permissions]
        names.update(f"{opts.app_label}.{codename}" for codename in codenames)
    return names


def _urls_included(event: str | None) -> bool:
    """Whether the URLconf reaches the inbound endpoint (of ``event``; None: of sources)."""
    try:
        if event is None:
            reverse("django_events:source", kwargs={"source": "probe"})
        else:
            reverse("django_events:inbound", kwargs={"name": event})
    except NoReverseMatch:
        return False
    return True
