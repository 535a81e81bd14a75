"""Redacted payload fields never reach Celery's monitoring (docs/celery.md).

A real worker on RabbitMQ and on Redis: `celery inspect active` while a slow handler runs,
and `celery events --dump` (what Flower reads too) across a delivery that is retried; the
worker's own log across that retry (Celery logs the exception it is handed at INFO).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from django_events import publish
from django_events.wiring.redaction import MASK
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import ROOT, fresh_queue, wait_for, worker_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

EMAIL = "ada.secret@example.com"
CARD = "4111222233334444"


def celery(kind: str, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",  # the events dump is read after the process is stopped
    }
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", f"tests.brokers:{kind}", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, stopped by the test
    )


def run_celery(kind: str, *args: str) -> str:
    process = celery(kind, *args)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    return out


@pytest.mark.parametrize("kind", brokers.worker_kinds("amqp", "redis"))
def test_redacted_values_stay_out_of_inspect_and_events(kind: str, tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    dump_path = tmp_path / "events.txt"
    with fresh_queue(kind, f"it-mon-{kind}") as queue:
        node = f"{queue}@{socket.gethostname()}"
        env = {"DJANGO_EVENTS_FAULT_DIR": str(faults)}
        args = ("-E",)  # task events, as for Flower and `celery events`
        worker = worker_for(kind, queue, tmp_path, manifest="monitoring.yaml", env=env, args=args)
        with worker, brokers.delivery_wiring(kind, queue, "monitoring.yaml"):
            with dump_path.open("w") as dump_out:
                dump = celery(kind, "events", "--dump", stdout=dump_out)
            try:
                time.sleep(2)  # the dumper's queue is bound before anything is sent
                secret = {"email": EMAIL, "card": {"number": CARD}}
                slow = publish("mon.signed_up", {"user_id": 1, **secret, "hang": 6})
                wait_for(lambda: list(faults.iterdir()), timeout=30, what="the slow handler")
                active = run_celery(kind, "inspect", "active", "-d", node, "--json")
                failing = publish("mon.signed_up", {"user_id": 2, **secret, "fail": True})
                wait_for(
                    lambda: HandlerRun.objects.filter(event_id=failing.id).count() >= 2,
                    timeout=30,
                    what="a retried delivery",
                )
                time.sleep(1.5)  # the retry's events reach the dumper
            finally:
                os.killpg(dump.pid, signal.SIGTERM)
                dump.wait(10)

    events = dump_path.read_text()
    # Both surfaces saw the deliveries (else the test proves nothing) ...
    assert str(slow.id) in active, active
    assert "mon-slow" in active
    assert str(failing.id) in events, events
    # ... and no redacted value.
    for output in (active, events):
        assert EMAIL not in output
        assert CARD not in output
    # After a retry monitors still show the short summary, not the message.
    received = [line for line in events.splitlines() if str(failing.id) in line]
    assert received, events
    summary = f"('mon-fails', '{failing.id}')"
    assert all(summary in line and "payload" not in line for line in received), received
    json.loads(active)  # --json output stays parseable
    # The worker opened the sealed payload: handlers get the real values (in every run: a
    # message may come twice, at least once, on a loaded host).
    runs = list(HandlerRun.objects.filter(event_id=slow.id, handler="hang_plain"))
    assert runs
    for run in runs:
        assert run.payload["email"] == EMAIL and run.payload["card"] == {"number": CARD}


@pytest.mark.parametrize("kind", brokers.worker_kinds("filesystem", "amqp", "redis"))
def test_celerys_log_of_a_retry_masks_the_redacted_values(kind: str, tmp_path: Path) -> None:
    # mon-fails raises RuntimeError quoting the whole payload; Celery logs the exception
    # handed to Task.retry: "Task django_events.deliver[...] retry: Retry in 1s: <repr>".
    with fresh_queue(kind, f"it-mon-log-{kind}") as queue:
        worker = worker_for(kind, queue, tmp_path, manifest="monitoring.yaml")
        with worker, brokers.delivery_wiring(kind, queue, "monitoring.yaml"):
            secret = {"email": EMAIL, "card": {"number": CARD}}
            failing = publish("mon.signed_up", {"user_id": 3, **secret, "fail": True})
            wait_for(
                lambda: worker.log().count(" retry: Retry in ") >= 2,
                timeout=30,
                what="two retries of the delivery",
            )
            log = worker.log()

    assert HandlerRun.objects.filter(event_id=failing.id).count() >= 2
    retries = [line for line in log.splitlines() if " retry: Retry in " in line]
    # The exception's type and text, the two values masked as the admin masks them.
    assert all(': RuntimeError(\'boom {"user_id": 3' in line for line in retries), retries
    assert all(line.count(MASK) == 2 for line in retries), retries
    assert EMAIL not in log and CARD not in log
