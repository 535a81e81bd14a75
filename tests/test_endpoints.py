"""Webhook endpoints registered at run time, without a worker: the admin's form and pages,
the stored secret, what publishing sends to them, the address refusal and the checks.

Deliveries through a real worker: tests/test_webhooks_delivery.py."""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.test import override_settings
from django.urls import reverse
from standardwebhooks import Webhook

from django_events import publish
from django_events.delivery import endpoints, webhooks
from django_events.delivery.sealing import Unsealable
from django_events.events import Event
from django_events.models import CREDENTIALS_REFUSED as CREDENTIALS_TEXT
from django_events.models import Delivery, WebhookEndpoint
from django_events.publishing import use_outlet
from django_events.signals import delivery_failed, endpoint_disabled

pytestmark = pytest.mark.django_db

ORDER = {"order_id": 1, "total": 9.5}
ADD = reverse("admin:django_events_webhookendpoint_add")
CHANGES = reverse("admin:django_events_webhookendpoint_changelist")
SECRET = "whsec_" + base64.b64encode(b"endpoint-secret-0123456789abcdef").decode()


@pytest.fixture
def admin_client(client, django_user_model):
    """pytest-django's, without hashing a password (a second a test on a busy machine)."""
    user = django_user_model.objects.create(username="admin", is_staff=True, is_superuser=True)
    client.force_login(user)
    return client


def change_url(endpoint: WebhookEndpoint) -> str:
    return reverse("admin:django_events_webhookendpoint_change", args=[endpoint.pk])


def form(**fields: Any) -> dict[str, Any]:
    return {
        "url": "https://hooks.example.com/in",
        "patterns": "orders.*",
        "secret": SECRET,
        "description": "CRM",
        "enabled": "on",
        **fields,
    }


def errors_of(answer: Any) -> str:
    assert answer.status_code == 200, "the form was saved"
    return answer.content.decode()


def test_the_add_form_offers_a_fresh_secret_and_stores_it_encrypted(admin_client) -> None:
    first = admin_client.get(ADD).content.decode()
    second = admin_client.get(ADD).content.decode()
    offered = re.findall(r'name="secret" value="(whsec_[^"]+)"', first + second)
    assert len(set(offered)) == 2  # a new one each time
    webhooks.signing_key_of(offered[0])

    assert admin_client.post(ADD, form(secret=offered[0])).status_code == 302

    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.events == ["orders.*"]
    assert offered[0] not in endpoint.secret_sealed
    assert endpoint.secret_hint == offered[0][:12] + "…"
    assert endpoints.secret_of(endpoint) == offered[0]
    for page in (admin_client.get(change_url(endpoint)), admin_client.get(CHANGES)):
        html = page.content.decode()
        assert offered[0] not in html and endpoint.secret_hint in html


def test_editing_keeps_the_secret_unless_a_new_one_is_given(admin_client) -> None:
    endpoint, _ = endpoints.create_endpoint(
        "https://hooks.example.com/a", ["orders.*"], secret=SECRET
    )
    html = admin_client.get(change_url(endpoint)).content.decode()
    assert 'name="secret" type="password"' in html or 'type="password" name="secret"' in html
    assert SECRET not in html

    edit = form(
        url="https://hooks.example.com/b", patterns="orders.placed, orders.shipped", secret=""
    )
    assert admin_client.post(change_url(endpoint), edit).status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.url == "https://hooks.example.com/b"
    assert endpoint.events == ["orders.placed", "orders.shipped"]
    assert endpoints.secret_of(endpoint) == SECRET

    rotated = endpoints.new_secret()
    assert admin_client.post(change_url(endpoint), form(secret=rotated)).status_code == 302
    endpoint.refresh_from_db()
    assert endpoints.secret_of(endpoint) == rotated


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"url": "http://hooks.example.com/in"}, "Refused http://hooks.example.com/: use an"),
        ({"url": "https://10.0.0.7/in"}, "https://10.0.0.7/: 10.0.0.7 is not a public address"),
        ({"url": "https://[::1]/in"}, "Refused https://[::1]/: ::1 is not a public address"),
        ({"url": "not a url"}, "Enter a valid URL."),
        ({"patterns": "nope.*"}, "&#x27;nope.*&#x27; matches no declared event."),
        ({"patterns": "orders.placed;drop"}, "is not an event name or pattern."),
        ({"patterns": " , "}, "Name at least one event or pattern."),
        ({"secret": "whsec_not base64!"}, "A secret is whsec_ followed by base64"),
        ({"secret": "c2VjcmV0LWtleQ=="}, "A secret is whsec_ followed by base64"),
        ({"secret": ""}, "This field is required."),
    ],
)
def test_the_form_refuses_what_could_never_be_delivered(admin_client, fields, error) -> None:
    html = errors_of(admin_client.post(ADD, form(**fields)))
    assert error in html
    assert not WebhookEndpoint.objects.exists()


CREDENTIALS_REFUSED = "Remove the user name and password from the URL: webhooks do not send"


@pytest.mark.parametrize(
    "url", ["https://user:pw-123@hooks.example.com/in", "https://pw-123@hooks.example.com/in"]
)
def test_a_url_with_a_user_name_or_password_is_refused(admin_client, url: str) -> None:
    """They would not be sent, and the URL is shown in the admin: refused, where to go said."""
    html = errors_of(admin_client.post(ADD, form(url=url)))
    assert CREDENTIALS_REFUSED in html
    assert not WebhookEndpoint.objects.exists()
    with pytest.raises(ValidationError) as caught:
        endpoints.create_endpoint(url, ["*"])
    assert CREDENTIALS_REFUSED in str(caught.value.message_dict["url"])
    # An @ elsewhere than before the host is no user name.
    assert admin_client.post(ADD, form(url="https://a.example.com/x@y?cc=a@b.c")).status_code == 302


def test_an_endpoint_saved_with_a_password_never_shows_it_and_is_refused_at_send(
    admin_client,
) -> None:
    endpoint, _ = endpoints.create_endpoint("https://hooks.example.com/in", ["*"])
    # Saved before such URLs were refused.
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        url="https://u:pw-123@hooks.example.com/in"
    )
    endpoint.refresh_from_db()
    assert str(endpoint) == "https://hooks.example.com/in"

    page = admin_client.get(change_url(endpoint)).content.decode()
    assert "pw-123" not in page
    assert 'value="https://***@hooks.example.com/in"' in page  # masked: saved as is, refused
    for view in ("changelist", "delete", "history"):
        args = [] if view == "changelist" else [endpoint.pk]
        other = admin_client.get(reverse(f"admin:django_events_webhookendpoint_{view}", args=args))
        assert other.status_code == 200 and "pw-123" not in other.content.decode()
    edit = form(url="https://***@hooks.example.com/in", secret="")
    assert CREDENTIALS_REFUSED in errors_of(admin_client.post(change_url(endpoint), edit))

    subscription = endpoints.find(endpoints.subscription_name(endpoint.pk))
    assert subscription is not None
    with pytest.raises(webhooks.WebhookFailed, match="has a user name or password") as caught:
        subscription.handler()(_event())
    assert caught.value.retry is False

    assert admin_client.post(change_url(endpoint), form(secret="")).status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.url == "https://hooks.example.com/in"


