"""``Event[...]`` and ``publish()``'s overloads, under a user's mypy --strict with django-stubs."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from django_events import Event

ROOT = Path(__file__).resolve().parent.parent

USER_MODULE = """
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, assert_type

from django_events import Event, apublish, event, publish


@event("shop.order_placed")
@dataclass(frozen=True)
class OrderPlaced:
    order_id: int
    total: float


def place() -> int:
    placed = publish(OrderPlaced(order_id=1, total=2.0))
    assert_type(placed, Event[OrderPlaced])
    by_name = publish("shop.order_placed", {"order_id": 1, "total": 2.0})
    assert_type(by_name, Event[Any])
    return placed.payload.order_id


async def aplace() -> float:
    placed = await apublish(OrderPlaced(order_id=1, total=2.0))
    return placed.payload.total


def handler(event: Event[OrderPlaced]) -> None:
    total: float = event.payload.total
    print(total)


def untyped_handler(event: Event) -> None:  # a bare Event is fine under --strict
    print(event.payload["anything"])
"""

WRONG = """
def wrong() -> None:
    placed = publish(OrderPlaced(order_id=1, total=2.0))
    print(placed.payload.customer_email)


def wrong_type(event: Event[OrderPlaced]) -> str:
    return event.payload.order_id
"""

CONFIG = """
[mypy]
strict = True
plugins = mypy_django_plugin.main

[mypy.plugins.django-stubs]
django_settings_module = tests.settings
"""


def run_mypy(tmp_path: Path, source: str) -> tuple[int, str]:
    module = tmp_path / "user_module.py"
    module.write_text(textwrap.dedent(source))
    config = tmp_path / "mypy.ini"
    config.write_text(CONFIG)
    cache = Path(ROOT / "tests" / "var" / "mypy-cache")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(cache),
            str(module),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.timeout(600)
def test_user_module_type_checks_and_a_wrong_payload_attribute_fails(tmp_path: Path) -> None:
    code, output = run_mypy(tmp_path, USER_MODULE)
    assert code == 0, output
    assert "Success: no issues found in 1 source file" in output

    code, output = run_mypy(tmp_path, USER_MODULE + WRONG)
    assert code == 1, output
    errors = re.findall(r"user_module\.py:\d+: error: (.*)", output)
    assert errors == [
        '"OrderPlaced" has no attribute "customer_email"  [attr-defined]',
        'Incompatible return value type (got "int", expected "str")  [return-value]',
    ], output


def test_event_subscripts_at_run_time() -> None:
    assert Event[dict].__origin__ is Event  # type: ignore[attr-defined]
