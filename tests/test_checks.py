"""System checks and events_check: each broken configuration, by id, with where it is."""

from __future__ import annotations

import decimal
import os
import re
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import date
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from celery import _state as celery_state
from django.conf import settings
from django.core.checks import Error, Warning, registry
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import override_settings
from pydantic import BaseModel, ConfigDict, Field, computed_field

from django_events import UnknownEvent, checks, publish
from django_events.checks import CHECK_IDS
from django_events.wiring import typed
from django_events.wiring.filters import compile_filter
from django_events.wiring.registry import get_registry
from tests.conftest import wiring

# Django 6.1's `check` command opens a database connection (database-tagged checks).
pytestmark = pytest.mark.django_db(databases="__all__")

ROOT = Path(__file__).resolve().parent.parent
BASE = Path(settings.BASE_DIR) / "manifests" / "base.yaml"
RECORD = "tests.app.handlers.record"
ASYNC = {"event": "orders.placed", "handler": RECORD, "mode": "async", "name": "async-record"}
MANIFEST_HINT = "See the manifest reference in the docs."

Reported = tuple[str, str, str]  # id, obj (where), message
LINE = re.compile(r"^(?P<obj>.+?): \((?P<id>django_events\.[EW]\d{3})\) (?P<msg>.*)$", re.MULTILINE)


def parse(text: str) -> list[Reported]:
    return sorted((m["id"], m["obj"], m["msg"]) for m in LINE.finditer(text))


def django_check() -> list[Reported]:
    """What `manage.py check` reports for django_events (and that nothing else is reported)."""
    out, err = StringIO(), StringIO()
    try:
        call_command("check", stdout=out, stderr=err)
    except SystemCheckError as exc:
        text = str(exc)
    else:
        text = out.getvalue() + err.getvalue()
    reported = parse(text)
    issues = re.search(r"identified (\d+) issues?|identified no issues", text)
    assert issues is not None, text
    assert int(issues.group(1) or 0) == len(reported), text  # every issue is one of ours
    return reported


@dataclass
class EventsCheck:
    reported: list[Reported]
    stdout: str
    stderr: str
    error: CommandError | None


def events_check() -> EventsCheck:
    out, err = StringIO(), StringIO()
    error = None
    try:
        call_command("events_check", stdout=out, stderr=err)
    except CommandError as exc:
        error = exc
    return EventsCheck(
        parse(out.getvalue() + err.getvalue()), out.getvalue(), err.getvalue(), error
    )


def assert_reported(*expected: Reported) -> EventsCheck:
    """`check` and `events_check` both report exactly ``expected``; events_check fails on errors."""
    assert django_check() == sorted(expected)
    result = events_check()
    assert result.reported == sorted(expected)
    errors = [r for r in expected if ".E" in r[0]]
    if errors:
        assert result.error is not None
        assert str(result.error) == f"{len(errors)} problem(s) found in the events configuration."
        assert parse(result.stderr) == sorted(errors)  # errors on stderr, warnings on stdout
    else:
        assert result.error is None
        assert result.stdout.endswith(f"Events configuration OK ({len(expected)} warning(s)).\n")
    return result


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def manifest(tmp_path: Path, text: str) -> tuple[Path, AbstractContextManager[Any]]:
    """A manifest file and the settings that load it after base.yaml."""
    path = write(tmp_path / "events.yaml", text)
    return path, wiring(MANIFESTS=[BASE, path])


@pytest.fixture
def pickle_app() -> Iterator[str]:
    """CELERY_APP for a Celery app that accepts pickle; forgotten again after the test."""
    yield "tests.app.pickle_celery.app"
    module = sys.modules.pop("tests.app.pickle_celery", None)
    if module is not None:
        module.app.close()  # leaves Celery's registry of apps as it was


@pytest.fixture
def no_celery_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process where no Celery app was ever created."""
    monkeypatch.setattr(celery_state._tls, "current_app", None)
    monkeypatch.setattr(celery_state, "default_app", None)
    monkeypatch.setattr(celery_state, "_apps", weakref.WeakSet())


# -- the valid configuration -------------------------------------------------------------------


def test_base_configuration_checks_clean() -> None:
    out = StringIO()
    call_command("check", stdout=out)
    assert out.getvalue() == "System check identified no issues (0 silenced).\n"

    result = events_check()
    assert result.error is None
    assert (result.stdout, result.stderr) == ("Events configuration OK (0 warning(s)).\n", "")


def test_a_rich_valid_configuration_checks_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its `type:` imports tests.app.typed_events, whose @event classes must not outlive the test.
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())
    _, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced:
            schema: {type: object, properties: {amount: {type: number}}}
          shipping.shipped:
            type: tests.app.typed_events.Shipment
        subscriptions:
          - event: orders.*
            handler: tests.app.handlers.ClassHandler
            mode: async
            queue: billing
            when: {any: [{total: {gte: 100}}, {email: {exists: true}}]}
            retry: {max_attempts: 5, backoff: 0.5}
            timeout: 10
          - event: "*"
            handler: tests.app.handlers.record_other
            mode: inline
        """,
    )
    with settings_:
        assert_reported()


def test_checks_are_registered_under_the_django_events_tag() -> None:
    registered = registry.registry.get_checks()
    for check in (checks.check_configuration, checks.check_handlers, checks.check_celery):
        assert check in registered
        assert "django_events" in check.tags  # type: ignore[attr-defined]


# -- manifests ---------------------------------------------------------------------------------


def test_missing_manifest_file_is_E101(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"

    with wiring(MANIFESTS=[BASE, missing]):
        assert_reported(
            ("django_events.E101", str(missing), f"Manifest file {str(missing)!r} does not exist.")
        )


def test_yaml_syntax_error_is_E102_with_file_and_line(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced:
            description: totals: wrong
        """,
    )

    with settings_:
        assert_reported(
            (
                "django_events.E102",
                f"{path}:4",
                "YAML syntax error: mapping values are not allowed here",
            ),
        )


def test_manifest_not_matching_its_schema_is_E103_with_file_and_line(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.record
            mode: later
            retry: {max_attempts: 0}
        """,
    )

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:5",
                "$.subscriptions[0].mode: 'later' is not one of "
                "['inline', 'sync', 'async', 'webhook']",
            ),
            (
                "django_events.E103",
                f"{path}:6",
                "$.subscriptions[0].retry.max_attempts: 0 is less than the minimum of 1",
            ),
        )

    assert f"HINT: {MANIFEST_HINT}" in result.stderr