@pytest.mark.parametrize("url", ["http://hooks.example.com/in", "https://127.0.0.1:8443/in"])
def test_an_endpoint_saved_with_a_url_refused_now_can_be_edited_disabled_and_deleted(
    admin_client, url: str
) -> None:
    """Saved before create_endpoint() applied the form's rules (E327): its page opens, it can
    be given another URL, disabled (the action, or its form keeping the URL) and deleted."""
    refused = "Refused " + url.removesuffix("in")
    endpoint, _ = endpoints.create_endpoint("https://hooks.example.com/in", ["orders.*"])
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(url=url)
    page = admin_client.get(change_url(endpoint))
    assert page.status_code == 200 and f'value="{url}"' in page.content.decode()
    assert admin_client.get(CHANGES).status_code == 200

    kept = form(url=url, secret="", description="renamed")
    assert refused in errors_of(admin_client.post(change_url(endpoint), kept))  # still enabled
    disabled = {k: v for k, v in kept.items() if k != "enabled"}
    assert admin_client.post(change_url(endpoint), disabled).status_code == 302
    endpoint.refresh_from_db()
    assert (endpoint.url, endpoint.enabled, endpoint.description) == (url, False, "renamed")
    # Enabled again, or given another refused URL, it must pass the rules.
    assert refused in errors_of(admin_client.post(change_url(endpoint), kept))
    other = {**disabled, "url": url.replace("/in", "/other")}
    assert refused in errors_of(admin_client.post(change_url(endpoint), other))

    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(enabled=True)
    action = {"action": "disable_selected", "_selected_action": [str(endpoint.pk)]}
    assert admin_client.post(CHANGES, action).status_code == 302
    endpoint.refresh_from_db()
    assert not endpoint.enabled
    fixed = form(url="https://hooks.example.com/fixed", secret="")
    assert admin_client.post(change_url(endpoint), fixed).status_code == 302
    endpoint.refresh_from_db()
    assert (endpoint.url, endpoint.enabled) == ("https://hooks.example.com/fixed", True)

    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(url=url)
    delete = reverse("admin:django_events_webhookendpoint_delete", args=[endpoint.pk])
    assert admin_client.get(delete).status_code == 200
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not WebhookEndpoint.objects.exists()


def test_private_addresses_are_accepted_when_allowed(admin_client) -> None:
    with override_settings(
        DJANGO_EVENTS={**settings.DJANGO_EVENTS, "WEBHOOKS_ALLOW_PRIVATE": True}
    ):
        answer = admin_client.post(ADD, form(url="http://127.0.0.1:8000/in"))
    assert answer.status_code == 302


HTTPS_ONLY = "use an https:// URL (http:// only with DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] on)."
NOT_PUBLIC = (
    "is not a public address (private, loopback, link-local and reserved ones only with "
    "DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] on)."
)
HTTP_OR_HTTPS = "use an https:// or http:// URL (webhooks use no other)."


@pytest.mark.parametrize(
    ("allow_private", "url", "refused"),
    [
        (False, "https://hooks.example.com/in?token=t-123", None),
        (False, "https://hooks.intranet.example/in", None),  # a name: checked as it resolves
        (False, "https://8.8.8.8/in", None),
        (False, "http://hooks.example.com/in", f"Refused http://hooks.example.com/: {HTTPS_ONLY}"),
        (False, "ftp://hooks.example.com/in", f"Refused ftp://hooks.example.com/: {HTTPS_ONLY}"),
        (False, "https://10.0.0.7/p/t-123", f"Refused https://10.0.0.7/: 10.0.0.7 {NOT_PUBLIC}"),
        (
            False,
            "https://127.0.0.1:8443/",
            f"Refused https://127.0.0.1:8443/: 127.0.0.1 {NOT_PUBLIC}",
        ),
        (
            False,
            "https://169.254.169.254/latest",
            f"Refused https://169.254.169.254/: 169.254.169.254 {NOT_PUBLIC}",
        ),
        (False, "https://[::1]/in", f"Refused https://[::1]/: ::1 {NOT_PUBLIC}"),
        (
            False,
            "https://[::ffff:127.0.0.1]/",
            f"Refused https://[::ffff:127.0.0.1]/: ::ffff:127.0.0.1 {NOT_PUBLIC}",
        ),
        (
            False,
            "https://localhost:8000/in",
            f"Refused https://localhost:8000/: localhost {NOT_PUBLIC}",
        ),
        (
            False,
            "https://api.localhost/in",
            f"Refused https://api.localhost/: api.localhost {NOT_PUBLIC}",
        ),
        (  # a fully qualified name: its trailing dot, case
            False,
            "https://api.localhost./in",
            f"Refused https://api.localhost./: api.localhost {NOT_PUBLIC}",
        ),
        (
            False,
            "https://Hooks.LOCALHOST./in",
            f"Refused https://hooks.localhost./: hooks.localhost {NOT_PUBLIC}",
        ),
        (False, "https://LOCALHOST/in", f"Refused https://localhost/: localhost {NOT_PUBLIC}"),
        (False, "https://localhost./in", "Enter a valid URL."),  # Django's URL rules
        (True, "http://127.0.0.1:8000/in", None),
        (True, "https://localhost/in", None),
        (True, "http://10.0.0.7/in", None),
        (True, "ftp://hooks.example.com/in", f"Refused ftp://hooks.example.com/: {HTTP_OR_HTTPS}"),
        (True, "ftps://10.0.0.7/in", f"Refused ftps://10.0.0.7/: {HTTP_OR_HTTPS}"),
    ],
)
def test_the_form_and_create_endpoint_refuse_the_same_urls(
    admin_client, allow_private: bool, url: str, refused: str | None
) -> None:
    """One set of rules (`endpoints.check_url`): what the form refuses, code cannot register
    (it would fail at each attempt, or be sent to a private address once allowed); the
    message names the URL (never its path or query) and the rule."""
    value = {**settings.DJANGO_EVENTS, "WEBHOOKS_ALLOW_PRIVATE": allow_private}
    with override_settings(DJANGO_EVENTS=value):
        answer = admin_client.post(ADD, form(url=url))
        if refused is None:
            assert answer.status_code == 302, answer.content.decode()
            endpoint, _ = endpoints.create_endpoint(url, ["*"])
            assert endpoint.url == url
            assert WebhookEndpoint.objects.filter(url=url).count() == 2
            return
        assert html.escape(refused) in errors_of(answer)
        with pytest.raises(ValidationError) as caught:
            endpoints.create_endpoint(url, ["*"])
    assert caught.value.message_dict == {"url": [refused]}
    assert not WebhookEndpoint.objects.exists()


def test_create_endpoint_names_each_field_refused() -> None:
    """Like the form: the URL's rule and the other fields' errors together."""
    with pytest.raises(ValidationError) as caught:
        endpoints.create_endpoint("https://10.0.0.7/", ["*"], description="x" * 501)
    errors = caught.value.message_dict
    assert errors["url"] == [f"Refused https://10.0.0.7/: 10.0.0.7 {NOT_PUBLIC}"]
    assert set(errors) == {"description", "url"}
    with pytest.raises(ValidationError) as caught:  # not a URL: not the scheme's rule too
        endpoints.create_endpoint("not a url", ["*"])
    assert caught.value.message_dict == {"url": ["Enter a valid URL."]}


