"""events_queues: what a worker must consume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import wiring

ROOT = Path(__file__).resolve().parent.parent


def queues() -> str:
    out = StringIO()
    call_command("events_queues", stdout=out)
    return out.getvalue().strip()


def test_events_queues_lists_each_async_queue_once() -> None:
    subs = [
        {
            "event": "orders.placed",
            "handler": "tests.app.handlers.record",
            "mode": "async",
            "queue": "billing",
        },
        {"event": "orders.*", "handler": "tests.app.handlers.record_other", "mode": "async"},
        {
            "event": "orders.shipped",
            "handler": "tests.app.handlers.record",
            "mode": "async",
            "queue": "billing",
        },
        {"event": "orders.shipped", "handler": "tests.app.handlers.record_other", "mode": "sync"},
    ]
    with wiring(*subs, DEFAULT_QUEUE="events-default"):
        assert queues() == "billing,events-default"


def test_events_queues_is_never_empty() -> None:
    with wiring(DEFAULT_QUEUE="fallback"):
        assert queues() == "fallback"


def test_events_queues_reports_configuration_errors_after_the_queues() -> None:
    broken = {"event": "orders.placed", "handler": "tests.app.nowhere.handle", "mode": "async"}
    out, err = StringIO(), StringIO()
    with wiring(broken, DEFAULT_QUEUE="events-default"), pytest.raises(CommandError) as raised:
        call_command("events_queues", stdout=out, stderr=err)
    assert out.getvalue().strip() == "events-default"  # never an empty -Q
    assert "(django_events.E201)" in err.getvalue()
    assert "'tests.app.nowhere.handle' does not import" in err.getvalue()
    assert "1 problem(s) in the events configuration" in str(raised.value)


ASYNC = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "async"}
MIXED = (
    {**ASYNC, "name": "invoice", "queue": "billing"},
    {**ASYNC, "name": "receipt", "queue": "mails", "via": "tasks"},
    {**ASYNC, "name": "sms", "queue": "mails", "via": "tasks"},
)


def queues_command(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("events_queues", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_events_queues_gives_a_celery_worker_no_queue_of_django_tasks() -> None:
    with wiring(*MIXED, DEFAULT_QUEUE="events-default"):
        plain, note = queues_command()
        celery, celery_note = queues_command("--via", "celery")
        tasks, tasks_note = queues_command("--via", "tasks")

    assert plain.strip() == celery.strip() == "billing,events-default"
    assert note == (
        "Not listed: the queues of the via: tasks subscriptions (mails), for db_worker "
        "(manage.py events_queues --via tasks).\n"
    )
    assert tasks.strip() == "mails"
    assert celery_note == tasks_note == ""


def test_events_queues_lists_django_tasks_queues_when_they_are_the_delivery() -> None:
    # The webhook endpoints' deliveries go by DELIVERY: their queue with them.
    invoice = {**MIXED[0], "via": "celery"}
    with wiring(invoice, *MIXED[1:], DELIVERY="tasks", DEFAULT_QUEUE="events-default"):
        plain, note = queues_command()
    assert plain.strip() == "events-default,mails"
    assert "the via: celery subscriptions (billing), for a Celery worker" in note


def test_events_queues_via_a_kind_nothing_uses_prints_nothing_and_fails() -> None:
    out = StringIO()
    with wiring(*MIXED[:1]), pytest.raises(CommandError) as raised:
        call_command("events_queues", "--via", "tasks", stdout=out)
    assert out.getvalue() == ""  # `--queue-name ""` never starts a worker on nothing
    assert str(raised.value) == "No subscription is delivered via tasks: no queue to consume."


def test_events_queues_explains_each_kind_of_worker_apart() -> None:
    with wiring(*MIXED, DEFAULT_QUEUE="events-default"):
        both, _ = queues_command("--explain")
        tasks, _ = queues_command("--explain", "--via", "tasks")

    assert both.splitlines() == [
        "billing:",
        "  one worker runs each message: invoice",
        "events-default:",
        "  webhook endpoints registered at run time (the admin)",
        "Start workers with: celery -A <project> worker -Q billing,events-default",
        "",
        "mails:",
        "  one worker runs each message: receipt, sms",
        "Start workers with: python manage.py db_worker --no-reload --queue-name mails",
    ]
    assert tasks.splitlines() == both.splitlines()[-3:]


def _shell(script: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_TEST_MANIFEST": "outcomes.yaml",  # oc-missing's handler does not import
        "PYTHONPATH": str(ROOT),
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_events_queues_fails_loudly_in_a_shell() -> None:
    result = _shell('"$PYTHON" -m django events_queues')
    assert result.returncode == 1
    assert result.stdout.strip() == "django_events"
    assert "oc-missing" in result.stderr and "tests.app.no_such_module.handle" in result.stderr
    # The documented pattern does not start a worker on a broken configuration.
    documented = _shell('queues=$("$PYTHON" -m django events_queues) && echo "worker -Q $queues"')
    assert documented.returncode == 1
    assert "worker -Q" not in documented.stdout
    assert "oc-missing" in documented.stderr


def test_events_list_says_how_each_worker_subscription_is_delivered() -> None:
    sync = {**ASYNC, "name": "audit", "mode": "sync"}
    with wiring(*MIXED, sync, EVENTS={}):
        table, as_json = StringIO(), StringIO()
        call_command("events_list", "--no-endpoints", stdout=table)
        call_command("events_list", "--no-endpoints", "--format", "json", stdout=as_json)

    header, *lines = table.getvalue().splitlines()
    assert header.split()[:5] == ["EVENT", "SUBSCRIPTION", "MODE", "VIA", "QUEUE"]
    via_column = slice(header.index("VIA"), header.index("QUEUE"))
    rows = {line.split()[1]: line[via_column].strip() for line in lines if "orders.placed" in line}
    assert rows == {"audit": "", "invoice": "celery", "receipt": "tasks", "sms": "tasks"}
    [placed] = [e for e in json.loads(as_json.getvalue())["events"] if e["name"] == "orders.placed"]
    via = {s["name"]: s["via"] for s in placed["subscriptions"]}
    assert via == {"audit": None, "invoice": "celery", "receipt": "tasks", "sms": "tasks"}


@pytest.mark.django_db(databases="__all__")  # Django 6.1's `check` opens a connection
def test_events_list_shows_a_declaration_s_origin_as_events_check_and_check_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the manifest is below the working directory
    manifest = tmp_path / "events.yaml"
    manifest.write_text(
        "version: 1\n"
        "events:\n"
        "  shop.paid: {}\n"
        "subscriptions:\n"
        "  - event: shop.paid\n"
        "    handler: tests.app.handlers.record\n"
        "    queue: billing\n"  # W102 (sync): events_check and check name the origin
    )
    with wiring(MANIFESTS=[manifest], EVENTS={}):
        listed, checked, checks = StringIO(), StringIO(), StringIO()
        call_command("events_list", "--no-endpoints", stdout=listed)
        call_command("events_check", stdout=checked)
        call_command("check", "--tag", "django_events", stdout=checks, stderr=checks)
        as_json = StringIO()
        call_command("events_list", "--no-endpoints", "--format", "json", stdout=as_json)

    where = f"{manifest}:5"
    assert checked.getvalue().startswith(f"{where}: (django_events.W102)")
    assert f"{where}: (django_events.W102)" in checks.getvalue()
    [row] = [line for line in listed.getvalue().splitlines() if "shop.paid:" in line]
    assert row.split()[-1] == where
    event = json.loads(as_json.getvalue())["events"][0]
    assert (event["origin"], event["subscriptions"][0]["origin"]) == (f"{manifest}:3", where)