def test_invalid_payload_json_schema_is_E104(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced:
            schema:
              type: objekt
          billing.paid:
            schema: {type: object, required: amount}
          billing.refunded:
            schema:
              type: object
              properties:
                order_id: {type: integr}
        subscriptions:
          - event: billing.refunded
            handler: tests.app.handlers.record
        """,
    )

    with settings_:
        assert_reported(
            (
                "django_events.E104",
                f"{path}:3",
                "Event 'billing.invoiced' has an invalid payload schema at schema.type: "
                "'objekt' is not valid under any of the given schemas",
            ),
            (
                "django_events.E104",
                f"{path}:6",
                "Event 'billing.paid' has an invalid payload schema at schema.required: "
                "'amount' is not of type 'array'",
            ),
            (
                "django_events.E104",
                f"{path}:8",
                "Event 'billing.refunded' has an invalid payload schema at "
                "schema.properties.order_id.type: 'integr' is not valid under any of the "
                "given schemas",
            ),
            (  # not "an undeclared event": it is declared, with an error
                "django_events.E105",
                f"{path}:14",
                "Subscription 'billing.refunded:tests.app.handlers.record' subscribes to event "
                "'billing.refunded', which is left out for its own error (E104)",
            ),
        )


def test_a_schema_error_hides_none_of_the_files_other_problems(tmp_path: Path) -> None:
    """Every problem of a manifest with an E103 in one run, its declarations still unused."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced:
            schema: {type: objekt}
          billing.paid:
            durable: "yes"
          billing.refunded: {}
        subscriptions:
          - event: billing.paid
            handler: tests.app.handlers.record
          - event: billing.refunded
            handler: tests.app.handlers.record
            mode: bogus
          - event: billing.refunded
            handler: tests.app.nope.handle
          - event: billing.voided
            handler: tests.app.handlers.record
          - event: billing.refunded
            handler: tests.app.handlers.record
            name: filtered
            when: {any: []}
        """,
    )

    with settings_:
        assert_reported(
            (
                "django_events.E103",
                f"{path}:6",
                "$.events['billing.paid'].durable: 'yes' is not of type 'boolean'",
            ),
            (
                "django_events.E103",
                f"{path}:13",
                "$.subscriptions[1].mode: 'bogus' is not one of ['inline', 'sync', 'async', "
                "'webhook']",
            ),
            (
                "django_events.E104",
                f"{path}:3",
                "Event 'billing.invoiced' has an invalid payload schema at schema.type: "
                "'objekt' is not valid under any of the given schemas",
            ),
            (  # declared, with an error: not "an undeclared event"
                "django_events.E105",
                f"{path}:9",
                "Subscription 'billing.paid:tests.app.handlers.record' subscribes to event "
                "'billing.paid', which is left out for its own error (E103)",
            ),
            (
                "django_events.E105",
                f"{path}:16",
                "Subscription 'billing.voided:tests.app.handlers.record' subscribes to an "
                "undeclared event: 'billing.voided'",
            ),
            (
                "django_events.E108",
                f"{path}:18",
                "Subscription 'filtered': when.any: 'any' takes a non-empty list of filters",
            ),
            (
                "django_events.E201",
                f"{path}:14",
                "Subscription 'billing.refunded:tests.app.nope.handle': Handler "
                "'tests.app.nope.handle' does not import: No module named 'tests.app.nope'",
            ),
        )
        # Still none of the file is used until its E103s are fixed (no half-read wiring).
        registry = get_registry()
        assert not [name for name in registry.events if name.startswith("billing.")]
        assert not [s for s in registry.subscriptions.values() if s.event.startswith("billing.")]
        with pytest.raises(UnknownEvent, match="billing.refunded"):
            publish("billing.refunded", {})


def test_E103_never_quotes_a_secret_typed_where_its_name_belongs(tmp_path: Path) -> None:
    """A literal secret (or a URL with a token in it) in a manifest is masked in the message:
    check output ends up in CI logs."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          payments.paid:
            inbound: {auth: hmac, secret: "hunter2-literal"}
        sources:
          stripe:
            auth: stripe
            secret: sk_live_51Habc
            events: {}
        subscriptions:
          - event: orders.placed
            mode: webhook
            url: http://hooks.example.com/services/T0KEN
            secret: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw]
        """,
    )

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['payments.paid'].inbound.secret: '•••' does not match "
                "'^[A-Z][A-Z0-9_]*$'",
            ),
            (
                "django_events.E103",
                f"{path}:8",
                "$.sources.stripe.secret: '•••' does not match '^[A-Z][A-Z0-9_]*$'",
            ),
            (
                "django_events.E103",
                f"{path}:13",
                "$.subscriptions[0].url: '•••' does not match '^(https://\\\\S+|[A-Z][A-Z0-9_]*)$'",
            ),
            (
                "django_events.E103",
                f"{path}:14",
                "$.subscriptions[0].secret: '•••' is not of type 'string'",
            ),
        )

    output = result.stdout + result.stderr
    for secret in ("hunter2", "sk_live_51Habc", "T0KEN", "whsec_MfKQ9r8"):
        assert secret not in output
    assert "HINT: Give the NAME of the setting or environment variable" in result.stderr
    # The url is masked, so the hint says why an http:// one is refused.
    assert (
        "HINT: A literal url must start with https://; put another (an http:// receiver "
        "under WEBHOOKS_ALLOW_PRIVATE) in a setting or environment variable and give its NAME."
    ) in result.stderr


def test_E103_of_a_webhook_url_in_the_setting_hints_at_https_without_quoting_it() -> None:
    hook = {"event": "orders.placed", "mode": "webhook", "secret": "TEST_WH_SECRET"}
    with wiring({**hook, "url": "http://127.0.0.1:8001/hook?token=T0KEN"}):
        result = events_check()

    assert [(r[0], r[2]) for r in result.reported] == [
        (
            "django_events.E103",
            "$.subscriptions[0].url: '•••' does not match '^(https://\\\\S+|[A-Z][A-Z0-9_]*)$'",
        )
    ]
    assert "T0KEN" not in result.stdout + result.stderr
    assert "HINT: A literal url must start with https://; put another" in result.stderr


def test_E103_never_quotes_a_secret_or_url_in_a_section_of_the_wrong_shape(tmp_path: Path) -> None:
    """A section written as a mapping where a list belongs (or the reverse) is quoted whole by
    its E103: the secrets and webhook urls in it are masked there too."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          - name: payments.paid
            inbound: {auth: hmac, secret: "hunter2-literal"}
        sources:
          - name: stripe
            auth: stripe
            secret: sk_live_51Habc
        subscriptions:
          notify:
            event: orders.placed
            mode: webhook
            url: https://hooks.example.com/services/T0KEN
            secret: HOOK_SECRET
        """,
    )

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:2",
                "$.events: [{'name': 'payments.paid', 'inbound': {'auth': 'hmac', 'secret': "
                "'•••'}}] is not of type 'object'",
            ),
            (
                "django_events.E103",
                f"{path}:5",
                "$.sources: [{'name': 'stripe', 'auth': 'stripe', 'secret': '•••'}] is not of "
                "type 'object'",
            ),
            (
                "django_events.E103",
                f"{path}:9",
                "$.subscriptions: {'notify': {'event': 'orders.placed', 'mode': 'webhook', "
                "'url': '•••', 'secret': '•••'}} is not of type 'array'",
            ),
        )

    output = result.stdout + result.stderr
    for secret in ("hunter2", "sk_live_51Habc", "T0KEN", "HOOK_SECRET"):
        assert secret not in output


def test_E103_never_quotes_a_string_given_where_an_item_or_a_block_with_secrets_belongs(
    tmp_path: Path,
) -> None:
    """A bare string where a subscription, a source or an inbound block belongs may be the
    secret or the webhook url typed in the wrong place: masked, as values of `secret` and
    `url` are."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          payments.paid:
            inbound: hunter2-literal
        sources:
          stripe: sk_live_51Habc
        subscriptions:
          - whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
          - https://hooks.example.com/services/T0KEN
        """,
    )

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['payments.paid'].inbound: '•••' is not of type 'object'",
            ),
            ("django_events.E103", f"{path}:6", "$.sources.stripe: '•••' is not of type 'object'"),
            *[
                ("django_events.E103", f"{path}:{line}", f"$.subscriptions[{index}]: {message}")
                for index, line in ((0, 8), (1, 9))
                for message in (
                    "'•••' is not of type 'object'",
                    "'•••' should not be valid under {'required': ['handler']}",
                )
            ],
        )

    output = result.stdout + result.stderr
    for secret in ("hunter2", "sk_live_51Habc", "whsec_MfKQ9r8", "T0KEN"):
        assert secret not in output


def test_E103_never_quotes_a_secret_or_url_run_together_with_its_key(tmp_path: Path) -> None:
    """`{secret:hunter2}` (no space after the colon) in a YAML flow mapping is one key, the
    secret in it, which E103 quoted as an unexpected key, and as the key's path."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          payments.paid:
            inbound: {auth: hmac, secret:hunter2-literal}
        sources:
          stripe: {auth: stripe, secret:sk_live_51Habc, events: {}}
        subscriptions:
          - {event: orders.placed, mode: webhook, url:https://hooks.example.com/T0KEN, secret: S}
          - {event: orders.placed, handler: tests.app.handlers.record, queue:billing}
        """,
    )

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['payments.paid'].inbound: 'secret' is a required property",
            ),
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['payments.paid'].inbound: Additional properties are not allowed "
                "('secret:•••' was unexpected)",
            ),
            (
                "django_events.E103",
                f"{path}:6",
                "$.sources.stripe: 'secret' is a required property",
            ),
            (
                "django_events.E103",
                f"{path}:6",
                "$.sources.stripe: Additional properties are not allowed ('secret:•••' was "
                "unexpected)",
            ),
            ("django_events.E103", f"{path}:8", "$.subscriptions[0]: 'url' is a required property"),
            (
                "django_events.E103",
                f"{path}:8",
                "$.subscriptions[0]: Additional properties are not allowed ('url:•••' was "
                "unexpected)",
            ),
            (  # not a secret or a url: quoted, and pointed at
                "django_events.E103",
                f"{path}:9",
                "$.subscriptions[1]['queue:billing']: Additional properties are not allowed "
                "('queue:billing' was unexpected)",
            ),
        )

    output = result.stdout + result.stderr
    for secret in ("hunter2", "sk_live_51Habc", "T0KEN"):
        assert secret not in output
    assert (
        "HINT: Write 'secret: <value>', with a space after the colon. Give the NAME of the "
        "setting or environment variable"
    ) in result.stderr
    assert "HINT: Write 'url: <value>', with a space after the colon." in result.stderr


def test_E103_never_quotes_a_miscased_secret_or_url_run_together_with_its_key(
    tmp_path: Path,
) -> None:
    """`{Secret:hunter2}` is as much the secret as `{secret:hunter2}`: a key's case does not
    decide whether its value is masked, and the hint names the key as the schema spells it."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          payments.paid:
            inbound: {auth: hmac, Secret:hunter2-literal}
        sources:
          stripe: {auth: stripe, SECRET:sk_live_51Habc, events: {}}
        subscriptions:
          - {event: orders.placed, mode: webhook, URL:https://hooks.example.com/T0KEN, secret: S}
        """,
    )

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['payments.paid'].inbound: 'secret' is a required property",
            ),
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['payments.paid'].inbound: Additional properties are not allowed "
                "('Secret:•••' was unexpected)",
            ),
            (
                "django_events.E103",
                f"{path}:6",
                "$.sources.stripe: 'secret' is a required property",
            ),
            (
                "django_events.E103",
                f"{path}:6",
                "$.sources.stripe: Additional properties are not allowed ('SECRET:•••' was "
                "unexpected)",
            ),
            ("django_events.E103", f"{path}:8", "$.subscriptions[0]: 'url' is a required property"),
            (
                "django_events.E103",
                f"{path}:8",
                "$.subscriptions[0]: Additional properties are not allowed ('URL:•••' was "
                "unexpected)",
            ),
        )

    output = result.stdout + result.stderr
    for secret in ("hunter2", "sk_live_51Habc", "T0KEN"):
        assert secret not in output
    assert result.stderr.count("HINT: Write 'secret: <value>', with a space after the colon.") == 2
    assert "HINT: Write 'url: <value>', with a space after the colon." in result.stderr


def test_E103_never_quotes_a_secret_or_url_pasted_as_a_key(tmp_path: Path) -> None:
    """A secret or a url written as a key (a flow mapping's item with no name, or a value run
    together with a key that names a secret) is masked, and the line is that of the block;
    a misspelt or misplaced key, or one run together with a plain value, is quoted."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          payments.paid:
            inbound: {auth: hmac, secret: S, token:hunter2-literal}
        sources:
          stripe: {auth: stripe, secret: S, events: {}, sk_live_51Habc}
        subscriptions:
          - {whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}
          - event: orders.placed
            handler: tests.app.handlers.record
            https://hooks.example.com/services/T0KEN: 1
          - {event: orders.placed, mode: webhook, url: U, secret: S, webhook_url:https://x.io/T1}
          - {event: orders.placed, handler: tests.app.handlers.record, hunter3}
          - {event: orders.placed, handler: tests.app.handlers.record, Handlr: x, queue:billing}
          - {event: orders.placed, handler: tests.app.handlers.record, retry: {max_attempts:5}}
        """,
    )
    masked = "Additional properties are not allowed ('•••' was unexpected)"

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['payments.paid'].inbound: Additional properties are not allowed "
                "('token:•••' was unexpected)",
            ),
            ("django_events.E103", f"{path}:6", f"$.sources.stripe: {masked}"),
            *[
                (
                    "django_events.E103",
                    f"{path}:8",
                    f"$.subscriptions[0]: '{key}' is a required property",
                )
                for key in ("event", "handler")
            ],
            ("django_events.E103", f"{path}:8", f"$.subscriptions[0]: {masked}"),
            ("django_events.E103", f"{path}:9", f"$.subscriptions[1]: {masked}"),
            (
                "django_events.E103",
                f"{path}:12",
                "$.subscriptions[2]: Additional properties are not allowed ('webhook_url:•••' "
                "was unexpected)",
            ),
            ("django_events.E103", f"{path}:13", f"$.subscriptions[3]: {masked}"),
            (  # not a secret or a url: quoted, and pointed at
                "django_events.E103",
                f"{path}:14",
                "$.subscriptions[4].Handlr: Additional properties are not allowed ('Handlr', "
                "'queue:billing' were unexpected)",
            ),
            (
                "django_events.E103",
                f"{path}:15",
                "$.subscriptions[5].retry['max_attempts:5']: Additional properties are not "
                "allowed ('max_attempts:5' was unexpected)",
            ),
        )

    output = result.stdout + result.stderr
    for secret in ("hunter2", "hunter3", "sk_live_51Habc", "whsec_MfKQ9r8", "T0KEN", "T1"):
        assert secret not in output
    hint = "HINT: A key that may hold a secret or a url is masked: remove it, or write one of"
    assert result.stderr.count(hint) == 6


def test_E103_never_quotes_a_url_given_where_another_value_or_a_name_belongs(
    tmp_path: Path,
) -> None:
    """A webhook url given as a handler, an event or a source's event name is masked as the
    value of `url` is: its path or query may hold a token."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          https://hooks.example.com/T0KEN: {}
        sources:
          github:
            auth: github
            secret: S
            events: {push: "https://hooks.example.com/T1"}
        subscriptions:
          - {event: orders.placed, handler: "https://hooks.example.com/T2"}
          - {event: orders.placed, handler: tests.app.handlers.record, timeout: "https://x.io/T3"}
        """,
    )

    with settings_:
        result = assert_reported(
            (
                "django_events.E103",
                f"{path}:3",
                "$.events['•••']: '•••' does not match '^[A-Za-z0-9_.-]+$'",
            ),
            (
                "django_events.E103",
                f"{path}:8",
                "$.sources.github.events.push: '•••' does not match '^[A-Za-z0-9_.-]+$'",
            ),
            (
                "django_events.E103",
                f"{path}:10",
                "$.subscriptions[0].handler: '•••' does not match "
                "'^[A-Za-z_][A-Za-z0-9_]*(\\\\.[A-Za-z_][A-Za-z0-9_]*)+$'",
            ),
            (
                "django_events.E103",
                f"{path}:11",
                "$.subscriptions[1].timeout: '•••' is not of type 'number'",
            ),
        )

    output = result.stdout + result.stderr
    for secret in ("T0KEN", "T1", "T2", "T3"):
        assert secret not in output


def test_a_when_comparing_a_number_with_an_object_is_W108(tmp_path: Path) -> None:
    # "gtee" is no operator: {gtee: 1000} is a plain value, which a number never equals.
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        subscriptions:
          - event: orders.*
            name: big
            handler: tests.app.handlers.record
            when:
              any:
                - {total: {gtee: 1000}}
                - {items: {eq: []}, email: {domain: shop.example}}
          - event: orders.placed
            name: fine
            handler: tests.app.handlers.record
            when: {items.0: {sku: A1}, total: {gte: 1000}}
        """,
    )
    operators = "eq, ne, gt, gte, lt, lte, in, not_in, exists, contains"
    # YAML reads 2024-01-01 as a date, which JSON does not know: still reported, not a crash.
    dated = {
        "event": "orders.placed",
        "handler": RECORD,
        "when": {"email": {"on": date(2024, 1, 1)}},
    }
    with wiring(dated):
        assert [m.msg for m in checks.check_configuration()] == [
            "Subscription 'orders.placed:tests.app.handlers.record': when.email compares with "
            "the object {\"on\": \"2024-01-01\"}, but event 'orders.placed' declares 'email' "
            "as string: it never matches"
        ]
    with settings_:
        result = assert_reported(
            (
                "django_events.W108",
                f"{path}:3",
                "Subscription 'big': when.total compares with the object {\"gtee\": 1000}, but "
                "event 'orders.placed' declares 'total' as number: it never matches",
            ),
            (
                "django_events.W108",
                f"{path}:3",
                "Subscription 'big': when.email compares with the object "
                "{\"domain\": \"shop.example\"}, but event 'orders.placed' declares 'email' as "
                "string: it never matches",
            ),
        )
    assert (
        f"HINT: A misspelt operator? They are {operators}; a mapping with none of them is a "
        "plain value."
    ) in result.stdout


SCHEMA = {
    "type": "object",
    "properties": {
        "email": {"type": "string"},
        "total": {"type": "number"},
        "count": {"type": "integer"},
        "paid": {"type": "boolean"},
        "note": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "customer": {"$ref": "#/$defs/Customer"},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"sku": {"type": "string"}}},
        },
    },
    "patternProperties": {"^x_": {"type": "string"}},
    "$defs": {"Customer": {"type": "object", "properties": {"phone": {"type": "string"}}}},
}


@pytest.mark.parametrize(
    "paths",
    [
        ["email", "customer.phone", "items.sku", "x_secret", "customer"],
        ["anything"],  # with no properties listed, nothing can be told
    ],
    ids=["declared", "no-properties"],
)
def test_redact_paths_that_the_schema_declares_check_clean(paths: list[str]) -> None:
    schema = SCHEMA if paths[0] != "anything" else {"type": "object"}
    with wiring(EVENTS={"shop.sold": {"schema": schema, "redact": paths}}):
        assert checks.check_configuration() == []


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        (
            "emial",
            "Did you mean 'email'? A misspelt path masks nothing, and the value it meant is shown.",
        ),
        (
            "customer.phnoe",
            "Did you mean 'customer.phone'? A misspelt path masks nothing, and the value it meant "
            "is shown.",
        ),
        (
            "items.skus",
            "Did you mean 'items.sku'? A misspelt path masks nothing, and the value it meant "
            "is shown.",
        ),
        (
            "password",
            "Name a property the schema declares (dots for nesting): a misspelt path "
            "masks nothing, and the value it meant is shown.",
        ),
    ],
)
def test_a_redact_path_the_schema_does_not_declare_is_W112(path: str, hint: str) -> None:
    with wiring(EVENTS={"shop.sold": {"schema": SCHEMA, "redact": ["email", path]}}):
        assert_reported(
            (
                "django_events.W112",
                "settings.DJANGO_EVENTS['EVENTS']['shop.sold']",
                f"Event 'shop.sold': redact path {path!r} is not declared by its schema",
            )
        )
        [message] = checks.check_configuration()
    assert message.hint == hint