@pytest.mark.parametrize(
    ("patterns", "refused"),
    [
        (["nope.*"], ["'nope.*' matches no declared event."]),
        (["orders.placed;drop"], ["'orders.placed;drop' is not an event name or pattern."]),
        ([""], ["'' is not an event name or pattern."]),
        ([1], ["1 is not an event name or pattern."]),
        ([], ["Name at least one event or pattern."]),
        (
            ["orders.*", "nope.*", "nope.*", None],
            ["'nope.*' matches no declared event.", "None is not an event name or pattern."],
        ),
    ],
)
def test_create_endpoint_refuses_the_patterns_the_form_refuses(
    admin_client, patterns: list[Any], refused: list[str]
) -> None:
    """One set of rules (`endpoints.check_patterns`): a pattern the form refuses, code cannot
    register either (one matching nothing receives nothing; a non-string one was dropped
    silently); the error names each pattern and its rule."""
    with pytest.raises(ValidationError) as caught:
        endpoints.create_endpoint("https://a.example.com/", patterns)
    assert caught.value.message_dict == {"events": refused}
    assert not WebhookEndpoint.objects.exists()
    typed = ", ".join(p for p in patterns if isinstance(p, str) and p) or " , "
    if all(isinstance(p, str) and p for p in patterns):  # what the form's text can hold
        page = errors_of(admin_client.post(ADD, form(patterns=typed)))
        assert all(html.escape(message) in page for message in refused), page


def test_create_endpoint_stores_each_pattern_once() -> None:
    endpoint, _ = endpoints.create_endpoint(
        "https://a.example.com/", ["orders.*", "orders.placed", "orders.*"]
    )
    endpoint.refresh_from_db()
    assert endpoint.events == ["orders.*", "orders.placed"]
    with pytest.raises(TypeError, match=r"not a string: \['orders\.\*'\]"):
        endpoints.create_endpoint("https://a.example.com/", "orders.*")  # type: ignore[arg-type]


URL_HELP = {
    False: "Where each event is POSTed: an https:// URL of a public address.",
    True: "Where each event is POSTed: an https:// or http:// URL, of any address "
    "(DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] is on).",
}


@pytest.mark.parametrize("allow_private", [False, True])
def test_the_url_help_text_says_what_the_form_accepts(admin_client, allow_private) -> None:
    value = {**settings.DJANGO_EVENTS, "WEBHOOKS_ALLOW_PRIVATE": allow_private}
    with override_settings(DJANGO_EVENTS=value):
        assert URL_HELP[allow_private] in admin_client.get(ADD).content.decode()
        plain = admin_client.post(ADD, form(url="http://10.0.0.7/in"))
    assert (plain.status_code == 302) is allow_private


@pytest.mark.parametrize("allow_private", [False, True])
def test_the_form_refuses_ftp_whatever_the_setting(admin_client, allow_private) -> None:
    """Only http(s) is ever sent (webhooks.post); Django's URLField also takes ftp(s)://."""
    value = {**settings.DJANGO_EVENTS, "WEBHOOKS_ALLOW_PRIVATE": allow_private}
    with override_settings(DJANGO_EVENTS=value):
        for url in ("ftp://hooks.example.com/in", "ftps://hooks.example.com/in"):
            html = errors_of(admin_client.post(ADD, form(url=url)))
            use = "use an https:// or http:// URL" if allow_private else "use an https:// URL"
            assert f"Refused {url.removesuffix('in')}: {use}" in html
    assert not WebhookEndpoint.objects.exists()


def test_enable_and_disable_actions(admin_client) -> None:
    endpoint, _ = endpoints.create_endpoint("https://hooks.example.com/a", ["*"])
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        enabled=False,
        failing_since=datetime.now(tz=UTC) - timedelta(days=6),
        disabled_at=datetime.now(tz=UTC),
        disabled_reason="Failing since ...; last error: HTTP 500",
    )
    html = admin_client.get(CHANGES).content.decode()
    assert "disabled: failing too long" in html
    assert (
        "Failing since ...; last error: HTTP 500"
        in admin_client.get(change_url(endpoint)).content.decode()
    )

    action = {"action": "enable_selected", "_selected_action": [str(endpoint.pk)]}
    admin_client.post(CHANGES, action)
    endpoint.refresh_from_db()
    assert endpoint.enabled and endpoint.failing_since is None and not endpoint.disabled_reason

    admin_client.post(CHANGES, {**action, "action": "disable_selected"})
    endpoint.refresh_from_db()
    assert not endpoint.enabled and endpoint.disabled_at is not None


def test_enable_selected_refuses_an_endpoint_whose_stored_url_is_refused_now(
    admin_client,
) -> None:
    """Saved before the URL rules (E326, E327), disabled since: "Enable selected" enables the
    others and says which it left and why, as the endpoint's form refuses the URL."""
    made = {}
    for url, description in (
        ("https://10.0.0.7/p/t-123", "CRM"),
        ("https://u:pw@hooks.example.com/in", ""),
        ("https://hooks.example.com/fine", "fine"),
        ("http://hooks.example.com/in?token=t-123", "plain"),  # enabled: E327 already
    ):
        endpoint, _ = endpoints.create_endpoint("https://hooks.example.com/in", ["*"])
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
            url=url, description=description, enabled=description == "plain"
        )
        made[description] = endpoint.pk
    action = {"action": "enable_selected", "_selected_action": [str(pk) for pk in made.values()]}

    page = admin_client.post(CHANGES, action, follow=True).content.decode()

    enabled = dict(WebhookEndpoint.objects.values_list("description", "enabled"))
    assert enabled == {"CRM": False, "": False, "fine": True, "plain": True}
    shown = [
        html.unescape(m) for m in re.findall(r'<li class="(?:error|success)">(.*?)</li>', page)
    ]
    assert sorted(shown) == sorted(
        [
            "1 endpoint enabled; retry its failed deliveries from the failures page.",
            f"Webhook endpoint {made['CRM']} ('CRM') stays disabled: Refused https://10.0.0.7/: "
            f"10.0.0.7 {NOT_PUBLIC} Give it another URL on its page first.",
            f"Webhook endpoint {made['']} stays disabled: {CREDENTIALS_TEXT} Give it another "
            "URL on its page first.",
            f"Webhook endpoint {made['plain']} ('plain') is enabled, but its URL is refused "
            f"(E327): Refused http://hooks.example.com/: {HTTPS_ONLY} Give it another URL on "
            "its page, or disable it.",
        ]
    )
    assert "t-123" not in page and "pw@" not in page


def test_enable_refuses_an_endpoint_whose_stored_url_is_refused_now_and_enables_none() -> None:
    """The function "Enable selected" calls: what its form and create_endpoint refuse, it
    refuses too, naming each endpoint, before it enables any."""
    fine, _ = endpoints.create_endpoint("https://hooks.example.com/fine", ["*"], enabled=False)
    old, _ = endpoints.create_endpoint("https://hooks.example.com/in", ["*"], enabled=False)
    WebhookEndpoint.objects.filter(pk=old.pk).update(url="https://10.0.0.7/p/t-123")
    old.refresh_from_db()

    with pytest.raises(ValidationError) as caught:
        endpoints.enable([fine, old])

    assert caught.value.messages == [
        f"Webhook endpoint {old.pk}: Refused https://10.0.0.7/: 10.0.0.7 {NOT_PUBLIC}"
    ]
    assert not WebhookEndpoint.objects.filter(enabled=True).exists()
    assert endpoints.enable([fine]) == 1


def test_the_failures_page_filters_by_endpoint(admin_client) -> None:
    endpoint, _ = endpoints.create_endpoint("https://hooks.example.com/a", ["*"])
    html = admin_client.get(change_url(endpoint)).content.decode()
    failures = reverse("admin:django_events_failure_changelist")
    link = f"{failures}?subscription=endpoint:{endpoint.pk}"
    assert link in html
    assert admin_client.get(link).status_code == 200
    assert f"endpoint:{endpoint.pk}" in admin_client.get(failures).content.decode()


