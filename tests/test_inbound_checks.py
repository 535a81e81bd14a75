"""System checks and events_check on inbound declarations (E301-W303, and the schema's E103)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from django.test import override_settings

from tests.test_checks import BASE, assert_reported, events_check, manifest, wiring, write

pytestmark = pytest.mark.django_db(databases="__all__")

WHERE = "settings.DJANGO_EVENTS['EVENTS']['hooks.x']"


def inbound(block: dict) -> override_settings:
    return wiring(EVENTS={"hooks.x": {"inbound": block}})


def test_valid_inbound_declarations_check_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN_FROM_ENV", "t0k")
    events = {
        "hooks.a": {"inbound": {"auth": "hmac", "secret": "HOOK_SECRETS", "tolerance": 30}},
        "hooks.b": {"inbound": {"auth": "token", "secret": "HOOK_TOKEN_FROM_ENV"}},
        "hooks.c": {"inbound": {"auth": "permission", "permission": "testapp.change_order"}},
        "hooks.d": {"inbound": {"auth": "permission", "permission": "auth.view_user"}},
    }
    with wiring(EVENTS=events), override_settings(HOOK_SECRETS={"psp": "s1", "ops": "s2"}):
        assert_reported()


def test_a_secret_named_nowhere_is_e301(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOOK_MISSING_SECRET", raising=False)
    with inbound({"auth": "hmac", "secret": "HOOK_MISSING_SECRET"}):
        assert_reported(
            (
                "django_events.E301",
                WHERE,
                "Event 'hooks.x': inbound secret 'HOOK_MISSING_SECRET' is neither a setting "
                "nor an environment variable",
            )
        )


@pytest.mark.parametrize("value", ["", [], ["ok", ""], {"psp": 3}, 42])
def test_an_empty_or_misshapen_secret_is_e302(value: object) -> None:
    with inbound({"auth": "token", "secret": "HOOK_BAD"}), override_settings(HOOK_BAD=value):
        assert_reported(
            (
                "django_events.E302",
                WHERE,
                "Event 'hooks.x': inbound secret 'HOOK_BAD' must be a non-empty string, a "
                "list of them or a dict of caller name to one",
            )
        )


def test_an_undeclared_permission_is_w301() -> None:
    with inbound({"auth": "permission", "permission": "testapp.launch_order"}):
        assert_reported(
            (
                "django_events.W301",
                WHERE,
                "Event 'hooks.x': no model declares permission 'testapp.launch_order'",
            )
        )


def test_options_of_another_auth_are_w302() -> None:
    block = {"auth": "permission", "permission": "testapp.add_order", "secret": "SECRET_KEY"}
    with inbound(block):
        assert_reported(
            (
                "django_events.W302",
                WHERE,
                "Event 'hooks.x': inbound secret has no effect with auth: permission",
            )
        )
    with inbound({"auth": "token", "secret": "SECRET_KEY", "tolerance": 9}):
        assert_reported(
            (
                "django_events.W302",
                WHERE,
                "Event 'hooks.x': inbound tolerance has no effect with auth: token",
            )
        )


def test_inbound_events_without_the_urls_are_w303() -> None:
    with (
        inbound({"auth": "token", "secret": "SECRET_KEY"}),
        override_settings(ROOT_URLCONF="tests.app.urls_without_events"),
    ):
        assert_reported(
            (
                "django_events.W303",
                "ROOT_URLCONF",
                "Events accept inbound calls but django_events.urls is not included",
            )
        )


def test_unknown_auth_and_missing_keys_fail_the_manifest_schema(tmp_path: Path) -> None:
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          hooks.a:
            inbound: {auth: basic, secret: S}
          hooks.b:
            inbound:
              auth: hmac
          hooks.c:
            inbound: {auth: permission, secret: NOT_A_SECRET_NAME!}
          hooks.d:
            inbound: {auth: token, secret: "sk_live_4eC39HqLyjWDarjtT1zdp7dc", max_body: 0}
        """,
    )
    with settings_:
        assert_reported(
            (
                "django_events.E103",
                f"{path}:4",
                "$.events['hooks.a'].inbound.auth: 'basic' is not one of "
                "['hmac', 'token', 'permission']",
            ),
            (
                "django_events.E103",
                f"{path}:6",
                "$.events['hooks.b'].inbound: 'secret' is a required property",
            ),
            (
                "django_events.E103",
                f"{path}:9",
                "$.events['hooks.c'].inbound: 'permission' is a required property",
            ),
            (
                "django_events.E103",
                f"{path}:9",
                "$.events['hooks.c'].inbound.secret: '•••' does not match '^[A-Z][A-Z0-9_]*$'",
            ),
            (
                "django_events.E103",
                f"{path}:11",
                # Masked: a secret typed where its name belongs must not reach the CI logs.
                "$.events['hooks.d'].inbound.secret: '•••' does not match '^[A-Z][A-Z0-9_]*$'",
            ),
            (
                "django_events.E103",
                f"{path}:11",
                "$.events['hooks.d'].inbound.max_body: 0 is less than the minimum of 1",
            ),
        )