def test_a_misspelt_redact_path_in_a_manifest_is_W112_at_its_line(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced:
            schema:
              type: object
              properties: {email: {type: string}}
            redact: [emial]
        """,
    )
    with settings_:
        assert_reported(
            (
                "django_events.W112",
                f"{path}:3",
                "Event 'billing.invoiced': redact path 'emial' is not declared by its schema",
            )
        )


@pytest.mark.parametrize(
    ("when", "where", "outcome"),
    [
        ({"not": {"total": {"gtee": 1000}}}, "not.total", "it always matches"),
        ({"not": {"not": {"total": {"gtee": 1000}}}}, "total", "it never matches"),
        (
            {"any": [{"count": 1}, {"not": {"total": {"gtee": 1000}}}]},
            "not.total",
            "it always matches",
        ),
    ],
)
def test_W108_says_what_a_comparison_under_a_not_makes_the_filter_do(
    when: dict[str, Any], where: str, outcome: str
) -> None:
    with sold(when):
        [message] = checks.check_configuration()

    assert (message.id, message.msg) == (
        "django_events.W108",
        f"Subscription 's': when.{where} compares with the object {{\"gtee\": 1000}}, but event "
        f"'shop.sold' declares 'total' as number: {outcome}",
    )
    # What the filter does with a payload whose total is a number (count 2: any's other fails).
    assert compile_filter(when)({"total": 5, "count": 2}) == (outcome == "it always matches")


@pytest.mark.parametrize(
    ("path", "declared"),
    [("tags.0", "string"), ("x_ref", "string"), ("items.0.sku", "string")],
)
def test_W108_finds_the_field_as_the_filter_does(path: str, declared: str) -> None:
    # An array's item by its index, a patternProperties name: as W113 and W114 find them.
    with sold({path: {"gtee": 1}}):
        [message] = checks.check_configuration()

    assert (message.id, message.msg) == (
        "django_events.W108",
        f"Subscription 's': when.{path} compares with the object {{\"gtee\": 1}}, but event "
        f"'shop.sold' declares {path!r} as {declared}: it never matches",
    )


def test_W108_goes_by_the_json_form_of_a_pydantic_event(monkeypatch: pytest.MonkeyPatch) -> None:
    # `when` sees model_dump(mode="json"): field names (not aliases), a Decimal as a string; an
    # optional field's type is an anyOf.
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())

    @typed.event("shop.paid")
    class Paid(BaseModel):
        amount_cents: int = Field(alias="amountCents")
        amount: decimal.Decimal
        count: int | None = None

    shown = "(in the JSON form of an instance)"
    for path, declared in (
        ("amount_cents", "integer"),
        ("amount", "string"),
        ("count", "integer or null"),
    ):
        when = {path: {"gtee": 1}}
        with wiring({"event": "shop.paid", "handler": RECORD, "name": "big", "when": when}):
            [message] = checks.check_configuration()
        assert (message.id, message.msg) == (
            "django_events.W108",
            f"Subscription 'big': when.{path} compares with the object {{\"gtee\": 1}}, but "
            f"event 'shop.paid' declares {path!r} as {declared} {shown}: it never matches",
        )
    # An alias is never in the JSON form: W113 says so, and no type is said for it.
    when = {"amountCents": {"gtee": 1}}
    with wiring({"event": "shop.paid", "handler": RECORD, "name": "big", "when": when}):
        assert [m.id for m in checks.check_configuration()] == ["django_events.W113"]


def sold(when: dict[str, Any], event: str = "shop.sold") -> AbstractContextManager[Any]:
    """A subscription with ``when`` to ``event``, among shop.sold (SCHEMA) and shop.other."""
    other = {"schema": {"type": "object", "properties": {"total": {"type": "string"}}}}
    events = {"shop.sold": {"schema": SCHEMA}, "shop.other": other}
    return wiring({"event": event, "handler": RECORD, "name": "s", "when": when}, EVENTS=events)


@pytest.mark.parametrize(
    "when",
    [
        {"email": "a@example.com", "total": {"gte": 1000}, "count": {"in": [1, 2.0]}},
        {"total": {"gt": 5}, "count": 3, "paid": True, "note": None},
        {"count": {"gte": 1.5, "lt": 9}, "total": {"ne": 2}, "tags": ["a", "b"]},
        {"note": {"ne": "x"}, "tags": {"contains": "vip"}, "email": {"contains": "@"}},
        {"items.0.sku": "A-1", "customer.phone": {"exists": True}, "x_ref": "abc"},
        {"any": [{"total": {"lt": 1.5}}, {"not": {"paid": False}}]},
        {"customer": {"phone": "123"}},  # an object compared with an object
    ],
)
def test_a_when_filter_on_declared_fields_of_matching_types_checks_clean(
    when: dict[str, Any],
) -> None:
    with sold(when):
        assert checks.check_configuration() == []


def test_a_when_field_the_schema_does_not_declare_is_W113() -> None:
    with sold({"all": [{"totl": {"gte": 10}}, {"customer.phnoe": {"exists": True}}]}):
        messages = checks.check_configuration()

    assert [(m.id, m.msg, m.hint) for m in messages] == [
        (
            "django_events.W113",
            "Subscription 's': when field 'totl' is not declared by the schema of event "
            "'shop.sold'",
            "Did you mean 'total'? A field that is never in the payload never matches.",
        ),
        (
            "django_events.W113",
            "Subscription 's': when field 'customer.phnoe' is not declared by the schema of "
            "event 'shop.sold'",
            "Did you mean 'customer.phone'? A field that is never in the payload never matches.",
        ),
    ]
    assert all(isinstance(m, Warning) for m in messages)


def test_a_pattern_warns_of_a_when_field_only_when_no_event_it_matches_declares_it() -> None:
    with sold({"email": {"exists": True}}, event="shop.*"):  # shop.sold declares it
        assert checks.check_configuration() == []
    with sold({"mail": {"exists": True}}, event="shop.*"):
        [message] = checks.check_configuration()
    assert message.msg == (
        "Subscription 's': when field 'mail' is not declared by the schema of events "
        "'shop.other', 'shop.sold'"
    )


def test_a_pattern_warns_of_a_when_field_only_when_no_event_it_matches_may_have_it() -> None:
    # shop.free has no schema: its payload may hold a coupon, and the filter picks those.
    schema = {"type": "object", "properties": {"total": {"type": "number"}}}
    events = {"shop.sold": {"schema": schema}, "shop.free": {}}
    subscription = {"event": "shop.*", "handler": RECORD, "name": "s", "when": {"coupon": "X"}}

    with wiring(subscription, EVENTS=events):
        assert checks.check_configuration() == []
        assert compile_filter({"coupon": "X"})(publish("shop.free", {"coupon": "X"}).data)


@pytest.mark.parametrize(
    ("condition", "outcome"),
    [
        ({"gte": 10}, "never matches."),
        (10, "never matches."),
        ({"in": [10]}, "never matches."),
        ({"contains": "a"}, "never matches."),
        ({"exists": True}, "never matches."),
        ({"ne": 10}, "makes when.totl.ne always match."),
        ({"not_in": [10]}, "makes when.totl.not_in always match."),
        ({"exists": False}, "makes when.totl.exists: false always match."),
        ({"ne": 10, "gte": 1}, "makes when.totl.ne always match and when.totl.gte never match."),
    ],
)
def test_W113_says_what_the_comparison_does_with_a_field_never_in_the_payload(
    condition: Any, outcome: str
) -> None:
    with sold({"totl": condition}):
        [message] = checks.check_configuration()

    assert message.id == "django_events.W113"
    assert message.hint == f"Did you mean 'total'? A field that is never in the payload {outcome}"
    # What the filter does with an event without the field (the hint says "always" or not).
    matches = compile_filter({"totl": condition})({"total": 10})
    assert matches == ("never" not in outcome)


@pytest.mark.parametrize(
    ("when", "outcome"),
    [
        ({"not": {"totl": 5}}, "makes when.not.totl always match."),
        ({"not": {"totl": {"ne": 5}}}, "makes when.not.totl.ne never match."),
        ({"all": [{"not": {"totl": {"gte": 1}}}]}, "makes when.not.totl.gte always match."),
        (
            {"not": {"any": [{"totl": {"exists": True}}]}},
            "makes when.not.totl.exists: true always match.",
        ),
        ({"not": {"not": {"totl": 5}}}, "never matches."),
        (
            {"totl": {"ne": 1}, "not": {"totl": 5}},
            "makes when.totl.ne, when.not.totl always match.",
        ),
        ({"totl": 1, "not": {"totl": {"ne": 5}}}, "makes when.totl, when.not.totl.ne never match."),
    ],
)
def test_W113_says_what_a_comparison_under_a_not_makes_the_filter_do(
    when: dict[str, Any], outcome: str
) -> None:
    with sold(when):
        [message] = checks.check_configuration()

    assert message.id == "django_events.W113"
    assert message.hint == f"Did you mean 'total'? A field that is never in the payload {outcome}"
    # The filter itself, with an event without the field: "always" is what it does.
    assert compile_filter(when)({"total": 10}) == ("always" in outcome)


@pytest.mark.parametrize(
    ("when", "where", "value", "declared", "outcome"),
    [
        ({"not": {"count": "x"}}, "not.count", '"x" (string)', "integer", "it always matches"),
        (
            {"not": {"total": {"ne": "0"}}},
            "not.total.ne",
            '"0" (string)',
            "number",
            "it never matches",
        ),
        (
            {"not": {"not": {"paid": "true"}}},
            "paid",
            '"true" (string)',
            "boolean",
            "it never matches",
        ),
        (
            {"not": {"total": {"in": [1, "2"]}}},
            "not.total.in",
            '"2" (string)',
            "number",
            "that item never matches",
        ),
    ],
)
def test_W114_says_what_a_comparison_under_a_not_makes_the_filter_do(
    when: dict[str, Any], where: str, value: str, declared: str, outcome: str
) -> None:
    with sold(when):
        [message] = checks.check_configuration()

    field = where.removeprefix("not.").split(".")[0]
    assert (message.id, message.msg) == (
        "django_events.W114",
        f"Subscription 's': when.{where} compares with {value}, but event 'shop.sold' "
        f"declares {field!r} as {declared}: {outcome}",
    )
    if outcome != "that item never matches":  # what the filter does with any such payload
        assert compile_filter(when)({field: 3}) == (outcome == "it always matches")


def test_a_pattern_warns_of_a_when_value_only_when_no_event_it_matches_admits_its_type() -> None:
    # shop.sold declares total a number, shop.other a string: the filter picks shop.sold's.
    with sold({"total": {"gte": 1000}}, event="shop.*"):
        assert checks.check_configuration() == []
    with sold({"email": "a@example.com"}, event="shop.*"):  # shop.other has no email: W113's
        assert checks.check_configuration() == []
    with sold({"total": {"gte": True}}, event="shop.*"):  # a boolean suits neither
        messages = checks.check_configuration()
    assert [(m.id, m.msg) for m in messages] == [
        (
            "django_events.W114",
            "Subscription 's': when.total.gte compares with true (boolean), but event "
            f"{name!r} declares 'total' as {declared}: it never matches",
        )
        for name, declared in (("shop.sold", "number"), ("shop.other", "string"))
    ]


def test_a_pattern_names_the_events_of_one_declared_type_in_one_W114() -> None:
    schema = {"type": "object", "properties": {"total": {"type": "number"}}}
    events = {"shop.a": {"schema": schema}, "shop.b": {"schema": schema}}
    subscription = {"event": "shop.*", "handler": RECORD, "name": "s"}
    with wiring({**subscription, "when": {"total": {"in": ["1000", 2000]}}}, EVENTS=events):
        [message] = checks.check_configuration()

    assert message.msg == (
        "Subscription 's': when.total.in compares with \"1000\" (string), but events 'shop.a', "
        "'shop.b' declare 'total' as number: that item never matches"
    )


def test_a_decimal_of_a_pydantic_event_compared_with_a_number_is_W114(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydantic validates a Decimal from a number or a string, but an instance's JSON form (what
    # `when` sees) has a string: `gte: 1000` never matches a published instance.
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())

    @typed.event("shop.paid")
    class Paid(BaseModel):
        amount: decimal.Decimal
        refund: decimal.Decimal | None = None

    when = {"amount": {"gte": 1000}, "refund": {"lt": 5}, "any": [{"amount": "1500.00"}]}
    with wiring({"event": "shop.paid", "handler": RECORD, "name": "big", "when": when}):
        messages = checks.check_configuration()

    shown = "(in the JSON form of an instance)"
    assert [(m.id, m.msg, m.hint) for m in messages] == [
        (
            "django_events.W114",
            f"Subscription 'big': when.{path}.{op} compares with {value} (integer), but event "
            f"'shop.paid' declares {path!r} as {declared} {shown}: it never matches",
            f"The payload holds {path!r} as a string (as a Decimal's JSON form): {op} compares "
            "strings as text, not as numbers. Compare in the handler, or add a number field.",
        )
        for path, op, value, declared in (
            ("amount", "gte", 1000, "string"),
            ("refund", "lt", 5, "string or null"),
        )
    ]
    published = publish(Paid(amount=decimal.Decimal("1500.00")))
    assert published.data["amount"] == "1500.00"
    assert not compile_filter({"amount": {"gte": 1000}})(published.data)
    assert compile_filter({"amount": "1500.00"})(published.data)


def test_a_decimal_of_a_dataclass_event_compared_with_a_number_hints_at_its_string(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())

    @typed.event("shop.paid")
    @dataclass(frozen=True)
    class Paid:
        amount: decimal.Decimal

    with wiring(
        {"event": "shop.paid", "handler": RECORD, "name": "big", "when": {"amount": {"gt": 9}}}
    ):
        [message] = checks.check_configuration()

    assert (message.id, message.msg, message.hint) == (
        "django_events.W114",
        "Subscription 'big': when.amount.gt compares with 9 (integer), but event 'shop.paid' "
        "declares 'amount' as string: it never matches",
        "The payload holds 'amount' as a string (as a Decimal's JSON form): gt compares strings "
        "as text, not as numbers. Compare in the handler, or add a number field.",
    )


def test_a_pydantic_event_s_computed_field_and_field_names_are_declared_for_when(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The JSON form `when` sees has field names (not aliases) and computed fields.
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())

    @typed.event("shop.paid")
    class Paid(BaseModel):
        amount_cents: int = Field(alias="amountCents")

        @computed_field  # type: ignore[prop-decorator]
        @property
        def big(self) -> bool:
            return self.amount_cents >= 100_000

    when = {"big": True, "amount_cents": {"gte": 100_000}}
    with wiring({"event": "shop.paid", "handler": RECORD, "name": "big", "when": when}):
        assert checks.check_configuration() == []


def test_a_pydantic_event_that_serializes_by_alias_is_checked_by_its_aliases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With serialize_by_alias (pydantic 2.11+), an instance's JSON form, which `when` sees,
    # has the aliases: `amountCents` matches a published instance, `amount_cents` never does.
    monkeypatch.setattr(typed, "_declared", typed.declared_event_types())

    @typed.event("shop.paid")
    class Paid(BaseModel):
        model_config = ConfigDict(serialize_by_alias=True)

        amount_cents: int = Field(alias="amountCents")

    published = publish(Paid(amountCents=100_000))
    assert compile_filter({"amountCents": {"gte": 100_000}})(published.data)

    subscription = {"event": "shop.paid", "handler": RECORD, "name": "big"}
    with wiring({**subscription, "when": {"amountCents": {"gte": 100_000}}}):
        assert checks.check_configuration() == []
    with wiring({**subscription, "when": {"amount_cents": {"gte": 100_000}}}):
        [message] = checks.check_configuration()
    assert (message.id, message.hint) == (
        "django_events.W113",
        "Did you mean 'amountCents'? A field that is never in the payload never matches.",
    )


@pytest.mark.parametrize(
    ("when", "where", "value", "declared", "outcome"),
    [
        ({"total": {"gte": "1000"}}, "total.gte", '"1000" (string)', "number", "it never matches"),
        ({"count": 1.5}, "count", "1.5 (number)", "integer", "it never matches"),
        ({"paid": "true"}, "paid", '"true" (string)', "boolean", "it never matches"),
        ({"email": {"eq": None}}, "email.eq", "null (null)", "string", "it never matches"),
        (
            {"total": {"in": [1, "2"]}},
            "total.in",
            '"2" (string)',
            "number",
            "that item never matches",
        ),
        (
            {"count": {"not_in": ["2"]}},
            "count.not_in",
            '"2" (string)',
            "integer",
            "that item never matches",
        ),
        ({"total": {"ne": "0"}}, "total.ne", '"0" (string)', "number", "it always matches"),
        (
            {"tags": {"contains": 1}},
            "tags.contains",
            "1 (integer)",
            "array of string",
            "it never matches",
        ),
        (
            {"any": [{"note": {"lt": 3}}]},
            "note.lt",
            "3 (integer)",
            "string or null",
            "it never matches",
        ),
    ],
)
def test_a_when_value_of_a_type_the_schema_rules_out_is_W114(
    when: dict[str, Any], where: str, value: str, declared: str, outcome: str
) -> None:
    with sold(when):
        [message] = checks.check_configuration()

    assert (message.id, message.msg) == (
        "django_events.W114",
        f"Subscription 's': when.{where} compares with {value}, but event 'shop.sold' "
        f"declares {where.split('.')[0]!r} as {declared}: {outcome}",
    )
    assert isinstance(message, Warning)


def test_a_yaml_date_in_a_when_filter_is_W114_hinting_to_quote_it(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced:
            schema:
              type: object
              properties: {due: {type: string, format: date}}
        subscriptions:
          - event: billing.invoiced
            handler: tests.app.handlers.record
            name: late
            when: {due: {lt: 2024-01-01}}
        """,
    )
    with settings_:
        assert_reported(
            (
                "django_events.W114",
                f"{path}:8",
                "Subscription 'late': when.due.lt compares with 2024-01-01 (a YAML date), but "
                "event 'billing.invoiced' declares 'due' as string: it never matches",
            )
        )
        [message] = checks.check_configuration()
    assert message.hint == (
        'Write the value as the declared type: in YAML, 1000 is a number, "1000" a string, '
        "and an unquoted date is a date (quote it)."
    )