def test_a_user_without_the_permission_cannot_add_or_act(client, django_user_model) -> None:
    user = django_user_model.objects.create(username="viewer", is_staff=True)
    client.force_login(user)
    assert client.get(ADD).status_code == 403
    assert client.post(ADD, form()).status_code == 403
    assert not WebhookEndpoint.objects.exists()


def published(name: str, payload: dict[str, Any]) -> list[Any]:
    """What ``publish()`` hands on (one Outgoing an event), nothing sent."""
    batches: list[Any] = []
    with use_outlet(capture=lambda batch, alias: batches.extend(batch)):
        publish(name, payload)
    return batches


def test_publishing_sends_one_delivery_per_enabled_matching_endpoint() -> None:
    every, _ = endpoints.create_endpoint("https://a.example.com/", ["*"])
    placed, _ = endpoints.create_endpoint("https://b.example.com/", ["orders.placed"])
    endpoints.create_endpoint("https://c.example.com/", ["orders.shipped"])
    endpoints.create_endpoint("https://d.example.com/", ["*"], enabled=False)

    (item,) = published("orders.placed", ORDER)

    hooks = [s for s in item.async_ if s.name.startswith("endpoint:")]
    assert sorted(s.name for s in hooks) == sorted(
        [f"endpoint:{every.pk}", f"endpoint:{placed.pk}"]
    )
    assert {(s.mode, s.queue) for s in hooks} == {
        ("webhook", settings.DJANGO_EVENTS.get("DEFAULT_QUEUE", "django_events"))
    }
    assert item.recorded  # pending until the broker takes it (the outbox)


class EndpointsOnOther:
    """A router that keeps webhook endpoints (only them) on "other"."""

    def db_for_read(self, model: type, **hints: object) -> str | None:
        return "other" if model is WebhookEndpoint else None

    db_for_write = db_for_read


def hooked(name: str) -> list[str]:
    (item,) = published(name, ORDER)
    return [s.name for s in item.async_ if endpoints.is_endpoint_name(s.name)]


@pytest.mark.django_db(databases=["default", "other"])
def test_endpoints_are_written_only_where_the_routers_keep_them() -> None:
    """Publishers, workers and events_relay read endpoints only where the routers read
    WebhookEndpoint: one written elsewhere (``using=``) would be sent nothing, silently."""
    refused = (
        "{action}(using={using!r}): webhook endpoints are where DATABASE_ROUTERS write "
        "WebhookEndpoint, {routed!r} (publishers and workers read them only there): one in "
        "{using!r} would never be sent anything. Leave out using, or route WebhookEndpoint "
        "to {using!r}."
    )
    message = refused.format(action="create_endpoint", using="other", routed="default")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        endpoints.create_endpoint("https://a.example.com/", ["*"], using="other")
    assert not WebhookEndpoint.objects.using("other").exists()

    endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["*"], using="default")
    assert hooked("orders.placed") == [endpoints.subscription_name(endpoint.pk)]
    for action in (endpoints.disable, endpoints.enable):
        message = refused.format(action=action.__name__, using="other", routed="default")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            action([endpoint], using="other")
    assert endpoints.disable([endpoint], using="default") == 1
    assert hooked("orders.placed") == []
    assert endpoints.enable([endpoint]) == 1

    with override_settings(DATABASE_ROUTERS=[EndpointsOnOther()]):
        endpoints.forget()
        with pytest.raises(ValueError, match=r"^create_endpoint\(using='default'\)"):
            endpoints.create_endpoint("https://b.example.com/", ["*"], using="default")
        routed, _ = endpoints.create_endpoint("https://b.example.com/", ["*"], using="other")
        assert hooked("orders.placed") == [endpoints.subscription_name(routed.pk)]
        assert [e.name for e in endpoints.describe()] == [endpoints.subscription_name(routed.pk)]
        assert endpoints.disable([routed]) == 1
    endpoints.forget()


def test_a_change_in_this_process_is_seen_at_once_others_after_refresh() -> None:
    assert endpoints.for_event("orders.placed") == ()
    endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["orders.*"])
    assert [s.endpoint_id for s in endpoints.for_event("orders.placed")] == [endpoint.pk]
    # Another process's change (no signal here) waits for `refresh` seconds.
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(enabled=False)
    assert endpoints.for_event("orders.placed") != ()
    endpoints.forget()
    assert endpoints.for_event("orders.placed") == ()


def test_an_unreadable_endpoint_table_never_breaks_a_publish(caplog) -> None:
    unreadable = mock.patch.object(
        WebhookEndpoint.objects, "using", side_effect=DatabaseError("no such table")
    )
    with caplog.at_level(logging.ERROR, "django_events.endpoints"), unreadable:
        (item,) = published("orders.placed", ORDER)
    assert not [s for s in item.async_ if s.name.startswith("endpoint:")]
    assert "Cannot read the webhook endpoints" in caplog.text


def _event() -> Event:
    return Event(
        id=uuid.uuid4(),
        name="orders.placed",
        payload=ORDER,
        headers={},
        occurred_at=datetime.now(tz=UTC),
        correlation_id=uuid.uuid4(),
        causation_id=None,
        data=ORDER,
    )


@pytest.mark.parametrize("url", ["https://127.0.0.1:9/in", "https://169.254.169.254/latest"])
def test_a_private_address_is_refused_at_send_and_counts_as_a_failure(url: str) -> None:
    endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["*"])
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(url=url)  # e.g. allowed, then not
    subscription = endpoints.find(endpoints.subscription_name(endpoint.pk))
    assert subscription is not None

    with pytest.raises(webhooks.WebhookFailed, match="not a public address") as caught:
        subscription.handler()(_event())

    assert caught.value.retry is False
    endpoint.refresh_from_db()
    assert endpoint.failing_since is not None and endpoint.enabled


def test_disabled_after_failing_long_enough_once_with_the_signal() -> None:
    endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["*"])
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        url="https://127.0.0.1:9/in",  # refused at each attempt (saved when it was allowed)
        failing_since=datetime.now(tz=UTC) - timedelta(days=5, seconds=1),
    )
    received: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        received.append(kwargs)

    endpoint_disabled.connect(receiver)
    try:
        for _ in range(2):
            subscription = endpoints.find(endpoints.subscription_name(endpoint.pk))
            assert subscription is not None
            with pytest.raises(webhooks.WebhookFailed):
                subscription.handler()(_event())
    finally:
        endpoint_disabled.disconnect(receiver)

    endpoint.refresh_from_db()
    assert not endpoint.enabled
    assert "not a public address" in endpoint.disabled_reason
    (sent,) = received  # the second attempt found it disabled: no second signal
    assert sent["sender"] is WebhookEndpoint and sent["endpoint"].pk == endpoint.pk
    assert sent["reason"] == endpoint.disabled_reason


def test_never_disabled_with_disable_after_none() -> None:
    endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["*"])
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        url="https://127.0.0.1:9/in", failing_since=datetime.now(tz=UTC) - timedelta(days=365)
    )
    value = {**settings.DJANGO_EVENTS, "WEBHOOK_ENDPOINTS": {"disable_after": None}}
    with override_settings(DJANGO_EVENTS=value):
        subscription = endpoints.find(endpoints.subscription_name(endpoint.pk))
        assert subscription is not None
        with pytest.raises(webhooks.WebhookFailed):
            subscription.handler()(_event())
    endpoint.refresh_from_db()
    assert endpoint.enabled


