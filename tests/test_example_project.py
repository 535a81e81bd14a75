"""The example project is valid: `manage.py check` and `events_check` pass on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example_project"


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    return manage_with({}, *args)


def manage_with(extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CELERY_BROKER_URL")
    }
    env["PYTHONPATH"] = str(ROOT)  # this checkout's django_events, whatever pip installed
    env.update(extra_env)
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
@pytest.mark.parametrize("delivery", ["celery", "tasks"])
def test_example_project_checks_clean(command: list[str], expected: str, delivery: str) -> None:
    result = manage_with({"EVENTS_DELIVERY": delivery}, *command)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.servers
def test_example_shop_runs_on_django_tasks_with_no_broker(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
        "EVENTS_DELIVERY": "tasks",
        # Nothing listens there: a message for Celery would leave its event pending.
        "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:9//",
    }
    assert manage_with(env, "migrate").returncode == 0
    worker_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    worker_env.pop("DJANGO_SETTINGS_MODULE", None)
    command = ["db_worker", "--queue-name", "billing,notifications", "--interval", "0.1"]
    worker = subprocess.Popen(
        [sys.executable, "manage.py", *command, "--no-reload", "--no-startup-delay"],
        cwd=EXAMPLE,
        env=worker_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        placed = manage_with(env, "place_orders", "--count", "3")
        assert placed.returncode == 0, placed.stderr
        results = manage_with(env, "show_results", "--timeout", "60")
    finally:
        worker.terminate()
        log, _ = worker.communicate(timeout=30)
    assert results.returncode == 0, results.stdout + results.stderr + log
    assert "delivered and handled" in results.stdout
    assert "billing.create_invoice         async  succeeded" in results.stdout
    assert "path=django_events.delivery.tasks_backend.deliver state=SUCCESSFUL" in log
    assert "Issued INV-000001" in log  # the handler ran on db_worker
    assert "Broker unreachable" not in placed.stdout + placed.stderr


@pytest.mark.postgresql  # one subprocess run is enough (it uses its own SQLite file anyway)
def test_example_payment_webhook_is_published_once(tmp_path: Path) -> None:
    script = (
        "from django.core.management import call_command as run\n"
        "from django_events.models import EventRecord\n"
        "run('migrate', verbosity=0)\n"
        "run('place_orders', count=2, stdout=open('/dev/null', 'w'))\n"
        "run('send_payment_webhook')\n"
        "(record,) = EventRecord.objects.filter(name='payments.payment_succeeded')\n"
        "print('recorded', record.id, record.headers['source'], record.headers['caller'])\n"
    )
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3", "CELERY_BROKER_URL": "memory://"}
    result = manage_with(env, "shell", "--no-imports", "-c", script)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first, retry, recorded = (lines[-3], lines[-2], lines[-1])
    event_id = recorded.split()[1]
    assert first.startswith("webhook: POST /events/payments.payment_succeeded/ -> 202")
    assert event_id in first and event_id in retry
    assert retry.endswith("(Idempotent-Replayed: the first call's event)")
    assert recorded.endswith("payment-provider hmac:PAYMENTS_WEBHOOK_SECRET")