def test_invalid_payload_schema_in_settings_is_E104_naming_the_setting() -> None:
    with wiring(EVENTS={"billing.invoiced": {"schema": {"minimum": "zero"}}}):
        assert_reported(
            (
                "django_events.E104",
                "settings.DJANGO_EVENTS['EVENTS']['billing.invoiced']",
                "Event 'billing.invoiced' has an invalid payload schema at schema.minimum: "
                "'zero' is not of type 'number'",
            ),
        )


def test_a_pattern_matching_only_an_event_left_out_for_its_schema_is_not_W101() -> None:
    """The event is declared (E104 says what is wrong with it): W101 said the pattern
    matched no declared event."""
    events = {"c.refunded": {"schema": {"minimum": "zero"}}}
    with wiring({"event": "c.*", "handler": RECORD, "name": "every-c"}, EVENTS=events):
        assert_reported(
            (
                "django_events.E104",
                "settings.DJANGO_EVENTS['EVENTS']['c.refunded']",
                "Event 'c.refunded' has an invalid payload schema at schema.minimum: "
                "'zero' is not of type 'number'",
            ),
        )


# -- subscriptions -----------------------------------------------------------------------------


def test_subscription_to_an_undeclared_event_is_E105(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        subscriptions:
          - event: orders.shipped
            handler: tests.app.handlers.record
          - event: orders.shiped
            handler: tests.app.handlers.record
        """,
    )

    with settings_:
        assert_reported(
            (
                "django_events.E105",
                f"{path}:5",
                "Subscription 'orders.shiped:tests.app.handlers.record' subscribes to an "
                "undeclared event: 'orders.shiped'",
            )
        )


PATH_HINT = "Fix the dotted path in 'handler'."


@pytest.mark.parametrize(
    ("handler", "reason", "hint"),
    [
        (
            "tests.app.nope.handler",
            "Handler 'tests.app.nope.handler' does not import: No module named 'tests.app.nope'",
            PATH_HINT,
        ),
        (
            "tests.app.handlers.recrod",
            "Handler 'tests.app.handlers.recrod' does not import: Module \"tests.app.handlers\" "
            'does not define a "recrod" attribute/class',
            "Did you mean 'tests.app.handlers.record'?",
        ),
        (
            "exploding_handlers.handle",
            "Handler 'exploding_handlers.handle' does not import: RuntimeError: boom at import",
            "Its module raised while importing: python manage.py shell -c "
            "'import exploding_handlers'.",
        ),
        (
            "needy_handlers.handle",
            "Handler 'needy_handlers.handle' does not import: No module named 'not_installed_lib'",
            "The handler's module imports 'not_installed_lib', which is not installed here: "
            "install it, or fix that import.",
        ),
    ],
)
def test_handler_that_does_not_import_is_E201(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handler: str, reason: str, hint: str
) -> None:
    write(tmp_path / "exploding_handlers.py", 'raise RuntimeError("boom at import")\n')
    write(tmp_path / "needy_handlers.py", "import not_installed_lib\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("exploding_handlers", "needy_handlers"):
        monkeypatch.delitem(sys.modules, module, raising=False)

    with wiring({"event": "orders.placed", "handler": handler, "name": "broken"}):
        assert_reported(
            (
                "django_events.E201",
                "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
                f"Subscription 'broken': {reason}",
            )
        )
        assert [m.hint for m in checks.check_handlers()] == [hint]


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (
            "tests.app.handlers.not_callable",
            "Handler 'tests.app.handlers.not_callable' is not callable",
        ),
        (
            "tests.app.models.Order",
            "Handler class 'tests.app.models.Order' has no handle(self, event) method",
        ),
    ],
)
def test_handler_that_is_not_callable_is_E202(tmp_path: Path, handler: str, reason: str) -> None:
    path, settings_ = manifest(
        tmp_path,
        f"""
        version: 1
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.record
          - event: orders.*
            name: not-a-handler
            handler: {handler}
        """,
    )

    with settings_:
        assert_reported(
            ("django_events.E202", f"{path}:5", f"Subscription 'not-a-handler': {reason}")
        )


def test_a_misspelt_handler_name_is_E201_with_the_close_name_as_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "billing_handlers.py", "def create_invoice(event):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "billing_handlers", raising=False)
    misspelt = {"event": "orders.placed", "handler": "billing_handlers.create_invoce"}

    with wiring({**misspelt, "name": "invoice"}):
        [message] = checks.check_handlers()

    assert message.id == "django_events.E201"
    assert message.hint == "Did you mean 'billing_handlers.create_invoice'?"


def test_a_misspelt_handler_module_is_E201_with_the_close_module_as_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "shop_pkg"
    package.mkdir()
    write(package / "__init__.py", "")
    write(package / "handlers.py", "def create_invoice(event):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("shop_pkg", "shop_pkg.handlers", "shop_pkg.handler"):
        monkeypatch.delitem(sys.modules, module, raising=False)

    with wiring({"event": "orders.placed", "handler": "shop_pkg.handler.create_invoice"}):
        [message] = checks.check_handlers()

    assert message.id == "django_events.E201"
    assert message.hint == "Did you mean 'shop_pkg.handlers.create_invoice'?"


SIGNATURES = """
import functools


def no_args():
    pass


async def async_no_args():
    pass


def two_required(event, client):
    pass


def keyword_only(*, event):
    pass


class NoEventParameter:
    def handle(self):
        pass


class CallableWithoutParameter:
    def __call__(self):
        pass


no_args_instance = CallableWithoutParameter()


def event_only(event):
    pass


async def async_event_only(event, retries=3):
    pass


def star_args(*args, **kwargs):
    pass


class Handles:
    def handle(self, event):
        pass


class StaticHandles:
    @staticmethod
    def handle(event):
        pass


class CallableWithEvent:
    def __call__(self, event):
        pass


with_event_instance = CallableWithEvent()


def _injects(func):
    @functools.wraps(func)  # the wrapper supplies `client`: only its own signature counts
    def wrapper(event):
        return func(event, client=None)

    return wrapper


@_injects
def injected(event, client):
    pass


partial_event = functools.partial(two_required, client=None)
"""


@pytest.fixture
def signatures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    write(tmp_path / "signature_handlers.py", SIGNATURES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "signature_handlers", raising=False)
    return "signature_handlers"


@pytest.mark.parametrize(
    ("handler", "shown", "reason", "hint"),
    [
        ("no_args", "no_args()", "too many positional arguments", "def no_args(event)"),
        (
            "async_no_args",
            "async_no_args()",
            "too many positional arguments",
            "def async_no_args(event)",
        ),
        (
            "two_required",
            "two_required(event, client)",
            "missing a required argument: 'client'",
            "Give its other parameters defaults",
        ),
        (
            "keyword_only",
            "keyword_only(*, event)",
            "too many positional arguments",
            "def keyword_only(event)",
        ),
        (
            "NoEventParameter",
            "NoEventParameter.handle(self)",
            "too many positional arguments",
            "def handle(self, event)",
        ),
        (
            "no_args_instance",
            "no_args_instance()",
            "too many positional arguments",
            "def __call__(self, event)",
        ),
    ],
)
def test_a_handler_that_cannot_take_the_event_is_E207(
    signatures: str, handler: str, shown: str, reason: str, hint: str
) -> None:
    with wiring({"event": "orders.placed", "handler": f"{signatures}.{handler}", "name": "h"}):
        assert_reported(
            (
                "django_events.E207",
                "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
                f"Subscription 'h': handler {f'{signatures}.{shown}'!r} cannot be called with "
                f"the event as its one argument: {reason}",
            )
        )
        [message] = checks.check_handlers()
    assert message.hint is not None
    assert hint in message.hint


@pytest.mark.parametrize(
    "handler",
    [
        "event_only",
        "async_event_only",
        "star_args",
        "Handles",
        "StaticHandles",
        "with_event_instance",
        "injected",
        "partial_event",
    ],
)
def test_handlers_that_take_the_event_pass_the_signature_check(
    signatures: str, handler: str
) -> None:
    with wiring({"event": "orders.placed", "handler": f"{signatures}.{handler}", "mode": "sync"}):
        assert checks.check_handlers() == []


def test_a_handler_class_without_handle_is_E202_hinting_to_add_it() -> None:
    with wiring({"event": "orders.placed", "handler": "tests.app.models.Order", "name": "o"}):
        [message] = checks.check_handlers()

    assert message.id == "django_events.E202"
    assert message.hint == "Add a method handle(self, event) to the class."


def test_a_handler_class_that_needs_arguments_is_E202_with_its_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its module imports fine: the class cannot be made with no arguments."""
    write(
        tmp_path / "needy_class.py",
        "class Handler:\n"
        "    def __init__(self, client):\n"
        "        self.client = client\n"
        "    def handle(self, event):\n"
        "        pass\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "needy_class", raising=False)

    with wiring({"event": "orders.placed", "handler": "needy_class.Handler", "name": "needy"}):
        assert_reported(
            (
                "django_events.E202",
                "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
                "Subscription 'needy': Handler class 'needy_class.Handler' cannot be instantiated "
                "with no arguments: TypeError: Handler.__init__() missing 1 required positional "
                "argument: 'client'",
            )
        )
        assert [m.hint for m in checks.check_handlers()] == [
            "Give its __init__ arguments defaults, or use a function handler."
        ]


def test_duplicate_event_and_subscription_names_are_E106_and_E107(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          orders.placed:
            description: declared again
          billing.invoiced: {}
          billing.invoiced: {}
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.record
            name: audit
          - event: orders.shipped
            handler: tests.app.handlers.record
            name: audit
        """,
    )

    with settings_:
        assert_reported(
            (
                "django_events.E106",
                f"{path}:3",
                f"Event 'orders.placed' is declared twice (also at {BASE}:3)",
            ),
            (
                "django_events.E106",
                f"{path}:6",
                f"Event 'billing.invoiced' is declared twice (also at {path}:5)",
            ),
            (
                "django_events.E107",
                f"{path}:11",
                f"Subscription 'audit' is declared twice (also at {path}:8)",
            ),
        )


def test_filter_type_pattern_and_option_problems(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          shipping.shipped:
            type: tests.app.handlers.record
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.record
            name: bad-filter
            when: {total: {gte: 1, over: 2}}
          - event: billing.*
            handler: tests.app.handlers.record
            name: nothing-matches
          - event: orders.placed
            handler: tests.app.handlers.record_other
            queue: billing
            retry: {max_attempts: 2}
        """,
    )

    with settings_:
        assert_reported(
            (
                "django_events.E109",
                f"{path}:3",
                "Event 'shipping.shipped': type 'tests.app.handlers.record' is unusable: "
                "tests.app.handlers.record is not a dataclass or a pydantic model",
            ),
            (
                "django_events.E108",
                f"{path}:6",
                "Subscription 'bad-filter': when.total: unknown operator(s) ['over']; use one of "
                "['contains', 'eq', 'exists', 'gt', 'gte', 'in', 'lt', 'lte', 'ne', 'not_in']",
            ),
            (
                "django_events.W101",
                f"{path}:10",
                "Subscription 'nothing-matches' pattern matches no declared event: 'billing.*'",
            ),
            (
                "django_events.W102",
                f"{path}:13",
                "Subscription 'orders.placed:tests.app.handlers.record_other' is sync: "
                "queue and retry only apply to async subscriptions",
            ),
        )


@pytest.mark.parametrize(
    ("options", "message", "hint"),
    [
        ({"queue": "q"}, "queue only applies", "Remove it or use mode: async."),
        ({"queue": "q", "timeout": 5}, "queue and timeout only apply", "Remove them or use"),
        (
            {"queue": "q", "timeout": 5, "broadcast": True},
            "queue, timeout and broadcast only apply",
            "Remove them or use",
        ),
    ],
)
def test_W102_says_it_or_them_for_one_or_several_keys(
    options: dict[str, Any], message: str, hint: str
) -> None:
    with wiring({"event": "orders.placed", "handler": RECORD, "name": "s", **options}):
        [reported] = checks.check_configuration()

    assert reported.id == "django_events.W102"
    assert reported.msg == f"Subscription 's' is sync: {message} to async subscriptions"
    assert reported.hint is not None
    assert reported.hint.startswith(hint)


def test_warnings_alone_do_not_fail_events_check() -> None:
    with wiring({"event": "billing.*", "handler": RECORD, "name": "later"}):
        result = assert_reported(
            (
                "django_events.W101",
                "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
                "Subscription 'later' pattern matches no declared event: 'billing.*'",
            )
        )

    assert result.stderr == ""


def test_a_settings_dict_that_declares_no_event_is_W002() -> None:
    # The slip a user made following the docs: `DJANGO_EVENTS = {"DELIVERY": "tasks"}` later
    # in settings replaced the dict that held MANIFESTS; events_check said OK.
    with override_settings(DJANGO_EVENTS={"DELIVERY": "tasks"}):
        assert_reported(
            (
                "django_events.W002",
                "settings.DJANGO_EVENTS",
                "No event is declared: MANIFESTS, EVENTS and @event classes declare none, so "
                "publish() and inbound sources have nothing to publish",
            )
        )


def test_no_W002_when_a_manifest_that_does_not_load_says_why_itself(tmp_path: Path) -> None:
    with override_settings(DJANGO_EVENTS={"MANIFESTS": [tmp_path / "missing.yaml"]}):
        assert [reported[0] for reported in django_check()] == ["django_events.E101"]


# -- settings ----------------------------------------------------------------------------------


def test_settings_problems_are_E001_W001_E002() -> None:
    with wiring(RECORD="never", PIPELINE=["tests.app.nope.Interceptor"], TIMEOUT=3):
        assert_reported(
            ("django_events.E001", "settings.DJANGO_EVENTS", "DJANGO_EVENTS['RECORD'] is 'never'"),
            (
                "django_events.W001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS has unknown key 'TIMEOUT'",
            ),
            (
                "django_events.E002",
                "settings.DJANGO_EVENTS",
                "PIPELINE entry "
                "'tests.app.nope.Interceptor' does not import: No module named 'tests.app.nope'",
            ),
        )


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("MANIFEST", "Did you mean 'MANIFESTS'?"),
        ("manifests", "Did you mean 'MANIFESTS'?"),
        ("DEFAULT_QUEU", "Did you mean 'DEFAULT_QUEUE'?"),
    ],
)
def test_an_unknown_key_close_to_a_known_one_is_W001_with_that_key_as_hint(
    key: str, hint: str
) -> None:
    with wiring(**{key: ["events.yaml"]}):
        [message] = checks.check_configuration()

    assert (message.id, message.msg) == (
        "django_events.W001",
        f"DJANGO_EVENTS has unknown key {key!r}",
    )
    assert message.hint == hint