def test_secrets_are_bound_to_their_endpoint_and_to_secret_key() -> None:
    one, secret = endpoints.create_endpoint("https://a.example.com/", ["*"])
    two, _ = endpoints.create_endpoint("https://b.example.com/", ["*"])
    two.secret_sealed = one.secret_sealed  # a row's secret copied to another does not open
    with pytest.raises(Unsealable):
        endpoints.secret_of(two)
    with override_settings(
        SECRET_KEY="rotated-" + "x" * 50, SECRET_KEY_FALLBACKS=[settings.SECRET_KEY]
    ):
        assert endpoints.secret_of(one) == secret
    with override_settings(SECRET_KEY="another-" + "x" * 50), pytest.raises(Unsealable):
        endpoints.secret_of(one)


def test_create_endpoint_checks_its_input() -> None:
    with pytest.raises(ValueError, match="base64"):
        endpoints.create_endpoint("https://a.example.com/", ["*"], secret="whsec_!!")
    with pytest.raises(ValueError, match="whsec_"):  # base64 alone: not the documented format
        endpoints.create_endpoint("https://a.example.com/", ["*"], secret="c2VjcmV0LWtleQ==")
    with pytest.raises(ValidationError):
        endpoints.create_endpoint("not a url", ["*"])


def test_the_signature_verifies_with_the_standardwebhooks_library() -> None:
    endpoint, secret = endpoints.create_endpoint("https://a.example.com/", ["*"])
    key = webhooks.signing_key_of(endpoints.secret_of(endpoint))
    body, now = b'{"type": "x"}', int(datetime.now(tz=UTC).timestamp())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": webhooks.sign(key, "msg_1", now, body),
    }
    assert Webhook(secret).verify(body, headers) == {"type": "x"}


@pytest.mark.django_db(transaction=True)  # the worker's code closes stale connections
def test_retry_and_replay_name_an_endpoint_and_reach_a_real_receiver(publish_now, queue) -> None:
    """events_retry and events_replay by an endpoint's name; the worker's own code (in this
    process) posts to a receiver on 127.0.0.1 that verifies with the standardwebhooks library."""
    from django.core.management import call_command

    from tests.ops import shop_wiring, work
    from tests.webhook_receiver import Receiver

    with Receiver(SECRET) as receiver, shop_wiring(queue, WEBHOOKS_ALLOW_PRIVATE=True):
        endpoint, _ = endpoints.create_endpoint(receiver.url("ok"), ["shop.*"], secret=SECRET)
        name = endpoints.subscription_name(endpoint.pk)
        event = publish_now("shop.paid", {"order_id": 1})
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(enabled=False)
        work(queue)
        failed = Delivery.objects.get(event_id=event.id, subscription=name)
        # Nothing was sent: no attempt counted (attempts count the sender's runs).
        assert (failed.status, failed.mode, failed.attempts) == ("failed", "webhook", 0)
        assert failed.last_error == (
            "WebhookFailed: Webhook endpoint disabled: enable it, then retry this delivery"
        )
        endpoints.enable([endpoint])

        out = StringIO()
        call_command("events_retry", "--subscription", name, stdout=out)
        assert "1 re-enqueued for a worker" in out.getvalue()
        work(queue)
        call_command("events_replay", name, "--event", "shop.paid", stdout=out)
        work(queue)

        calls = receiver.of("ok")
    row = Delivery.objects.get(event_id=event.id, subscription=name)
    assert (row.status, row.attempts, row.response_status) == ("succeeded", 2, 200)
    assert len(calls) == 2 and all(c.verified for c in calls)
    assert calls[0].headers["webhook-id"] == calls[1].headers["webhook-id"]


def test_the_relay_sends_a_pending_record_to_the_endpoints(queue) -> None:
    """An event whose broker was down at commit reaches the endpoints through the relay."""
    from django_events.models import EventRecord
    from django_events.operations.relay import relay_pending
    from tests.ops import drain

    endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["shop.paid"])
    record = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.paid",
        payload={"order_id": 1},
        correlation_id=uuid.uuid4(),
        occurred_at=datetime.now(tz=UTC) - timedelta(minutes=1),
    )

    assert relay_pending().sent == 1

    sent = {m["subscription"] for m in drain(queue) if m["event"]["id"] == str(record.pk)}
    assert endpoints.subscription_name(endpoint.pk) in sent


def test_bad_endpoint_settings_and_names_are_reported() -> None:
    from tests.conftest import wiring
    from tests.test_checks import assert_reported

    with wiring(WEBHOOK_ENDPOINTS={"timeout": 0, "every": 1}):
        assert_reported(
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['WEBHOOK_ENDPOINTS'] is invalid: $ Additional properties are not "
                "allowed ('every' was unexpected)",
            ),
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['WEBHOOK_ENDPOINTS'] is invalid: ['timeout'] 0 is less than or "
                "equal to the minimum of 0",
            ),
        )
    taken = {"event": "orders.placed", "handler": "tests.app.handlers.record", "name": "endpoint:1"}
    with wiring(taken):
        assert_reported(
            (
                "django_events.E323",
                "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
                "Subscription 'endpoint:1': names starting 'endpoint:' belong to webhook endpoints",
            )
        )


@pytest.mark.django_db(transaction=True)  # the worker's code closes stale connections
def test_pausing_an_endpoint_holds_its_deliveries_and_resuming_sends_them(
    publish_now, queue
) -> None:
    """events_pause / events_resume by an endpoint's name; the worker's own code (in this
    process) holds, then posts to a receiver on 127.0.0.1."""
    from django.core.management import call_command

    from tests.ops import shop_wiring, work
    from tests.webhook_receiver import Receiver

    with Receiver(SECRET) as receiver, shop_wiring(queue, WEBHOOKS_ALLOW_PRIVATE=True):
        endpoint, _ = endpoints.create_endpoint(receiver.url("ok"), ["shop.*"], secret=SECRET)
        name = endpoints.subscription_name(endpoint.pk)
        out = StringIO()
        call_command("events_pause", name, stdout=out)
        assert f"Paused {name!r}" in out.getvalue()
        paid = [publish_now("shop.paid", {"order_id": n}) for n in (1, 2)]

        outcomes = work(queue)

        assert sorted(o.status for o in outcomes).count("held") == 2
        held = Delivery.objects.filter(subscription=name)
        assert sorted(held.values_list("event_id", "status", "mode")) == sorted(
            (e.id, "held", "webhook") for e in paid
        )
        assert receiver.of("ok") == []

        call_command("events_resume", name, stdout=out)
        assert "Held deliveries: 2 re-enqueued for a worker" in out.getvalue()
        work(queue)

        calls = receiver.of("ok")
    rows = Delivery.objects.filter(subscription=name)
    assert set(rows.values_list("status", "attempts", "response_status")) == {("succeeded", 1, 200)}
    assert len(calls) == 2 and all(c.verified for c in calls)
    assert {c.json["data"]["order_id"] for c in calls} == {1, 2}