def test_windows_no_date_can_end_fail_the_manifest_schema(tmp_path: Path) -> None:
    """Past year 9999 every signed or keyed call would be a 500 (after its publish)."""
    path, settings_ = manifest(
        tmp_path,
        """
        version: 1
        events:
          hooks.a:
            inbound:
              auth: hmac
              secret: S
              tolerance: 1000000000000
              idempotency_retention: 1000000000000
        """,
    )
    with settings_:
        assert_reported(
            *(
                (
                    "django_events.E103",
                    f"{path}:{line}",
                    f"$.events['hooks.a'].inbound.{option}: "
                    "1000000000000 is greater than the maximum of 3153600000",
                )
                for line, option in ((7, "tolerance"), (8, "idempotency_retention"))
            )
        )


def test_a_bad_inbound_max_body_setting_is_e001() -> None:
    with wiring(INBOUND_MAX_BODY="256k"):
        assert_reported(
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                "DJANGO_EVENTS['INBOUND_MAX_BODY'] is '256k'",
            )
        )


# -- sources (webhooks from providers): E310-E315, W310, W311 ----------------------------------

SOURCE_EVENTS = """
version: 1
events:
  gh.push: {}
sources:
"""


def test_valid_sources_check_clean(tmp_path: Path) -> None:
    _, settings_ = manifest(
        tmp_path,
        SOURCE_EVENTS
        + """
          gh: {auth: github, secret: S_GH, events: {push: gh.push}}
          sw: {auth: standard-webhooks, secret: S_SW, events: {push: gh.push}}
          st: {auth: stripe, secret: S_ST, tolerance: 60, events: {push: gh.push}}
        """,
    )
    with settings_, override_settings(S_GH="x", S_SW="whsec_c2VjcmV0", S_ST="whsec_1"):
        assert_reported()


def test_source_checks_report_each_problem_with_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("S_MISSING", raising=False)
    path, settings_ = manifest(
        tmp_path,
        SOURCE_EVENTS
        + """
          a: {auth: gitlab, secret: S_GH, events: {push: gh.push}}
          b: {auth: github, secret: S_GH, events: {push: gh.pushed, issues: gh.issue}}
          c: {auth: github, secret: S_MISSING, events: {push: gh.push}}
          d: {auth: standard-webhooks, secret: S_BAD, events: {push: gh.push}}
          e: {auth: token, secret: S_GH, tolerance: 5, events: {push: gh.push}}
        """,
    )
    with settings_, override_settings(S_GH="x", S_BAD="not base64!"):
        assert_reported(
            ("django_events.E310", f"{path}:6", "Source 'a': unknown auth 'gitlab'"),
            (
                "django_events.E311",
                f"{path}:7",
                "Source 'b' maps 'issues' to an undeclared event: 'gh.issue'",
            ),
            (
                "django_events.E311",
                f"{path}:7",
                "Source 'b' maps 'push' to an undeclared event: 'gh.pushed'",
            ),
            (
                "django_events.E312",
                f"{path}:8",
                "Source 'c': secret 'S_MISSING' is neither a setting nor an environment variable",
            ),
            (
                "django_events.E313",
                f"{path}:9",
                "Source 'd': secret 'S_BAD' must be a Standard Webhooks secret: whsec_ and base64",
            ),
            (
                "django_events.W310",
                f"{path}:10",
                "Source 'e': tolerance has no effect with auth: token",
            ),
        )