def test_an_unknown_key_like_no_known_one_is_W001_listing_the_known_keys() -> None:
    with wiring(COLOUR="red"):
        [message] = checks.check_configuration()

    assert message.id == "django_events.W001"
    assert message.hint is not None
    assert message.hint.startswith("Known keys: ")
    assert "MANIFESTS" in message.hint


def test_settings_that_are_not_a_dict_are_E001_and_the_defaults_apply() -> None:
    with override_settings(DJANGO_EVENTS=["MANIFESTS"]):
        assert_reported(
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS must be a dict, got list",
            )
        )
        assert get_registry().events == {}  # the default: no manifests


def test_success_records_must_be_immediate_or_batched() -> None:
    with wiring(SUCCESS_RECORDS="later"):
        assert_reported(
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['SUCCESS_RECORDS'] is 'later'",
            ),
        )
    for value in ("immediate", "batched"):
        with wiring(SUCCESS_RECORDS=value):
            assert_reported()


def test_publisher_confirms_must_be_a_boolean() -> None:
    with wiring(PUBLISHER_CONFIRMS="yes"):
        assert_reported(
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['PUBLISHER_CONFIRMS'] is 'yes'",
            ),
        )
    for value in (True, False):
        with wiring(PUBLISHER_CONFIRMS=value):
            assert_reported()


def test_retention_is_a_known_key_with_days_or_none() -> None:
    for value in ({}, {"events": 7, "idempotency_keys": 0}, {"events": None}, {"events": 0.5}):
        with wiring(RETENTION=value):
            assert_reported()
    with wiring(RETENTION={"events": 0, "idempotency_keys": -1, "failures": 3}):
        assert_reported(
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['RETENTION'] is invalid: $ Additional properties are not "
                "allowed ('failures' was unexpected)",
            ),
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['RETENTION'] is invalid: ['events'] 0 is less than or equal to "
                "the minimum of 0",
            ),
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['RETENTION'] is invalid: ['idempotency_keys'] -1 is less than the "
                "minimum of 0",
            ),
        )


# -- Celery ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("celery_app", "reason"),
    [
        (
            "tests.celery_app.missing",
            "DJANGO_EVENTS['CELERY_APP'] does not import: Module "
            '"tests.celery_app" does not define a "missing" '
            "attribute/class",
        ),
        (
            "tests.no_such_module.app",
            "DJANGO_EVENTS['CELERY_APP'] does not import: No module named 'tests.no_such_module'",
        ),
        ("tests.app.handlers.not_callable", "DJANGO_EVENTS['CELERY_APP'] is not a Celery app: 42"),
    ],
)
def test_async_subscriptions_with_a_broken_celery_app_are_E203(
    celery_app: str, reason: str
) -> None:
    with wiring(ASYNC, CELERY_APP=celery_app):
        assert_reported(
            ("django_events.E203", "DJANGO_EVENTS", f"Async subscriptions exist but {reason}")
        )