def test_pause_names_an_existing_endpoint_and_deleting_one_fails_what_it_had_waiting(
    publish_now, admin_client, django_capture_on_commit_callbacks
) -> None:
    from django.core.management import CommandError, call_command

    from django_events.delivery.recording import delivery, save_deliveries
    from django_events.models import Delivery, PausedSubscription
    from django_events.operations.pausing import PauseError, resume

    missing = endpoints.subscription_name(uuid.uuid4())
    for name in (missing, "endpoint:not-a-uuid"):
        with pytest.raises(CommandError, match="no such webhook endpoint"):
            call_command("events_pause", name)
    endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["shop.*"])
    other, _ = endpoints.create_endpoint("https://b.example.com/", ["shop.*"])
    name, kept = endpoints.subscription_name(endpoint.pk), endpoints.subscription_name(other.pk)
    call_command("events_pause", name, stdout=StringIO())
    held, waiting, done = (publish_now("shop.paid", {"order_id": n}) for n in (1, 2, 3))
    save_deliveries(  # as workers write them: held while paused, a retry waiting, a success
        "default",
        [
            delivery(held.id, name, "webhook", "held", 0),
            delivery(waiting.id, name, "webhook", "pending", 1, "HTTP 503"),
            delivery(done.id, name, "webhook", "succeeded", 1),
            delivery(held.id, kept, "webhook", "pending", 1, "HTTP 503"),
        ],
    )

    signalled: list[uuid.UUID] = []

    def note(sender: Any, **kwargs: Any) -> None:
        signalled.append(kwargs["event_id"])

    delivery_failed.connect(note)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            answer = admin_client.post(
                reverse("admin:django_events_webhookendpoint_delete", args=[endpoint.pk]),
                {"post": "yes"},
            )
    finally:
        delivery_failed.disconnect(note)

    assert answer.status_code == 302
    # The held one's: nothing runs it any more. The pending retry's comes from the worker
    # when its message does (once, not twice).
    assert signalled == [held.id]
    rows = {(d.event_id, d.subscription): (d.status, d.last_error) for d in Delivery.objects.all()}
    # Nothing can deliver them any more: failures, as a worker records a message of it.
    assert rows[(held.id, name)] == ("failed", "Webhook endpoint deleted")
    assert rows[(waiting.id, name)] == ("failed", "Webhook endpoint deleted")
    assert rows[(done.id, name)] == ("succeeded", "")
    assert rows[(held.id, kept)] == ("pending", "HTTP 503")  # another endpoint's: untouched
    assert not PausedSubscription.objects.exists()
    with pytest.raises(PauseError, match="Unknown subscription"):
        resume(name)


class EndpointsApart:
    """A router that keeps webhook endpoints on "default" and the rest of the event log
    (events, deliveries, pauses) on "other"."""

    def db_for_read(self, model: type, **hints: object) -> str | None:
        if model._meta.app_label != "django_events":  # type: ignore[attr-defined]
            return None
        return "default" if model is WebhookEndpoint else "other"

    db_for_write = db_for_read


def _waiting_on_other(name: str) -> list[uuid.UUID]:
    """A held and a pending delivery of subscription ``name``, on "other"; their events."""
    from django_events.delivery.recording import delivery, save_deliveries

    held, waiting = (publish("shop.paid", {"order_id": n}) for n in (1, 2))
    save_deliveries(
        "other",
        [
            delivery(held.id, name, "webhook", "held", 0),
            delivery(waiting.id, name, "webhook", "pending", 1, "HTTP 503"),
        ],
    )
    return [held.id, waiting.id]


@pytest.mark.django_db(databases=["default", "other"])
@pytest.mark.parametrize("how", ["admin", "instance", "queryset"])
def test_deleting_an_endpoint_fails_what_it_had_waiting_where_the_routers_keep_the_event_log(
    admin_client, django_capture_on_commit_callbacks, queue, how: str
) -> None:
    """Endpoints on one database, the event log on another: the deletion (the admin's,
    ``endpoint.delete()``, a QuerySet's) records the endpoint's held and pending deliveries
    failed and removes its pause there, not on the endpoint's database."""
    from django_events.models import PausedSubscription
    from django_events.operations.pausing import pause

    with override_settings(DATABASE_ROUTERS=[EndpointsApart()]):
        endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["shop.*"])
        name = endpoints.subscription_name(endpoint.pk)
        pause(name)
        waiting = _waiting_on_other(name)
        with django_capture_on_commit_callbacks(execute=True, using="default"):
            if how == "admin":
                delete = reverse("admin:django_events_webhookendpoint_delete", args=[endpoint.pk])
                assert admin_client.post(delete, {"post": "yes"}).status_code == 302
            elif how == "instance":
                endpoint.delete()
            else:
                WebhookEndpoint.objects.filter(pk=endpoint.pk).delete()

    assert not WebhookEndpoint.objects.using("default").exists()
    rows = Delivery.objects.using("other").filter(subscription=name)
    assert sorted(rows.values_list("event_id", "status", "last_error")) == sorted(
        (event_id, "failed", "Webhook endpoint deleted") for event_id in waiting
    )
    assert not PausedSubscription.objects.using("other").exists()


@pytest.mark.django_db(databases=["default", "other"])
def test_an_endpoint_deletion_rolled_back_leaves_the_event_log_of_another_database(
    django_capture_on_commit_callbacks, queue
) -> None:
    """On another database the event log is not in the deletion's transaction: its rows are
    recorded failed once the deletion commits, never for one rolled back."""
    from django.db import transaction

    from django_events.models import PausedSubscription
    from django_events.operations.pausing import pause

    with override_settings(DATABASE_ROUTERS=[EndpointsApart()]):
        endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["shop.*"])
        name = endpoints.subscription_name(endpoint.pk)
        pause(name)
        _waiting_on_other(name)
        committed = django_capture_on_commit_callbacks(execute=True, using="default")
        with committed, pytest.raises(RuntimeError), transaction.atomic(using="default"):
            WebhookEndpoint.objects.filter(pk=endpoint.pk).delete()
            raise RuntimeError("rolled back")

    assert WebhookEndpoint.objects.using("default").filter(pk=endpoint.pk).exists()
    rows = Delivery.objects.using("other").filter(subscription=name)
    assert sorted(rows.values_list("status", flat=True)) == ["held", "pending"]
    assert PausedSubscription.objects.using("other").filter(subscription=name).exists()


# -- endpoints in the wiring: events_list and the wiring page ------------------------------

HIDDEN_URL = "https://ops:pw-123@hooks.example.com:8443/T0123/path-token?token=query-token"


def three_endpoints() -> tuple[WebhookEndpoint, WebhookEndpoint, WebhookEndpoint]:
    """One enabled (paused), one failing, one disabled for failing too long."""
    crm, _ = endpoints.create_endpoint(
        HIDDEN_URL.replace("ops:pw-123@", ""), ["orders.*"], secret=SECRET, description="CRM"
    )
    # A user name and password are refused now; one saved before must not show either.
    WebhookEndpoint.objects.filter(pk=crm.pk).update(url=HIDDEN_URL)
    crm.refresh_from_db()
    failing, _ = endpoints.create_endpoint("https://b.example.com/", ["orders.shipped"])
    WebhookEndpoint.objects.filter(pk=failing.pk).update(
        failing_since=datetime(2026, 5, 1, 12, tzinfo=UTC)
    )
    off, _ = endpoints.create_endpoint("https://c.example.com/", ["*"], description="old")
    WebhookEndpoint.objects.filter(pk=off.pk).update(
        enabled=False, disabled_reason="Failing since ...; last error: HTTP 500"
    )
    from django_events.operations.pausing import pause

    pause(endpoints.subscription_name(crm.pk))
    return crm, failing, off


def test_the_endpoint_list_shows_paused_and_no_credentials_or_path(admin_client) -> None:
    crm, failing, off = three_endpoints()

    html = admin_client.get(CHANGES).content.decode()

    rows = {e.pk: html[html.index(change_url(e)) :].split("</tr>")[0] for e in (crm, failing, off)}
    assert "CRM (https://hooks.example.com:8443/)" in rows[crm.pk]
    assert 'de-pending">paused' in rows[crm.pk]
    assert 'de-pending">failing since 2026-05-01' in rows[failing.pk]
    assert "disabled: failing too long" in rows[off.pk]
    assert_nothing_secret(html)


