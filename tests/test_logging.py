"""Every log record of the package carries event_id, event_name, subscription and
correlation_id as ``extra`` attributes, so JSON log formatters always find them."""

from __future__ import annotations

import ast
import io
import json
import logging
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from pythonjsonlogger.json import JsonFormatter

from django_events import Event, publish
from django_events.delivery.messages import build_message, event_body
from django_events.delivery.worker import process_message
from django_events.logs import LOG_FIELDS
from django_events.testing import events_eager
from tests.conftest import wiring

PACKAGE = Path(__file__).resolve().parent.parent / "django_events"
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
FAILING_SYNC = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.always_fails",
    "mode": "sync",
    "name": "sync-fails",
}
ASYNC = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "async"}
PAYLOAD = {"order_id": 1, "total": 12.5}


def logger_calls_without_extra() -> list[str]:
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("logger", "log", "logging")
                and not any(k.arg == "extra" for k in node.keywords)
            ):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return missing


def test_every_logger_call_of_the_package_passes_extra() -> None:
    missing = logger_calls_without_extra()

    assert not missing, (
        f"logger calls without extra= at {missing}: pass "
        "extra=log_extra(event, subscription) (django_events.logs) so every record "
        f"carries {LOG_FIELDS}; log_extra() with no event gives None fields"
    )


def package_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("django_events")]


def assert_structured(records: list[logging.LogRecord]) -> None:
    assert records, "no log record from the package"
    for record in records:
        missing = [f for f in LOG_FIELDS if not hasattr(record, f)]
        assert not missing, f"{record.name}: {record.getMessage()!r} lacks {missing}"


@pytest.mark.django_db(transaction=True)
def test_a_failed_sync_handler_logs_the_event_and_subscription(caplog) -> None:
    with wiring(FAILING_SYNC), transaction.atomic():
        event = publish("orders.placed", PAYLOAD)

    [record] = package_records(caplog)
    assert_structured([record])
    assert (record.event_id, record.event_name, record.subscription, record.correlation_id) == (
        str(event.id),
        "orders.placed",
        "sync-fails",
        str(event.correlation_id),
    )


@pytest.mark.django_db(transaction=True)
def test_an_unimportable_celery_app_logs_the_event_left_pending(caplog) -> None:
    with wiring(ASYNC, CELERY_APP="tests.app.no_such_module.app"):
        event = publish("orders.placed", PAYLOAD)

    [record] = package_records(caplog)
    assert_structured([record])
    assert "does not import" in record.getMessage()
    assert (record.event_id, record.subscription) == (str(event.id), None)