def test_a_celery_app_setting_naming_its_module_is_E203_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "named_module_proj"
    package.mkdir()
    (package / "__init__.py").write_text("")  # the module is not imported by its package
    (package / "celery.py").write_text("from celery import Celery\napp = Celery('proj')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with wiring(ASYNC, CELERY_APP="named_module_proj.celery"):
        assert_reported(
            (
                "django_events.E203",
                "DJANGO_EVENTS",
                "Async subscriptions exist but DJANGO_EVENTS['CELERY_APP'] does not import: "
                "'named_module_proj.celery' is a module: name the Celery app in it, such as "
                "'named_module_proj.celery.app'",
            )
        )


def test_async_subscriptions_with_no_celery_app_at_all_are_E203(no_celery_app: None) -> None:
    with wiring(ASYNC, CELERY_APP=None):
        assert_reported(
            (
                "django_events.E203",
                "DJANGO_EVENTS",
                "Async subscriptions exist but no Celery app is configured",
            )
        )


def test_no_celery_app_is_fine_without_async_subscriptions(no_celery_app: None) -> None:
    with wiring({"event": "orders.placed", "handler": RECORD}, CELERY_APP="tests.nope.app"):
        assert_reported()


def test_the_current_celery_app_is_used_when_celery_app_is_not_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.celery_app import app

    monkeypatch.setattr(celery_state._tls, "current_app", app)
    # No default app: Celery's Django fixup makes the first app it is installed on the
    # default, which may be another test's app, and the default goes first.
    monkeypatch.setattr(celery_state, "default_app", None)
    with wiring(ASYNC, CELERY_APP=None):
        assert_reported()


def test_the_projects_celery_app_is_found_from_every_thread_without_celery_app(
    tmp_path: Path,
) -> None:
    # The standard layout (proj/celery.py imported by proj/__init__.py) in a process of its
    # own: Celery's Django fixup makes that app Celery's default, and a thread that did not
    # create it (runserver's, a threaded WSGI server's, asgiref's) must find it too.
    script = tmp_path / "threads.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading

            import django

            django.setup()
            from django.core import checks

            from celery import Celery

            from django_events.delivery.broker import celery_app
            from tests.celery_app import app

            seen = {}

            def look():
                seen["app"] = celery_app()
                seen["ids"] = [m.id for m in checks.run_checks() if m.id.startswith("django_")]

            thread = threading.Thread(target=look)
            thread.start()
            thread.join()
            print(seen["app"] is app, seen["ids"])
            # A second app, made later (current in this thread only): every thread still
            # finds the project's, the one Celery made its default.
            other = Celery("other")
            thread = threading.Thread(target=look)
            thread.start()
            thread.join()
            print(celery_app() is app, seen["app"] is app)
            """
        )
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_TEST_CELERY_APP": "",
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["True []", "True True"], run.stdout + run.stderr


def test_a_celery_app_that_accepts_pickle_is_E204(pickle_app: str) -> None:
    with wiring(ASYNC, CELERY_APP=pickle_app):
        assert_reported(
            (
                "django_events.E204",
                "DJANGO_EVENTS",
                "Celery app 'pickle_app' accepts pickle: ['json', 'pickle']",
            )
        )


def test_a_celery_app_on_kombus_own_filesystem_transport_is_W205() -> None:
    with wiring(ASYNC, CELERY_APP="tests.app.stock_filesystem_celery.app"):
        assert_reported(
            (
                "django_events.W205",
                "DJANGO_EVENTS",
                "Celery app 'stock_filesystem' uses kombu's own filesystem transport, which "
                "shows a worker a message file before it is written: the worker exits and the "
                "message is lost",
            )
        )


class EventLogOnOther:
    """A router that keeps the event log on the "other" database: SQLite, no transaction_mode."""

    def db_for_read(self, model: type, **hints: object) -> str | None:
        return "other" if model._meta.app_label == "django_events" else None

    db_for_write = db_for_read


@contextmanager
def _event_log_on_sqlite_locking_late(
    *subscriptions: dict[str, Any], **keys: Any
) -> Iterator[None]:
    from unittest import mock

    from django.db import connections

    # The PostgreSQL pass's "other" is PostgreSQL: the check reads only an alias's settings,
    # so they say SQLite there (its connection, made already, stays PostgreSQL's).
    database = connections["other"].settings_dict
    as_sqlite = {"ENGINE": "django.db.backends.sqlite3", "OPTIONS": {}}
    sqlite = database["ENGINE"].endswith(("sqlite3", "spatialite"))
    with (
        mock.patch.dict(database, {} if sqlite else as_sqlite),
        override_settings(DATABASE_ROUTERS=[EventLogOnOther()]),
        wiring(*subscriptions, **keys),
    ):
        yield


def test_workers_sharing_an_sqlite_event_log_that_locks_late_is_W209() -> None:
    with _event_log_on_sqlite_locking_late(ASYNC):
        assert_reported(
            (
                "django_events.W209",
                "DATABASES",
                "Database 'other' (the event log's) is SQLite without a transaction_mode, and "
                "workers write to it while this process does: a transaction that reads before "
                "it writes (the admin's retry, events_replay) fails at once with \"database is "
                'locked"',
            )
        )
    # Only sync subscriptions: no worker process writes, so no warning.
    with _event_log_on_sqlite_locking_late({"event": "orders.placed", "handler": RECORD}):
        assert_reported()
    # transaction_mode IMMEDIATE, as tests/settings.py sets it for "default" on SQLite.
    with override_settings(DATABASE_ROUTERS=[]), wiring(ASYNC):
        assert_reported()


@pytest.mark.parametrize(
    ("engine", "options", "warned"),
    [
        # GeoDjango's SQLite backend locks as the plain one does (its DatabaseWrapper's base).
        ("django.contrib.gis.db.backends.spatialite", {}, True),
        ("django.db.backends.sqlite3", {"transaction_mode": "DEFERRED"}, True),
        # Django reads the mode in any case (`transaction_mode.upper()`).
        ("django.contrib.gis.db.backends.spatialite", {"transaction_mode": "immediate"}, False),
        ("django.db.backends.sqlite3", {"transaction_mode": "exclusive"}, False),
    ],
)
def test_W209_knows_each_sqlite_backend_of_django_and_its_transaction_modes(
    monkeypatch: pytest.MonkeyPatch, engine: str, options: dict[str, str], warned: bool
) -> None:
    from django.db import connections

    monkeypatch.setitem(connections.settings["other"], "ENGINE", engine)
    monkeypatch.setitem(connections.settings["other"], "OPTIONS", options)
    # A webhook subscription is sent by a worker too.
    webhook = {"event": "orders.placed", "mode": "webhook", "url": "https://example.com/in"}
    with _event_log_on_sqlite_locking_late({**webhook, "secret": "WHSEC_W209"}):
        messages = checks.check_database()

    assert [m.id for m in messages] == (["django_events.W209"] if warned else [])


def deploy_check() -> list[Reported]:
    """What `manage.py check --deploy --tag django_events` reports."""
    out, err = StringIO(), StringIO()
    call_command("check", "--deploy", "--tag", "django_events", stdout=out, stderr=err)
    return parse(out.getvalue() + err.getvalue())


@contextmanager
def _databases_on_postgresql(**database: Any) -> Iterator[None]:
    """Alias default set as PostgreSQL with ``database``'s keys, and other as SQLite: W215
    reads only their settings (the connections, made already, stay as they are)."""
    from unittest import mock

    from django.db import connections

    postgresql = {"ENGINE": "django.db.backends.postgresql", "OPTIONS": {}, **database}
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "OPTIONS": {"transaction_mode": "IMMEDIATE"}}
    with (
        mock.patch.dict(connections.settings["default"], postgresql),
        mock.patch.dict(connections.settings["other"], sqlite),
    ):
        yield


REUSES_CONNECTIONS = "tests.app.reusing_celery.app"  # CELERY_DB_REUSE_MAX = 1000


def test_celery_workers_that_reconnect_for_each_delivery_are_W215_under_check_deploy() -> None:
    with _databases_on_postgresql(CONN_MAX_AGE=60), wiring(ASYNC):
        assert deploy_check() == [
            (
                "django_events.W215",
                "CELERY_DB_REUSE_MAX",
                "Celery's Django fixup closes the workers' database connections before and "
                "after every task (CELERY_DB_REUSE_MAX is not set): each delivery that uses "
                "database 'default' in its task (its handler's queries, a Delivery row written "
                "before the acknowledgement) connects again",
            )
        ]
        # A deploy check: `check` and `events_check` leave it out.
        assert_reported()
    with _databases_on_postgresql(CONN_MAX_AGE=0), wiring(ASYNC, CELERY_APP=REUSES_CONNECTIONS):
        assert deploy_check() == [
            (
                "django_events.W215",
                "DATABASES",
                "DATABASES['default'] has CONN_MAX_AGE 0 and no pool, so a worker closes the "
                "connection before each delivery, as Django does at each request: each "
                "delivery that uses database 'default' in its task (its handler's queries, a "
                "Delivery row written before the acknowledgement) connects again",
            )
        ]


@pytest.mark.parametrize(
    ("configure", "reuse"),
    [
        # Celery's Django layout: CELERY_* Django settings (tests.celery_app reads them so).
        (lambda app: override_settings(CELERY_DB_REUSE_MAX=1000), 1000),
        (lambda app: override_settings(CELERY_DB_REUSE_MAX=1), 1),  # closes at every task
        (lambda app: override_settings(CELERY_DB_REUSE_MAX="1000"), "1000"),  # not a number
        (lambda app: override_settings(CELERY_DB_REUSE_MAX=1000.0), 1000.0),
        # The new-style name is not one Celery's fixup reads.
        (lambda app: _conf(app, db_reuse_max=1000), None),
        (lambda app: _conf(app, CELERY_DB_REUSE_MAX=1000), 1000),
    ],
)
def test_W215_reads_celery_db_reuse_max_as_celerys_django_fixup_does(
    configure: Callable[[Any], AbstractContextManager[Any]], reuse: object
) -> None:
    from celery.fixups.django import DjangoWorkerFixup

    from django_events.delivery.broker import celery_app

    with _databases_on_postgresql(CONN_MAX_AGE=60), wiring(ASYNC):
        app = celery_app()
        with configure(app):
            fixup = DjangoWorkerFixup(app)
            warned = [r[2].split(":")[0] for r in deploy_check()]

    assert fixup.db_reuse_max == reuse  # what a worker's fixup reads, as the test expects
    closes_every_task = not (type(reuse) in (int, float) and reuse >= 2)
    assert bool(warned) == closes_every_task, warned
    if reuse is not None and closes_every_task:
        assert warned == [
            "Celery's Django fixup closes the workers' database connections before and after "
            f"every task (CELERY_DB_REUSE_MAX is {reuse!r}, not a number of 2 or more)"
        ]


@contextmanager
def _conf(app: Any, **values: Any) -> Iterator[None]:
    """``values`` set on ``app.conf`` for the block, then taken out (none was set before)."""
    app.conf.update(values)
    try:
        yield
    finally:
        for key in values:
            del app.conf[key]


@pytest.mark.parametrize(
    ("database", "subscription"),
    [
        # A webhook subscription's deliveries run on Celery workers too.
        (
            {"CONN_MAX_AGE": 60},
            {
                "event": "orders.placed",
                "mode": "webhook",
                "url": "https://example.com/in",
                "secret": "WHSEC_W209",
            },
        ),
        # Without CELERY_DB_REUSE_MAX a prefork worker's fixup closes the pool itself.
        ({"CONN_MAX_AGE": 0, "OPTIONS": {"pool": True}}, ASYNC),
    ],
)
def test_W215_counts_webhooks_and_pooled_databases_celery_closes(
    database: dict[str, Any], subscription: dict[str, Any]
) -> None:
    with _databases_on_postgresql(**database), wiring(subscription):
        messages = checks.check_worker_connections()

    assert [(m.id, m.obj) for m in messages] == [("django_events.W215", "CELERY_DB_REUSE_MAX")]


def test_W215_leaves_a_missing_celery_app_to_E203() -> None:
    with _databases_on_postgresql(CONN_MAX_AGE=0), wiring(ASYNC, CELERY_APP="tests.nope.app"):
        assert checks.check_worker_connections() == []
        assert [m.id for m in checks.check_celery()] == ["django_events.E203"]


def test_W215_names_each_database_a_worker_connects_to_again() -> None:
    from unittest import mock

    from django.db import connections

    mysql = {"ENGINE": "django.db.backends.mysql", "CONN_MAX_AGE": 0}
    with (
        _databases_on_postgresql(CONN_MAX_AGE=0),
        mock.patch.dict(connections.settings["other"], mysql),
        wiring(ASYNC, CELERY_APP=REUSES_CONNECTIONS),
    ):
        assert [r[2].split(":")[0] for r in deploy_check()] == [
            "DATABASES['default'] and DATABASES['other'] have CONN_MAX_AGE 0 and no pool, so a "
            "worker closes the connection before each delivery, as Django does at each request"
        ]


@pytest.mark.parametrize(
    ("database", "keys", "subscription"),
    [
        # Celery keeps the connection, and Django too (CONN_MAX_AGE, or its pool).
        ({"CONN_MAX_AGE": 60}, {"CELERY_APP": REUSES_CONNECTIONS}, ASYNC),
        ({"CONN_MAX_AGE": None}, {"CELERY_APP": REUSES_CONNECTIONS}, ASYNC),
        ({"CONN_MAX_AGE": 0, "OPTIONS": {"pool": True}}, {"CELERY_APP": REUSES_CONNECTIONS}, ASYNC),
        # No Celery worker: sync deliveries run in the publishing process, and a task backend's
        # worker is not Celery's.
        ({"CONN_MAX_AGE": 0}, {}, {**ASYNC, "mode": "sync"}),
        ({"CONN_MAX_AGE": 0}, {}, {**ASYNC, "via": "tasks", "retry": {"max_attempts": 1}}),
        # SQLite: a connection is a file opened (IMMEDIATE: no W209).
        (
            {"ENGINE": "django.db.backends.sqlite3", "OPTIONS": {"transaction_mode": "IMMEDIATE"}},
            {},
            ASYNC,
        ),
    ],
)
def test_W215_leaves_out_workers_that_keep_their_connections(
    database: dict[str, Any], keys: dict[str, Any], subscription: dict[str, Any]
) -> None:
    with _databases_on_postgresql(**database), wiring(subscription, **keys):
        assert deploy_check() == []


@contextmanager
def _w215() -> Iterator[None]:
    with _databases_on_postgresql(CONN_MAX_AGE=60), wiring(ASYNC):
        yield


VIA_TASKS = {**ASYNC, "via": "tasks", "retry": {"max_attempts": 1}}  # no E211 on any backend
WEBHOOK_VIA_TASKS = {
    "event": "orders.placed",
    "mode": "webhook",
    "url": "https://example.com/in",
    "secret": "WHSEC_W209",
    "via": "tasks",
    "retry": {"max_attempts": 1},
}


@pytest.mark.parametrize(
    ("subscriptions", "backend", "warned"),
    [
        # ImmediateBackend runs each task inside enqueue(), in the publishing process (Django's
        # default TASKS): no worker writes, as with sync subscriptions.
        ([VIA_TASKS], "immediate", False),
        ([WEBHOOK_VIA_TASKS], "immediate", False),
        ([WEBHOOK_VIA_TASKS], "default", True),
        ([VIA_TASKS], "dummy", False),  # DummyBackend keeps tasks and never runs them
        ([VIA_TASKS], "default", True),  # the database backend's db_worker processes write
        ([VIA_TASKS, {**ASYNC, "name": "on-celery"}], "immediate", True),  # Celery's workers
    ],
)
def test_W209_leaves_out_a_task_backend_that_runs_no_worker(
    subscriptions: list[dict[str, Any]], backend: str, warned: bool
) -> None:
    dummy = {
        "BACKEND": f"{settings.TASKS['immediate']['BACKEND'].rsplit('.', 2)[0]}.dummy.DummyBackend"
    }
    with (
        override_settings(TASKS={**settings.TASKS, "dummy": dummy}),
        _event_log_on_sqlite_locking_late(*subscriptions, TASKS_BACKEND=backend),
    ):
        messages = checks.check_database()

    assert [m.id for m in messages] == (["django_events.W209"] if warned else [])


def test_W209_counts_the_enabled_webhook_endpoints_where_checks_read_the_database() -> None:
    # Endpoints are rows: their deliveries run on workers too, but only a check that may read a
    # database sees them (`check --database`, `migrate`), in the database that holds them.
    from django.core.checks import run_checks

    from django_events.delivery.endpoints import create_endpoint
    from django_events.models import WebhookEndpoint

    def w209(**kwargs: Any) -> list[str]:
        checked = run_checks(tags=["django_events"], **kwargs)
        return [m.msg for m in checked if m.id == "django_events.W209"]

    warning = (
        "Database 'other' (the event log's) is SQLite without a transaction_mode, and workers "
        "write to it while this process does: a transaction that reads before it writes (the "
        'admin\'s retry, events_replay) fails at once with "database is locked"'
    )
    with _event_log_on_sqlite_locking_late():  # no async or webhook subscription
        create_endpoint("https://hooks.example.com/in", ["orders.*"])  # in "other", as routed
        # (Not `run_checks(tags=...)` without databases: Django 6.1 then passes every alias.)
        assert w209(databases=["default"]) == []  # not the database that holds them
        assert w209(databases=["other"]) == [warning]
        for database in ([], ["--database", "other"]):
            err = StringIO()
            call_command("check", *database, stdout=StringIO(), stderr=err)
            assert ("(django_events.W209)" in err.getvalue()) == bool(database)
        with wiring(ASYNC):  # warned once, by the subscription
            assert w209(databases=["other"]) == [warning]
        with wiring(DELIVERY="tasks", TASKS_BACKEND="immediate"):  # sent by the publisher
            assert w209(databases=["other"]) == []
        WebhookEndpoint.objects.using("other").update(enabled=False)  # sent nothing
        assert w209(databases=["other"]) == []


def test_a_filesystem_broker_whose_folder_does_not_exist_is_W206() -> None:
    from tests.app.missing_folder_celery import MISSING

    with wiring(ASYNC, CELERY_APP="tests.app.missing_folder_celery.app"):
        assert_reported(
            (
                "django_events.W206",
                "DJANGO_EVENTS",
                f"Celery app 'missing_folder' uses the filesystem transport, but its folder "
                f"'{MISSING}' does not exist: every publish would find the broker unreachable "
                "and leave its events pending",
            )
        )
    assert not MISSING.exists()  # never created: a folder missing may be a volume unmounted


@pytest.mark.parametrize("kind", ["filesystem", "amqp", "redis"])
def test_the_filesystem_transport_of_django_events_and_other_brokers_are_fine(kind: str) -> None:
    with wiring(ASYNC, CELERY_APP=f"tests.brokers.{kind}"):
        assert_reported()


@pytest.fixture
def broker_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """CELERY_APP for a Celery app with this broker configuration (never connected to)."""

    def make(**conf: Any) -> str:
        name = f"broker_app_{len(list(tmp_path.glob('broker_app_*.py')))}"
        lines = "".join(f"app.conf.{key} = {value!r}\n" for key, value in conf.items())
        write(
            tmp_path / f"{name}.py",
            f"from celery import Celery\napp = Celery({name!r}, set_as_current=False)\n" + lines,
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return f"{name}.app"

    return make


def test_a_broker_url_whose_scheme_names_no_transport_is_E208() -> None:
    with wiring(ASYNC, CELERY_APP="tests.app.misspelt_broker_celery.app"):
        result = assert_reported(
            (
                "django_events.E208",
                "DJANGO_EVENTS",
                "Celery app 'misspelt_broker': broker URL scheme 'redsi://' has no transport "
                "that loads: No such transport: redsi. Did you mean redis?",
            )
        )
        [message] = checks.check_celery()

    assert "s3cret" not in result.stderr and "user" not in result.stderr  # never credentials
    assert message.hint == (
        "Fix the scheme of the broker URL (CELERY_BROKER_URL, or the app's broker_url): "
        "amqp://, redis://, sqs://, filesystem:// and the others kombu knows."
    )


def _kombu_redis_imports(module: str) -> bool:
    import importlib.util

    spec = importlib.util.find_spec("kombu.transport.redis")
    source = Path(spec.origin).read_text() if spec and spec.origin else ""
    return f"from {module}" in source or f"import {module}" in source


@pytest.mark.parametrize(
    ("hidden", "cause", "hint"),
    [
        (
            "redis",
            "AttributeError: 'NoneType' object has no attribute 'Redis'",
            "Install its transport's packages (pip install 'celery[redis]') wherever "
            "publishers and workers run.",
        ),
        pytest.param(
            "packaging.version",
            "ModuleNotFoundError: import of packaging.version halted; None in sys.modules",
            "Install 'packaging' wherever publishers and workers run (for redis://: pip "
            "install 'celery[redis]').",
            # kombu's redis transport imports packaging in some releases only (5.7 does).
            marks=pytest.mark.skipif(
                not _kombu_redis_imports("packaging"),
                reason="this kombu's redis transport does not import packaging",
            ),
        ),
    ],
)
def test_a_broker_transport_whose_modules_are_missing_is_E208(
    broker_app: Callable[..., str],
    without_module: Callable[[str], None],
    hidden: str,
    cause: str,
    hint: str,
) -> None:
    app = broker_app(broker_url="redis://:pw@127.0.0.1:6379/8")
    without_module(hidden)

    with wiring(ASYNC, CELERY_APP=app):
        [message] = checks.check_celery()

    assert (message.id, message.msg) == (
        "django_events.E208",
        f"Celery app {app.split('.')[0]!r}: broker URL scheme 'redis://' has no transport "
        f"that loads: {cause}",
    )
    assert message.hint == hint


def test_a_broker_transport_setting_that_does_not_import_is_E208(
    broker_app: Callable[..., str],
) -> None:
    app = broker_app(broker_url="memory://", broker_transport="tests.app.nope:Transport")

    with wiring(ASYNC, CELERY_APP=app):
        [message] = checks.check_celery()

    assert (message.id, message.msg) == (
        "django_events.E208",
        f"Celery app {app.split('.')[0]!r}: broker transport 'tests.app.nope:Transport' "
        "(broker_transport) does not load: ModuleNotFoundError: No module named 'tests.app.nope'",
    )


@pytest.mark.parametrize(
    "conf",
    [
        {"broker_url": "amqp://guest:guest@127.0.0.1:5672//"},
        {"broker_url": "memory://;amqp://127.0.0.1//"},
        {"broker_url": "amqp://127.0.0.1//", "broker_read_url": "redis://127.0.0.1:6379/8"},
        {},  # no URL: Celery's default, amqp on localhost
    ],
)
def test_broker_urls_whose_transports_load_are_fine(
    broker_app: Callable[..., str], conf: dict[str, str]
) -> None:
    with wiring(ASYNC, CELERY_APP=broker_app(**conf)):
        assert checks.check_celery() == []


def test_each_failover_and_read_url_is_checked(broker_app: Callable[..., str]) -> None:
    app = broker_app(broker_url="amqp://127.0.0.1//;amqqp://127.0.0.1//")
    read = broker_app(broker_url="amqp://127.0.0.1//", broker_read_url="redsi://127.0.0.1/8")

    listed = broker_app(broker_url=["amqp://127.0.0.1//", "redsi://127.0.0.1/8"])

    for celery_app in (app, read, listed):
        with wiring(ASYNC, CELERY_APP=celery_app):
            assert [m.id for m in checks.check_celery()] == ["django_events.E208"]


def test_a_list_of_failover_urls_that_load_is_fine(broker_app: Callable[..., str]) -> None:
    app = broker_app(broker_url=["amqp://127.0.0.1//", "memory://"])
    with wiring(ASYNC, CELERY_APP=app):
        assert checks.check_celery() == []


# -- every problem at once ---------------------------------------------------------------------


def test_events_check_lists_every_problem_at_once(tmp_path: Path) -> None:
    path, _ = manifest(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced:
            schema: {type: objekt}
        subscriptions:
          - event: billing.paid
            handler: tests.app.handlers.record
          - event: orders.placed
            handler: tests.app.handlers.not_callable
          - event: orders.*
            handler: tests.app.nope.handler
            mode: async
          - event: refunds.*
            handler: tests.app.handlers.record
        """,
    )
    missing = tmp_path / "missing.yaml"

    with wiring(MANIFESTS=[BASE, path, missing], CELERY_APP="tests.celery_app.nope"):
        result = events_check()

    assert result.error is not None
    assert str(result.error) == "6 problem(s) found in the events configuration."
    assert [(i, obj) for i, obj, _ in result.reported] == sorted(
        [
            ("django_events.E101", str(missing)),
            ("django_events.E104", f"{path}:3"),
            ("django_events.E105", f"{path}:6"),
            ("django_events.W101", f"{path}:13"),
            ("django_events.E202", f"{path}:8"),
            ("django_events.E201", f"{path}:10"),
            ("django_events.E203", "DJANGO_EVENTS"),
        ]
    )
    assert "W101" not in result.stderr and "W101" in result.stdout