@pytest.mark.django_db(databases=["default", "other"])
def test_the_endpoint_pages_read_its_pause_where_the_routers_keep_the_event_log(
    admin_client,
) -> None:
    """Endpoints on "default", pauses with the event log on "other": the list and the
    endpoint's page say "paused" (they read the endpoint's own database)."""
    from django_events.models import PausedSubscription
    from django_events.operations.pausing import pause

    with override_settings(DATABASE_ROUTERS=[EndpointsApart()]):
        endpoint, _ = endpoints.create_endpoint("https://a.example.com/", ["*"])
        pause(endpoints.subscription_name(endpoint.pk))
        assert PausedSubscription.objects.using("other").exists()
        listed = admin_client.get(CHANGES).content.decode()
        page = admin_client.get(change_url(endpoint)).content.decode()

    row = listed[listed.index(change_url(endpoint)) :].split("</tr>")[0]
    assert 'de-pending">paused' in row
    assert 'de-pending">paused' in page


def list_wiring(*args: str) -> str:
    from django.core.management import call_command

    out = StringIO()
    call_command("events_list", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def assert_nothing_secret(text: str) -> None:
    for hidden in (SECRET, "pw-123", "path-token", "query-token", "T0123"):
        assert hidden not in text


def test_events_list_shows_every_endpoint_with_patterns_url_queue_and_state() -> None:
    crm, failing, off = three_endpoints()
    names = [endpoints.subscription_name(e.pk) for e in (crm, failing, off)]
    queue = settings.DJANGO_EVENTS["DEFAULT_QUEUE"]

    table = list_wiring()

    lines = table.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("WEBHOOK ENDPOINT")))
    assert lines[header].split() == [
        "WEBHOOK",
        "ENDPOINT",
        "URL",
        "EVENTS",
        "QUEUE",
        "STATE",
        "DESCRIPTION",
    ]
    rows = {line.split()[0]: line.split(maxsplit=4) for line in lines[header + 1 : header + 4]}
    assert rows[names[0]][1:4] == ["https://hooks.example.com:8443/", "orders.*", queue]
    assert rows[names[0]][4].split() == ["enabled", "CRM"]
    assert rows[names[1]][4].split() == ["failing", "since", "2026-05-01T12:00:00+00:00"]
    assert rows[names[2]][1:4] == ["https://c.example.com/", "*", queue]
    assert rows[names[2]][4].split() == ["disabled:", "failing", "too", "long", "old"]
    # The enabled ones are subscriptions of the events they match; the disabled one of none.
    links = {tuple(line.split()[:5]) for line in lines[:header]}
    assert ("orders.placed", names[0], "webhook", "celery", queue) in links
    assert ("orders.shipped", names[0], "webhook", "celery", queue) in links
    assert ("orders.shipped", names[1], "webhook", "celery", queue) in links
    assert not any(line.startswith("orders.placed") and names[1] in line for line in lines)
    assert not any(names[2] in line for line in lines[:header])
    assert lines[-1].endswith("3 webhook endpoint(s) (2 enabled)")
    assert_nothing_secret(table)

    data = json.loads(list_wiring("--format", "json"))
    assert [(e["name"], e["url"], e["events"], e["enabled"]) for e in data["endpoints"]] == [
        (names[0], "https://hooks.example.com:8443/", ["orders.*"], True),
        (names[1], "https://b.example.com/", ["orders.shipped"], True),
        (names[2], "https://c.example.com/", ["*"], False),
    ]
    placed = next(e for e in data["events"] if e["name"] == "orders.placed")
    (hook,) = [s for s in placed["subscriptions"] if s["mode"] == "webhook"]
    assert (hook["name"], hook["handler"]) == (
        names[0],
        "webhook -> https://hooks.example.com:8443/",
    )
    assert_nothing_secret(json.dumps(data))
    assert f"{names[0]}: paused, 0 held" in list_wiring("--state")
    assert any(names[0] in line for line in list_wiring("--format", "mermaid").splitlines())


@pytest.mark.django_db(databases=[])
def test_events_list_no_endpoints_reads_no_database() -> None:
    table = list_wiring("--no-endpoints")  # a query would raise here: no database allowed
    assert "orders.placed" in table and "endpoint" not in table.lower()


WIRING = reverse("admin:django_events_wiring")


def test_the_wiring_page_shows_the_endpoints_their_state_and_pause_buttons(admin_client) -> None:
    crm, failing, off = three_endpoints()
    names = [endpoints.subscription_name(e.pk) for e in (crm, failing, off)]

    page = admin_client.get(WIRING).content.decode()

    section = page[page.index('id="webhook-endpoints"') :]
    for name, url, state in [
        (names[0], "https://hooks.example.com:8443/", "enabled"),
        (names[1], "https://b.example.com/", "failing</span><div>since 2026-05-01 12:00"),
        (names[2], "https://c.example.com/", "disabled</span><div>failing too long"),
    ]:
        row = section[section.index(f"<strong>{name}</strong>") :].split("</tr>")[0]
        assert f"<code>{url}</code>" in row and state in row, row
        assert change_url(WebhookEndpoint(pk=name.removeprefix("endpoint:"))) in row
    crm_row = section[section.index(f"<strong>{names[0]}</strong>") :].split("</tr>")[0]
    assert 'de-badge de-held">paused' in crm_row and 'value="resume"' in crm_row
    off_row = section[section.index(f"<strong>{names[2]}</strong>") :].split("</tr>")[0]
    assert 'value="pause"' in off_row
    # An enabled endpoint is also listed under each event it receives, and drawn.
    placed = page[page.index('id="event-ordersplaced"') :].split('<div class="module"')[0]
    assert names[0] in placed and names[1] not in placed and names[2] not in placed
    diagram = page[page.index('id="wiring-diagram"') :].split("</svg>")[0]
    assert names[0][:30] in diagram and names[2][:30] not in diagram
    assert "3 webhook endpoints registered at run time" in page
    assert_nothing_secret(page)

    answer = admin_client.post(
        reverse("admin:django_events_wiring_pause"), {"name": names[1], "action": "pause"}
    )
    assert answer.status_code == 302
    from django_events.operations.pausing import is_paused

    assert is_paused(names[1])


def test_the_wiring_page_links_an_endpoint_only_for_who_may_open_it() -> None:
    from tests.test_admin import user_client

    crm, _ = endpoints.create_endpoint("https://a.example.com/", ["orders.*"])
    viewer = user_client("view_eventrecord")
    page = viewer.get(WIRING).content.decode()
    assert endpoints.subscription_name(crm.pk) in page
    assert change_url(crm) not in page
    assert 'value="pause"' not in page  # pausing needs the operators' permission
    page = user_client("view_eventrecord", "view_webhookendpoint").get(WIRING).content.decode()
    assert change_url(crm) in page


# -- replaying an endpoint's deliveries from its admin page ---------------------------------


def replay_url(endpoint: WebhookEndpoint) -> str:
    return reverse("admin:django_events_webhookendpoint_replay", args=[endpoint.pk])


def shop_endpoint(queue: str) -> tuple[WebhookEndpoint, str]:
    from tests.ops import drain

    endpoint, _ = endpoints.create_endpoint("https://crm.example.com/in", ["shop.*"])
    drain(queue)
    return endpoint, endpoints.subscription_name(endpoint.pk)


def sent_to(queue: str, name: str) -> list[str]:
    from tests.ops import drain

    return sorted(m["event"]["id"] for m in drain(queue) if m["subscription"] == name)


