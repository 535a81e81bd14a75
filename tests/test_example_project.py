"""The example project is valid: `manage.py check` and `events_check` pass on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "example_project"


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CELERY_BROKER_URL")
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["check"], "System check identified no issues"),
        (["events_check"], "Events configuration OK (0 warning(s))."),
        (["events_queues"], "billing,notifications"),
    ],
)
def test_example_project_checks_clean(command: list[str], expected: str) -> None:
    result = manage(*command)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