def test_events_check_exits_1_from_the_command_line(tmp_path: Path) -> None:
    broken = write(
        tmp_path / "broken.yaml",
        """
        version: 1
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.not_callable
          - event: nowhere
            handler: tests.app.handlers.record
        """,
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_TEST_MANIFEST": str(broken),
    }

    run = subprocess.run(
        [sys.executable, "-m", "django", "events_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert run.returncode == 1, run.stderr
    assert parse(run.stderr) == [
        (
            "django_events.E105",
            f"{broken}:5",
            "Subscription 'nowhere:tests.app.handlers.record' "
            "subscribes to an undeclared event: 'nowhere'",
        ),
        (
            "django_events.E202",
            f"{broken}:3",
            "Subscription 'orders.placed:tests.app.handlers."
            "not_callable': Handler 'tests.app.handlers."
            "not_callable' is not callable",
        ),
    ]
    assert run.stderr.rstrip().endswith(
        "CommandError: 2 problem(s) found in the events configuration."
    )


# -- the ids themselves ------------------------------------------------------------------------


def _dup_event() -> AbstractContextManager[Any]:
    return wiring(EVENTS={"orders.placed": {}})


def _dup_subscription() -> AbstractContextManager[Any]:
    sub = {"event": "orders.placed", "handler": RECORD}
    return wiring(sub, sub)


def _manifest_text(text: str) -> Callable[[Path], AbstractContextManager[Any]]:
    def make(tmp_path: Path) -> AbstractContextManager[Any]:
        return manifest(tmp_path, text)[1]

    return make


@contextmanager
def _inbound(block: dict[str, Any], **settings_: Any) -> Iterator[None]:
    with wiring(EVENTS={"hooks.x": {"inbound": block}}), override_settings(**settings_):
        yield


@contextmanager
def _stale_lock(tmp_path: Path) -> Iterator[None]:
    lock = tmp_path / "events.lock.json"
    lock.write_text('{"format": 1, "events": {}, "subscriptions": {}, "queues": []}')
    with wiring(LOCK_FILE=str(lock)):
        yield


def _source(body: str, **settings_: Any) -> Callable[[Path], AbstractContextManager[Any]]:
    text = "version: 1\nevents:\n  gh.push: {}\nsources:\n  s: " + body + "\n"

    @contextmanager
    def make(tmp_path: Path) -> Iterator[None]:
        with manifest(tmp_path, text)[1], override_settings(S_OK="x", **settings_):
            yield

    return make


@contextmanager
def _without_standardwebhooks(tmp_path: Path) -> Iterator[None]:
    body = "{auth: standard-webhooks, secret: S_OK, events: {}}"
    with _source(body)(tmp_path), pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "standardwebhooks", None)  # import fails
        yield


@contextmanager
def _dup_source(tmp_path: Path) -> Iterator[None]:
    text = "version: 1\nsources:\n  s: {auth: token, secret: S_OK, events: {}}\n"
    first, second = write(tmp_path / "a.yaml", text), write(tmp_path / "b.yaml", text)
    with wiring(MANIFESTS=[BASE, first, second]), override_settings(S_OK="x"):
        yield


WEBHOOK = {
    "event": "orders.placed",
    "mode": "webhook",
    "name": "hook",
    "url": "https://hooks.example.com/in",
    "secret": "TEST_WH_SECRET",
}


@contextmanager
def _without_httpx(tmp_path: Path) -> Iterator[None]:
    with (
        wiring(WEBHOOK),
        override_settings(TEST_WH_SECRET="whsec_c2VjcmV0"),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setitem(sys.modules, "httpx", None)  # import fails
        yield


@contextmanager
def _endpoint_without_httpx(tmp_path: Path) -> Iterator[None]:
    from django_events.delivery.endpoints import create_endpoint

    create_endpoint("https://hooks.example.com/in", ["orders.*"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "httpx", None)  # import fails
        yield


@contextmanager
def _endpoint_with_credentials(tmp_path: Path) -> Iterator[None]:
    from django_events.delivery.endpoints import create_endpoint
    from django_events.models import WebhookEndpoint

    endpoint, _ = create_endpoint("https://hooks.example.com/in", ["orders.*"])
    # Saved before such URLs were refused (create_endpoint and the admin refuse them now).
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(url="https://u:pw@hooks.example.com/")
    yield


@contextmanager
def _endpoint_refused(tmp_path: Path) -> Iterator[None]:
    from django_events.delivery.endpoints import create_endpoint
    from django_events.models import WebhookEndpoint

    endpoint, _ = create_endpoint("https://hooks.example.com/in", ["orders.*"])
    # Saved before create_endpoint applied the form's rules (it refuses them now).
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(url="http://hooks.example.com/in")
    yield


@contextmanager
def _settings(wired: AbstractContextManager[Any], **values: Any) -> Iterator[None]:
    """``wired`` with Django settings of its own (not DJANGO_EVENTS keys)."""
    with wired, override_settings(**values):
        yield


TRIGGERS: dict[str, Callable[[Path], AbstractContextManager[Any]]] = {
    "django_events.E001": lambda _: wiring(RECORD="never"),
    "django_events.W001": lambda _: wiring(UNKNOWN=1),
    "django_events.W002": lambda _: override_settings(DJANGO_EVENTS={"DELIVERY": "tasks"}),
    "django_events.E002": lambda _: wiring(PIPELINE=["tests.app.nope.X"]),
    "django_events.E101": lambda p: wiring(MANIFESTS=[p / "missing.yaml"]),
    "django_events.E102": _manifest_text("version: 1\nevents: [\n"),
    "django_events.E103": _manifest_text("version: 2\n"),
    "django_events.E104": lambda _: wiring(EVENTS={"x.y": {"schema": {"type": 3}}}),
    "django_events.E105": lambda _: wiring({"event": "x.y", "handler": RECORD}),
    "django_events.W101": lambda _: wiring({"event": "x.*", "handler": RECORD}),
    "django_events.W102": lambda _: wiring(
        {"event": "orders.placed", "handler": RECORD, "queue": "q"}
    ),
    "django_events.E106": lambda _: _dup_event(),
    "django_events.E107": lambda _: _dup_subscription(),
    "django_events.E108": lambda _: wiring(
        {"event": "orders.placed", "handler": RECORD, "when": {"any": []}}
    ),
    "django_events.W108": lambda _: wiring(
        {"event": "orders.placed", "handler": RECORD, "when": {"total": {"gtee": 1}}}
    ),
    "django_events.E109": lambda _: wiring(EVENTS={"x.y": {"type": "tests.app.nope.T"}}),
    "django_events.W112": lambda _: wiring(EVENTS={"x.y": {"schema": SCHEMA, "redact": ["x"]}}),
    "django_events.W113": lambda _: wiring(
        {"event": "orders.placed", "handler": RECORD, "when": {"totl": 1}}
    ),
    "django_events.W114": lambda _: wiring(
        {"event": "orders.placed", "handler": RECORD, "when": {"total": {"gte": "1"}}}
    ),
    "django_events.E110": lambda _: wiring(PIPELINE=["tests.app.handlers.not_callable"]),
    "django_events.E111": lambda _: wiring(
        {**ASYNC, "broadcast": True, "idempotent": True, "name": "bc"}
    ),
    "django_events.W110": lambda _: wiring(
        {**ASYNC, "broadcast": True, "retry": {"max_attempts": 2}, "name": "bc"}
    ),
    "django_events.E160": lambda _: wiring(
        {"event": "orders.placed", "handler": RECORD, "ordering_key": "order_id"}
    ),
    "django_events.E161": lambda _: wiring(
        {**ASYNC, "broadcast": True, "ordering_key": "order_id", "name": "bc"}
    ),
    "django_events.E162": lambda _: wiring({**ASYNC, "ordering_key": "customer.id"}),
    "django_events.W160": lambda _: wiring({**ASYNC, "ordering_key": "email"}),
    "django_events.E120": lambda _: wiring(
        {"event": "orders.placed", "handler": "tests.app.handlers.record_async", "mode": "inline"}
    ),
    "django_events.E210": lambda _: wiring({**ASYNC, "via": "tasks"}, TASKS_BACKEND="nope"),
    "django_events.E211": lambda _: wiring(
        {**ASYNC, "via": "tasks", "retry": {"max_attempts": 2}}, TASKS_BACKEND="immediate"
    ),
    "django_events.E212": lambda _: wiring({**ASYNC, "via": "tasks", "broadcast": True}),
    "django_events.E213": lambda _: wiring({**ASYNC, "via": "tasks"}, TASKS_BACKEND="narrow"),
    "django_events.E130": lambda _: wiring(
        EVENTS={"x.y": {"version": 2, "upcast": {2: "tests.app.upcasters.add_channel"}}}
    ),
    "django_events.E131": lambda _: wiring(
        EVENTS={"x.y": {"version": 2, "upcast": {1: "tests.app.upcasters.not_callable"}}}
    ),
    "django_events.W130": _stale_lock,
    "django_events.E214": lambda _: wiring({**ASYNC, "via": "tasks", "timeout": 30}),
    "django_events.E201": lambda _: wiring(
        {"event": "orders.placed", "handler": "tests.app.nope.h"}
    ),
    "django_events.E202": lambda _: wiring(
        {"event": "orders.placed", "handler": "tests.app.handlers.not_callable"}
    ),
    "django_events.E207": lambda _: wiring(
        {"event": "orders.placed", "handler": "tests.app.handlers.takes_no_event"}
    ),
    "django_events.E203": lambda _: wiring(ASYNC, CELERY_APP="tests.nope.app"),
    "django_events.E204": lambda _: wiring(ASYNC, CELERY_APP="tests.app.pickle_celery.app"),
    "django_events.W205": lambda _: wiring(
        ASYNC, CELERY_APP="tests.app.stock_filesystem_celery.app"
    ),
    "django_events.W206": lambda _: wiring(ASYNC, CELERY_APP="tests.app.missing_folder_celery.app"),
    "django_events.E208": lambda _: wiring(
        ASYNC, CELERY_APP="tests.app.misspelt_broker_celery.app"
    ),
    "django_events.W209": lambda _: _event_log_on_sqlite_locking_late(ASYNC),
    "django_events.W215": lambda _: _w215(),
    "django_events.E301": lambda _: _inbound({"auth": "token", "secret": "NO_SUCH_SECRET_E301"}),
    "django_events.E302": lambda _: _inbound(
        {"auth": "hmac", "secret": "EMPTY_SECRET_E302"}, EMPTY_SECRET_E302=""
    ),
    "django_events.W301": lambda _: _inbound({"auth": "permission", "permission": "testapp.fly"}),
    "django_events.W302": lambda _: _inbound(
        {"auth": "token", "secret": "SECRET_KEY", "tolerance": 5}
    ),
    "django_events.W303": lambda _: _inbound(
        {"auth": "token", "secret": "SECRET_KEY"}, ROOT_URLCONF="tests.app.urls_without_events"
    ),
    "django_events.E310": _source("{auth: basic, secret: S_OK, events: {}}"),
    "django_events.E311": _source("{auth: github, secret: S_OK, events: {push: nope.x}}"),
    "django_events.E312": _source("{auth: github, secret: NO_SUCH_SECRET_E312, events: {}}"),
    "django_events.E313": _source("{auth: github, secret: S_EMPTY, events: {}}", S_EMPTY=""),
    "django_events.E314": _dup_source,
    "django_events.E315": _without_standardwebhooks,
    "django_events.W310": _source("{auth: github, secret: S_OK, tolerance: 1, events: {}}"),
    "django_events.W312": _source("{auth: stripe, secret: S_OK, events: {}}"),
    "django_events.E320": lambda _: wiring(
        {**WEBHOOK, "url": "NO_SUCH_URL_E320"}, TEST_WH_SECRET="whsec_c2VjcmV0"
    ),
    "django_events.E321": lambda _: wiring(WEBHOOK),
    "django_events.W321": lambda _: _settings(wiring(WEBHOOK), TEST_WH_SECRET="c2VjcmV0"),
    "django_events.E322": _without_httpx,
    "django_events.W320": lambda _: wiring(WEBHOOKS_ALLOW_PRIVATE=True),
    "django_events.E323": lambda _: wiring(
        {"event": "orders.placed", "handler": "tests.app.handlers.record", "name": "endpoint:x"}
    ),
    "django_events.E324": _endpoint_without_httpx,
    "django_events.E325": lambda _: wiring(
        {**WEBHOOK, "url": "https://u:pw@hooks.example.com/in"}, TEST_WH_SECRET="whsec_c2VjcmV0"
    ),
    "django_events.E326": _endpoint_with_credentials,
    "django_events.E327": _endpoint_refused,
    "django_events.W311": _source(
        "{auth: github, secret: S_OK, events: {}}", ROOT_URLCONF="tests.app.urls_without_events"
    ),
}


def test_every_check_id_is_well_formed_unique_and_has_a_trigger_here() -> None:
    ids = list(CHECK_IDS)
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"django_events\.[EW]\d{3}", i) for i in ids), ids
    assert all(CHECK_IDS[i] for i in ids)  # every id has a summary
    assert set(TRIGGERS) == set(ids)


@pytest.mark.parametrize("check_id", sorted(TRIGGERS))
def test_each_id_is_emitted_at_the_level_its_letter_says(
    check_id: str, tmp_path: Path, pickle_app: str
) -> None:
    from django.core.checks import run_checks

    with TRIGGERS[check_id](tmp_path):
        # `databases`: as `check --database default` and `migrate` run them (E324 reads rows);
        # with the deploy checks, as `check --deploy` (W215).
        checked = run_checks(
            tags=["django_events"], databases=["default"], include_deployment_checks=True
        )
        messages = [m for m in checked if m.id == check_id]

    assert messages, f"{check_id} was not emitted"
    expected = Error if check_id.split(".")[1].startswith("E") else Warning
    assert all(type(m) is expected for m in messages), messages


# Read from the database, only by `check --database` and `migrate` (events_check reads none).
DATABASE_CHECKS = {"django_events.E324", "django_events.E326", "django_events.E327"}
DEPLOY_CHECKS = {"django_events.W215"}  # only `check --deploy`: production settings


@pytest.mark.parametrize("check_id", sorted(set(TRIGGERS) - DATABASE_CHECKS - DEPLOY_CHECKS))
def test_events_check_reports_each_id_the_system_checks_do(
    check_id: str, tmp_path: Path, pickle_app: str
) -> None:
    with TRIGGERS[check_id](tmp_path):
        result = events_check()

    assert check_id in {reported[0] for reported in result.reported}, result.stdout + result.stderr
    assert (result.error is not None) == (".E" in check_id)


def test_docs_list_every_check_id() -> None:
    docs = ROOT / "docs" / "checks.md"
    if not docs.exists():
        pytest.skip("docs/checks.md is not written yet")
    text = docs.read_text(encoding="utf-8")

    assert [i for i in CHECK_IDS if i not in text] == []
    documented = set(re.findall(r"django_events\.[EW]\d{3}", text))
    assert documented - set(CHECK_IDS) == set()  # no id documented that checks.py lacks


def test_enabled_endpoints_without_httpx_are_an_error_where_checks_read_the_database(
    tmp_path: Path,
) -> None:
    from django.core.checks import run_checks

    from django_events.models import WebhookEndpoint

    with _endpoint_without_httpx(tmp_path):
        # `manage.py check` without --database reads no rows (Django 6.1 hands every alias
        # to a check run without tags, so the check is tagged "database").
        assert [m for m in run_checks() if m.id.endswith("E324")] == []
        out, err = StringIO(), StringIO()
        with pytest.raises(SystemCheckError) as caught:
            call_command("check", "--database", "default", stdout=out, stderr=err)
        assert parse(str(caught.value)) == [
            (
                "django_events.E324",
                "django_events.WebhookEndpoint",
                "1 webhook endpoint(s) enabled in database 'default' but httpx is not installed",
            )
        ]
        assert "HINT: pip install 'django-event-wiring[webhooks]', or disable them" in str(
            caught.value
        )
        WebhookEndpoint.objects.update(enabled=False)  # disabled ones are sent nothing
        call_command("check", "--database", "default", stdout=out, stderr=err)
    # With httpx (the webhooks extra, installed here): nothing to report.
    WebhookEndpoint.objects.update(enabled=True)
    call_command("check", "--database", "default", stdout=out, stderr=err)


def test_enabled_endpoint_urls_with_credentials_are_an_error_where_checks_read_the_database(
    tmp_path: Path,
) -> None:
    """A disabled endpoint is not reported, as by E327: it is sent nothing, and neither its
    form nor "Enable selected" enables it again with that URL."""
    from django.core.checks import run_checks

    from django_events.delivery.endpoints import create_endpoint
    from django_events.models import WebhookEndpoint

    create_endpoint("https://hooks.example.com/a@b?to=x@example.com", ["orders.*"])  # no userinfo
    call_command("check", "--database", "default", stdout=StringIO(), stderr=StringIO())
    with _endpoint_with_credentials(tmp_path):
        assert [m for m in run_checks() if m.id.endswith("E326")] == []
        with pytest.raises(SystemCheckError) as caught:
            call_command("check", "--database", "default", stdout=StringIO(), stderr=StringIO())
        WebhookEndpoint.objects.filter(url__contains="pw@").update(enabled=False)
        call_command("check", "--database", "default", stdout=StringIO(), stderr=StringIO())
    assert parse(str(caught.value)) == [
        (
            "django_events.E326",
            "django_events.WebhookEndpoint",
            "1 enabled webhook endpoint(s) in database 'default' have a user name or password "
            "in their URL",
        )
    ]
    assert "pw" not in str(caught.value).replace("password", "")


NOT_PUBLIC = (
    "is not a public address (private, loopback, link-local and reserved ones only with "
    "DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] on)."
)


def test_endpoint_urls_refused_now_are_an_error_each_where_checks_read_the_database() -> None:
    """Endpoints saved before create_endpoint() applied the form's URL rules: each enabled
    one is named, with its URL as check_url shows it (never its path or query) and the rule."""
    from django.core.checks import run_checks

    from django_events.delivery.endpoints import create_endpoint
    from django_events.models import WebhookEndpoint

    stored = {
        "http://hooks.example.com/in?token=t-123": "CRM",
        "https://10.0.0.7:8443/p/t-123": "",
        "https://localhost/in": "local",
        "https://localhost./in": "fqdn",  # Django's URLField refuses it: stored before
        "https://[::1]/in": "off",  # disabled: sent nothing
    }
    made = []
    for url, description in stored.items():
        endpoint, _ = create_endpoint("https://hooks.example.com/in", ["orders.*"])
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
            url=url, description=description, enabled=description != "off"
        )
        made.append(endpoint.pk)
    create_endpoint("https://8.8.8.8/in", ["orders.*"])  # a public address: fine
    assert [m for m in run_checks() if m.id.endswith("E327")] == []  # reads no database
    with pytest.raises(SystemCheckError) as caught:
        call_command("check", "--database", "default", stdout=StringIO(), stderr=StringIO())

    crm, private, local, fqdn, _ = made
    https_only = (
        "use an https:// URL (http:// only with DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] on)."
    )
    assert parse(str(caught.value)) == sorted(
        ("django_events.E327", "django_events.WebhookEndpoint", message)
        for message in (
            f"Webhook endpoint {crm} ('CRM') in database 'default': Refused "
            f"http://hooks.example.com/: {https_only}",
            f"Webhook endpoint {private} in database 'default': Refused https://10.0.0.7:8443/: "
            f"10.0.0.7 {NOT_PUBLIC}",
            f"Webhook endpoint {local} ('local') in database 'default': Refused "
            f"https://localhost/: localhost {NOT_PUBLIC}",
            f"Webhook endpoint {fqdn} ('fqdn') in database 'default': Refused "
            f"https://localhost./: localhost {NOT_PUBLIC}",
        )
    )
    assert "t-123" not in str(caught.value)
    assert (
        str(caught.value).count(
            "HINT: Each delivery to it is refused: give it an https:// URL of a public address in "
            "the admin, or disable or delete it."
        )
        == 4
    )
    allowed = {**settings.DJANGO_EVENTS, "WEBHOOKS_ALLOW_PRIVATE": True}
    with override_settings(DJANGO_EVENTS=allowed):  # sent, then (W320 tells of the setting)
        checked = run_checks(tags=["django_events"], databases=["default"])
    assert [m for m in checked if m.id.endswith("E327")] == []