@pytest.mark.django_db(transaction=True)
def test_worker_rejections_log_what_the_message_says(caplog) -> None:
    event = {
        "id": "8b0f8f3e-6c1d-4a57-9a7e-2f5b1c1d2e3f",
        "name": "orders.placed",
        "payload": PAYLOAD,
        "headers": {},
        "occurred_at": "2026-01-01T00:00:00+00:00",
        "correlation_id": "8b0f8f3e-6c1d-4a57-9a7e-2f5b1c1d2e3f",
        "causation_id": None,
    }
    process_message("not a message", 0)
    process_message({"subscription": "nobody", "event": event}, 0)

    records = package_records(caplog)
    assert_structured(records)
    malformed, unknown = records
    assert (malformed.event_id, malformed.subscription) == (None, None)
    assert "Unknown subscription 'nobody'" in unknown.getMessage()
    assert (unknown.event_id, unknown.event_name, unknown.subscription) == (
        event["id"],
        "orders.placed",
        "nobody",
    )
    assert unknown.correlation_id == event["correlation_id"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_handlers_log_lines_mask_the_events_redacted_values(caplog) -> None:
    # orders.placed redacts `email` (base.yaml); the handler's error quotes it.
    caplog.set_level(logging.WARNING, "django_events")
    quoting = "tests.app.handlers.fails_quoting_email"
    payload = {**PAYLOAD, "email": "carol@example.com"}
    with wiring({**FAILING_SYNC, "handler": quoting}):
        publish("orders.placed", payload)
    with wiring({**ASYNC, "handler": quoting, "name": "mailer", "retry": {"max_attempts": 1}}):
        # The message a publish would send, run here as a worker runs it.
        event_id = uuid.uuid4()
        event = Event(
            event_id, "orders.placed", payload, {}, timezone.now(), event_id, None, payload
        )
        message = build_message(event_body(event), "mailer", "default")
        assert process_message(message, 0).status == "failed"
    records = package_records(caplog)
    assert [r.getMessage().split(":")[0] for r in records] == [
        "Sync handler failed",
        "Handler failed (attempt 1 of 1)",
        "Delivery failed for good after 1 attempt(s)",
    ]
    for record in records:  # as a log handler prints them: message, then traceback
        printed = logging.Formatter().format(record)
        assert "carol@example.com" not in printed, printed
        assert "cannot mail '•••'" in printed, printed
        assert record.pathname.endswith(("dispatch.py", "worker.py"))  # where it was logged
        assert record.exc_info is None  # a formatter would print the exception in clear
        assert record.event_id == str(record.event_id) and record.subscription
    assert "Traceback" in logging.Formatter().format(records[0])
    # An event without `redact` is logged as it is, from the same place.
    with wiring({**FAILING_SYNC, "event": "orders.shipped"}):
        publish("orders.shipped", {"order_id": 4})
    [plain] = package_records(caplog)[3:]
    assert plain.getMessage().startswith("Sync handler failed: subscription 'sync-fails'")
    assert plain.pathname.endswith("dispatch.py") and plain.exc_info is not None


@pytest.mark.django_db(transaction=True)
def test_no_formatter_gets_a_redacted_value_from_a_failed_handlers_record() -> None:
    # python-json-logger (the JSON formatter docs/observability.md shows) formats a record's
    # exc_info itself, ignoring exc_text: the record must not hold the exception in clear.
    json_out, plain_out = io.StringIO(), io.StringIO()
    as_json = logging.StreamHandler(json_out)
    as_json.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s"))
    as_text = logging.StreamHandler(plain_out)
    as_text.setFormatter(logging.Formatter())
    package = logging.getLogger("django_events")
    quoting = "tests.app.handlers.fails_quoting_email"
    payload = {**PAYLOAD, "email": "carol@example.com"}
    package.addHandler(as_json)
    package.addHandler(as_text)
    try:
        with wiring({**FAILING_SYNC, "handler": quoting}):
            publish("orders.placed", payload)
        with wiring({**ASYNC, "handler": quoting, "name": "mailer", "retry": {"max_attempts": 2}}):
            event_id = uuid.uuid4()
            event = Event(
                event_id, "orders.placed", payload, {}, timezone.now(), event_id, None, payload
            )
            message = build_message(event_body(event), "mailer", "default")
            process_message(message, 0)  # attempt 1 of 2: "Handler failed"
            assert process_message(message, 1).status == "failed"  # "Delivery failed for good"
    finally:
        package.removeHandler(as_json)
        package.removeHandler(as_text)

    lines = [json.loads(line) for line in json_out.getvalue().splitlines()]
    assert [line["message"].split(":")[0] for line in lines] == [
        "Sync handler failed",
        "Handler failed (attempt 1 of 2)",
        "Handler failed (attempt 2 of 2)",
        "Delivery failed for good after 2 attempt(s)",
    ]
    for line in lines:
        assert "carol@example.com" not in json.dumps(line), line
        assert "cannot mail '•••'" in line.get("exc_info", line["message"]), line
    assert all("Traceback" in line["exc_info"] for line in lines[:3])
    assert "carol@example.com" not in plain_out.getvalue()
    assert plain_out.getvalue().count("ValueError: cannot mail '•••'") == 4


@pytest.mark.django_db(transaction=True)
def test_runs_that_did_not_count_are_told_apart_from_attempts(caplog) -> None:
    """RetryLater(counts=False) runs used to be logged as attempts ("(attempt 3)", then
    "failed for good after 5 attempt(s)" of max_attempts 2): the log says the run and the
    counted attempt of max_attempts once a run did not count."""
    caplog.set_level(logging.INFO, "django_events.worker")
    manifests = [Path(settings.BASE_DIR) / "manifests" / n for n in ("base.yaml", "failctl.yaml")]
    # fc-retry-later: 3 runs that ask for an uncounted retry, then it raises; max_attempts 2.
    payload = {"n": 1, "times": 3, "seconds": 0.5, "counts": False, "then_fail": True}
    with wiring(MANIFESTS=manifests), events_eager(propagate=False):
        event = publish("fc.job", payload)

    where = f"subscription 'fc-retry-later', event fc.job {event.id}"
    assert [r.getMessage() for r in caplog.records if r.name == "django_events.worker"] == [
        "Handler asked for a retry in 0.5s (attempt 1 of 2, not counted)",
        "Handler asked for a retry in 0.5s (run 2, attempt 1 of 2, not counted)",
        "Handler asked for a retry in 0.5s (run 3, attempt 1 of 2, not counted)",
        f"Handler failed (run 4, attempt 1 of 2): {where}",
        f"Handler failed (run 5, attempt 2 of 2): {where}",
        "Delivery failed for good after 2 attempt(s) in 5 runs: RuntimeError: failed after 4 "
        f"retries asked for; {where}",
    ]
