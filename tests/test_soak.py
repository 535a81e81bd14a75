"""scripts/soak.py run small, end to end: the code path of the figures in docs/reliability.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from django.conf import settings

from tests import brokers
from tests.worker import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.postgresql, pytest.mark.long]


# Redis: a worker killed as a whole can take a message with it (kombu's BRPOP window), and
# events_relay sends it again once RESEND_UNFINISHED_AFTER passed and the queue drained; both
# are shortened to fit the run (the visibility timeout stays below the threshold, as in the
# package's default).
# The relay resends once the queue has been seen empty for the visibility timeout plus 30 s.
REDIS = (
    *("--visibility-timeout", "20", "--resend-unfinished-after", "30"),
    *("--settle", "120", "--deadline", "300"),
)
# RabbitMQ: success rows are batched by default, so a killed worker's last ones are lost and
# the relay resends those deliveries: RESEND_UNFINISHED_AFTER shortened to fit the run.
AMQP = ("--resend-unfinished-after", "30", "--settle", "90", "--deadline", "240")


@pytest.mark.timeout(480)
@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_the_soak_script_loses_nothing_through_cuts_and_kills(kind: str) -> None:
    brokers.require_server(brokers.URLS[kind], kind)
    assert settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    url = os.environ["DATABASE_URL"]  # the PostgreSQL pass's server
    command = [
        *(sys.executable, str(ROOT / "scripts" / "soak.py"), "--broker", kind),
        *("--events", "300", "--batch", "10", "--kill-every", "2", "--cut", "10"),
        *(REDIS if kind == "redis" else AMQP),
    ]
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_EVENTS_AMQP_URL": brokers.AMQP_URL,
        "SOAK_REDIS_URL": os.environ.get("SOAK_REDIS_URL", "redis://127.0.0.1:6379/15"),
    }
    # Unmeasured by coverage: the other tests measure what it runs, and measuring its workers
    # (killed and started again every 2 s) cost half as much CPU again (docs/contributing.md).
    for name in ("COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG"):
        env.pop(name, None)
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False
    )
    out = done.stdout
    figures = dict(re.findall(r"^(\S[^:\n]*):\s+(.*)$", out, re.MULTILINE))

    assert done.returncode == 0, out + done.stderr[-3000:]
    assert figures["events committed"] == "300", out
    # A delivery whose handler ran only while the database was cut may end failed (retryable
    # in the admin): counted apart, never lost.
    cut_out = int(figures["failed in the database cut (retryable)"])
    assert int(figures["deliveries succeeded"]) + cut_out == 600, out
    for zero in (
        "lost (event x subscription never run)",
        "duplicate effects, idempotent subscription",
        "records missing (committed, no EventRecord)",
        "delivery rows missing",
        "delivery rows not succeeded, other",
        "records still pending",
    ):
        assert figures[zero] == "0", (zero, out)
    assert int(figures["worker kills (SIGKILL, whole worker)"]) >= 1, out
    assert figures["cuts"] == "broker at 100 events for 10s; db at 200 events for 10s", out
    assert int(figures["transactions that raised (retried)"]) >= 1, out  # the database cut hit
    # Events committed during the broker cut were left pending, and the relay loop sent them.
    assert int(figures["events relayed by events_relay --loop"]) >= 1, out
    assert figures["settled"] == figures["relay loop still running"] == "True", out
