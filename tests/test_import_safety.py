"""`import django_events` works before Django settings exist (settings modules import it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_without_settings(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_django_events_needs_no_settings() -> None:
    run = run_without_settings("""
        import django_events
        from django.conf import settings

        assert not settings.configured
        assert callable(django_events.event)
        for name in ("Event", "EventError", "InvalidPayload", "UnknownEvent",
                     "current_event"):
            getattr(django_events, name)
        assert not settings.configured, "importing django_events configured the settings"
        print("imported")
    """)

    assert (run.returncode, run.stdout, run.stderr) == (0, "imported\n", "")


def test_declaring_an_event_class_needs_no_settings() -> None:
    run = run_without_settings("""
        from dataclasses import dataclass

        from django.conf import settings

        from django_events import event

        @event("orders.placed")
        @dataclass(frozen=True)
        class OrderPlaced:
            order_id: int

        assert not settings.configured
        print(OrderPlaced.__django_event__.schema["required"])
    """)

    assert (run.returncode, run.stdout, run.stderr) == (0, "['order_id']\n", "")


def test_publish_without_settings_fails_with_django_message_not_at_import() -> None:
    # publish is loaded on first access: the import itself stays safe.
    run = run_without_settings("""
        import django_events

        try:
            django_events.publish
        except Exception as exc:
            print(type(exc).__name__)
    """)

    assert run.returncode == 0, run.stderr
    assert run.stdout in ("ImproperlyConfigured\n", "AppRegistryNotReady\n")


@pytest.mark.parametrize(
    "module",
    [
        "django_events.wiring.declarations",
        "django_events.exceptions",
        "django_events.wiring.filters",
        "django_events.wiring.manifest",
        "django_events.wiring.typed",
        "django_events.wiring.validation",
    ],
)
def test_pure_modules_import_without_settings(module: str) -> None:
    run = run_without_settings(f"import {module}")

    assert (run.returncode, run.stderr) == (0, "")


def test_testing_helpers_and_interceptors_import_without_settings() -> None:
    # The pytest plugin loads wherever the package is installed: it must not need settings.
    run = run_without_settings("""
        import django_events.interceptors.context, django_events.interceptors.correlation
        import django_events.interceptors.base
        import django_events.testing.pytest_plugin, django_events.testing
        from django.conf import settings

        assert not settings.configured
    """)

    assert (run.returncode, run.stderr) == (0, "")