def test_a_source_secret_not_in_its_providers_format(tmp_path: Path) -> None:
    """Stripe's signing secrets, and Standard Webhooks', start with whsec_. The stripe library
    keys its HMAC with any text, and standardwebhooks decodes base64 without the prefix too:
    only an API key is certainly wrong (every call would be refused, 401)."""
    sw_bare = base64.b64encode(b"partner-secret").decode()
    path, settings_ = manifest(
        tmp_path,
        SOURCE_EVENTS
        + """
          live: {auth: stripe, secret: S_LIVE, events: {push: gh.push}}
          rotating: {auth: stripe, secret: S_ROTATING, events: {push: gh.push}}
          other: {auth: stripe, secret: S_OTHER, events: {push: gh.push}}
          sw: {auth: standard-webhooks, secret: S_SW, events: {push: gh.push}}
        """,
    )
    with (
        settings_,
        override_settings(
            S_LIVE="sk_live_51HabcDEFghiJKLmno",
            S_ROTATING=["whsec_old", "rk_test_51Habc"],
            S_OTHER="my-stripe-secret",
            S_SW=sw_bare,
        ),
    ):
        result = assert_reported(
            (
                "django_events.E313",
                f"{path}:6",
                "Source 'live': secret 'S_LIVE' holds a Stripe API key (sk_...), not the "
                "endpoint's signing secret (whsec_...)",
            ),
            (
                "django_events.E313",
                f"{path}:7",
                "Source 'rotating': secret 'S_ROTATING' holds a Stripe API key (rk_...), not "
                "the endpoint's signing secret (whsec_...)",
            ),
            (
                "django_events.W312",
                f"{path}:8",
                "Source 'other': secret 'S_OTHER' does not start with whsec_, as Stripe's "
                "signing secrets do",
            ),
            (
                "django_events.W312",
                f"{path}:9",
                "Source 'sw': secret 'S_SW' does not start with whsec_, as Standard Webhooks "
                "secrets do",
            ),
        )
    output = result.stdout + result.stderr
    assert "51Habc" not in output and sw_bare not in output


def test_a_source_declared_in_two_manifests_is_e314(tmp_path: Path) -> None:
    body = "version: 1\nsources:\n  gh: {auth: github, secret: S_GH, events: {}}\n"
    first = write(tmp_path / "one.yaml", body)
    second = write(tmp_path / "two.yaml", body)
    with wiring(MANIFESTS=[BASE, first, second]), override_settings(S_GH="x"):
        assert_reported(
            (
                "django_events.E314",
                f"{second}:3",
                f"Source 'gh' is declared twice (also at {first}:3)",
            )
        )


def test_sources_without_the_urls_are_w311(tmp_path: Path) -> None:
    _, settings_ = manifest(
        tmp_path, SOURCE_EVENTS + "  gh: {auth: github, secret: S_GH, events: {push: gh.push}}\n"
    )
    with (
        settings_,
        override_settings(S_GH="x", ROOT_URLCONF="tests.app.urls_without_events"),
    ):
        assert_reported(
            (
                "django_events.W311",
                "ROOT_URLCONF",
                "Sources receive webhooks but django_events.urls is not included",
            )
        )


def test_a_source_without_secret_or_events_fails_the_schema(tmp_path: Path) -> None:
    _, settings_ = manifest(tmp_path, SOURCE_EVENTS + "  gh: {auth: github}\n")
    with settings_:
        result = events_check()
    assert [r[0] for r in result.reported] == ["django_events.E103", "django_events.E103"]
    assert "'secret' is a required property" in result.stderr
    assert "'events' is a required property" in result.stderr