def test_check_by_tag_reads_the_endpoints_from_django_6_1_on(tmp_path: Path) -> None:
    """`check --tag django_events` without --database: Django 6.1 runs the checks that read
    rows against every database (docs/checks.md), Django 5.2 and 6.0 against none."""
    import django

    from django_events.models import WebhookEndpoint

    def check_by_tag() -> None:
        call_command("check", "--tag", "django_events", stdout=StringIO(), stderr=StringIO())

    with _endpoint_refused(tmp_path):
        refused = WebhookEndpoint.objects.get()
        if django.VERSION < (6, 1):
            check_by_tag()  # no SystemCheckError: the endpoint was not read
            return
        with pytest.raises(SystemCheckError) as caught:
            check_by_tag()
    assert parse(str(caught.value)) == [
        (
            "django_events.E327",
            "django_events.WebhookEndpoint",
            f"Webhook endpoint {refused.pk} in database 'default': Refused "
            "http://hooks.example.com/: use an https:// URL (http:// only with "
            "DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] on).",
        )
    ]


def test_a_timeout_is_an_error_via_tasks_only() -> None:
    from django.core.checks import run_checks

    with wiring(
        {**ASYNC, "via": "tasks", "timeout": 30, "name": "slow-task"},
        {**ASYNC, "timeout": 30, "name": "slow-celery"},
    ):
        [message] = [m for m in run_checks(tags=["django_events"]) if m.id.endswith("E214")]

    assert message.msg == (
        "Subscription 'slow-task' has timeout 30, which task backends cannot enforce"
    )
    assert message.hint == "Use via: celery for a time limit, or remove timeout."


def test_a_webhooks_timeout_via_tasks_is_no_error() -> None:
    # A webhook's timeout is its HTTP client's (each phase of the call), enforced under any
    # worker: E214 is about a handler's time limit, which only Celery enforces.
    hook = {**WEBHOOK, "timeout": 5, "retry": {"max_attempts": 1}}
    with wiring(hook, DELIVERY="tasks"), override_settings(TEST_WH_SECRET="whsec_c2VjcmV0"):
        assert_reported()


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ({"mode": "inline"}, ["django_events.E160"]),
        ({"mode": "sync"}, ["django_events.E160"]),
        ({"mode": "async", "broadcast": True}, ["django_events.E161"]),
        ({"mode": "async", "ordering_key": "order_id.x"}, ["django_events.E162"]),
        ({"mode": "async", "ordering_key": "nope"}, ["django_events.E162"]),
        ({"mode": "async", "ordering_key": "email"}, ["django_events.W160"]),
        ({"mode": "async"}, []),
        ({"mode": "webhook", "handler": None, "url": "https://x.example", "secret": "WH"}, []),
    ],
)
def test_ordering_key_checks(declared: dict[str, Any], expected: list[str]) -> None:
    from django.core.checks import run_checks

    sub = {"event": "orders.placed", "handler": RECORD, "ordering_key": "order_id", **declared}
    sub = {k: v for k, v in sub.items() if v is not None}  # a webhook has no handler
    with wiring({**sub, "name": "ordered"}):
        messages = [
            m for m in run_checks(tags=["django_events"]) if m.id.split(".")[1][1:3] == "16"
        ]
    assert [m.id for m in messages] == expected
    assert all("'ordered'" in m.msg for m in messages)


def test_ordering_key_follows_nested_properties_and_refs() -> None:
    from django_events.wiring.building import schema_path

    schema = {
        "type": "object",
        "required": ["customer"],
        "properties": {"customer": {"$ref": "#/$defs/C"}},
        "$defs": {"C": {"type": "object", "required": ["id"], "properties": {"id": {}}}},
    }
    assert schema_path(schema, "customer.id") is True
    assert schema_path(schema, "customer.name") is None
    assert schema_path({"properties": {"a": {}}}, "a") is False
    assert schema_path(True, "a") is None


def test_publish_in_a_project_without_django_events_installed_says_to_add_it(
    tmp_path: Path,
) -> None:
    # A project that forgot "django_events" in INSTALLED_APPS: the first import of publish()
    # (a views module, say) used to fail with Django's "Model class ... isn't in an
    # application in INSTALLED_APPS", which did not say what to add.
    (tmp_path / "forgot_settings.py").write_text(
        textwrap.dedent(
            """
            SECRET_KEY = "x"
            INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]
            DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
            DJANGO_EVENTS = {"EVENTS": {"shop.paid": {}}}
            """
        )
    )
    code = "import django; django.setup(); from django_events import publish"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "forgot_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }

    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )

    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: django_events is not in INSTALLED_APPS: "
        'add "django_events" to INSTALLED_APPS to publish events (its models, task, checks and '
        "management commands need it)."
    )