def test_the_replay_page_retries_the_endpoints_failed_deliveries(
    admin_client, publish_now, queue
) -> None:
    from django_events.delivery.recording import delivery, save_deliveries

    endpoint, name = shop_endpoint(queue)
    failed, ok = (publish_now("shop.paid", {"order_id": n}) for n in (1, 2))
    save_deliveries(
        "default",
        [
            delivery(failed.id, name, "webhook", "failed", 3, "HTTP 500"),
            delivery(ok.id, name, "webhook", "succeeded", 1),
            delivery(ok.id, "shop-receipt", "async", "failed", 1, "not this one"),
        ],
    )
    sent_to(queue, name)
    assert replay_url(endpoint) in admin_client.get(change_url(endpoint)).content.decode()
    page = admin_client.get(replay_url(endpoint)).content.decode()
    assert "1 failed delivery" in page

    answer = admin_client.post(replay_url(endpoint), {"what": "failed"}, follow=True)

    assert answer.redirect_chain[-1][0] == change_url(endpoint)
    assert "Retried 1 failed delivery: 1 re-enqueued for a worker" in answer.content.decode()
    assert sent_to(queue, name) == [str(failed.id)]
    row = Delivery.objects.get(event_id=failed.id, subscription=name)
    assert (row.status, row.attempts) == ("pending", 3)
    assert Delivery.objects.get(event_id=ok.id, subscription="shop-receipt").status == "failed"


def test_the_replay_page_delivers_the_events_of_a_time_range_again(
    admin_client, publish_now, queue
) -> None:
    from django_events.models import EventRecord

    endpoint, name = shop_endpoint(queue)
    ages = {1: 3, 2: 1.5, 3: 1, 4: 0.2}  # hours ago
    events = {}
    for order_id, hours in ages.items():
        kind = "shop.refunded" if order_id == 3 else "shop.paid"
        events[order_id] = publish_now(kind, {"order_id": order_id})
        EventRecord.objects.filter(pk=events[order_id].id).update(
            occurred_at=datetime.now(tz=UTC) - timedelta(hours=hours)
        )
    sent_to(queue, name)

    answer = admin_client.post(
        replay_url(endpoint), {"what": "range", "since": "2h", "until": "30m"}, follow=True
    )

    assert "Replayed 2 stored event(s): 2 re-enqueued for a worker" in answer.content.decode()
    assert sent_to(queue, name) == sorted(str(events[n].id) for n in (2, 3))
    narrowed = {"what": "range", "since": "2h", "until": "30m", "events": ["shop.refunded"]}
    admin_client.post(replay_url(endpoint), narrowed)
    assert sent_to(queue, name) == [str(events[3].id)]


@pytest.mark.django_db(databases=["default", "other"])
def test_the_replay_page_reads_the_event_log_where_the_router_says(admin_client, queue) -> None:
    from django_events.models import EventRecord
    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]):
        endpoint, name = shop_endpoint(queue)
        event = publish("shop.paid", {"order_id": 1}, using="other")
        sent_to(queue, name)

        answer = admin_client.post(replay_url(endpoint), {"what": "range", "since": "1h"})

        assert answer.status_code == 302, answer.content.decode()
        assert sent_to(queue, name) == [str(event.id)]
        assert not EventRecord.objects.using("default").exists()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"what": "range"}, "Give the start of the range"),
        ({"what": "range", "since": "yesterday-ish"}, "is not an ISO date or datetime"),
        ({"what": "range", "since": "1h", "until": "2h"}, "must be before --until"),
        ({"what": "range", "since": "1h", "events": ["orders.placed"]}, "not one of the"),
        ({"what": "everything"}, "not one of the available choices"),
    ],
)
def test_the_replay_form_refuses_what_it_cannot_do(admin_client, queue, data, error) -> None:
    endpoint, name = shop_endpoint(queue)
    answer = admin_client.post(replay_url(endpoint), data)
    assert answer.status_code == 200 and error in answer.content.decode()
    assert sent_to(queue, name) == []


def test_a_disabled_endpoint_is_not_replayed_to(admin_client, publish_now, queue) -> None:
    from django.core.management import CommandError, call_command

    endpoint, name = shop_endpoint(queue)
    publish_now("shop.paid", {"order_id": 1})
    sent_to(queue, name)  # what publishing sent
    endpoints.disable([endpoint])
    answer = admin_client.post(replay_url(endpoint), {"what": "range", "since": "1h"})
    assert "is disabled: enable it first" in answer.content.decode()
    with pytest.raises(CommandError, match="is disabled: enable it first"):
        call_command("events_replay", name)
    assert sent_to(queue, name) == []


def test_a_disabled_endpoints_failures_are_left_failed_by_a_retry(
    admin_client, publish_now, queue
) -> None:
    """events_retry and "Retry selected" send nothing to a disabled endpoint (each attempt
    would fail without a call): they say so, and events_retry fails when nothing else went."""
    from django.core.management import CommandError, call_command

    from django_events.delivery.recording import delivery, save_deliveries
    from tests.test_admin import action

    endpoint, name = shop_endpoint(queue)
    event = publish_now("shop.refunded", {"order_id": 1})
    save_deliveries("default", [delivery(event.id, name, "webhook", "failed", 2, "HTTP 500")])
    sent_to(queue, name)  # what publishing sent
    endpoints.disable([endpoint])
    assert list(Delivery.objects.filter(status="failed").values_list("subscription")) == [(name,)]
    refused = f"1 left failed: endpoint {endpoint.pk} is disabled; enable it first"

    out = StringIO()
    with pytest.raises(CommandError, match="No failed delivery was retried"):
        call_command("events_retry", "--all", stdout=out, stderr=StringIO())
    assert refused in out.getvalue()
    assert "0 re-enqueued for a worker" in out.getvalue()
    with pytest.raises(CommandError, match=f"{name!r} is disabled: enable it first"):
        call_command("events_retry", "--subscription", name, stdout=StringIO())
    failure = Delivery.objects.get(event_id=event.id, subscription=name)
    page = action(admin_client, "retry_selected", failure.pk).content.decode()
    assert refused in page
    assert sent_to(queue, name) == []
    failure.refresh_from_db()
    assert (failure.status, failure.attempts) == ("failed", 2)

    # One skipped besides: still nothing retried, and the command says both.
    save_deliveries("default", [delivery(event.id, "gone", "sync", "failed", 1, "x")])
    with pytest.raises(CommandError) as caught:
        call_command("events_retry", "--all", stdout=StringIO(), stderr=StringIO())
    assert str(caught.value) == (
        "No failed delivery was retried: 1 was skipped, for the reasons above; the others' "
        "webhook endpoints are disabled; enable them first."
    )

    # With another failure to retry, the command succeeds and says what it left.
    save_deliveries("default", [delivery(event.id, "shop-audit", "sync", "failed", 1, "x")])
    out = StringIO()
    call_command("events_retry", "--all", stdout=out, stderr=StringIO())
    assert f"0 re-enqueued for a worker; 1 ran and succeeded; 0 ran and failed; {refused}" in (
        out.getvalue()
    )
    assert sent_to(queue, name) == []


def test_replaying_needs_the_operators_permission(queue) -> None:
    from tests.test_admin import user_client

    endpoint, _ = shop_endpoint(queue)
    viewer = user_client("view_webhookendpoint", "change_webhookendpoint")
    assert replay_url(endpoint) not in viewer.get(change_url(endpoint)).content.decode()
    assert viewer.get(replay_url(endpoint)).status_code == 403
    assert viewer.post(replay_url(endpoint), {"what": "failed"}).status_code == 403
    operator = user_client("view_webhookendpoint", "change_failure")
    assert replay_url(endpoint) in operator.get(change_url(endpoint)).content.decode()
    assert operator.get(replay_url(endpoint)).status_code == 200
