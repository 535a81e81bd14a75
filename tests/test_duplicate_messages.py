"""A duplicate message of a delivery that already succeeded or was resolved (a relay's resend
of a record its publisher never marked, a broker's redelivery) reaching a worker that does not
run it (its subscription paused, unknown to that worker, its event newer, its handler missing):
nothing is written over the finished row, so nothing runs it again.

In process (`process_message`, what a worker runs), on the test database; the paused case
through a real worker is in tests/test_failure_control_delivery.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest
from django.core.management import call_command
from django.db import OperationalError, connection
from django.db.models import F
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from django_events import publish
from django_events.delivery import batching, marking
from django_events.delivery.lost_messages import resend_after
from django_events.delivery.messages import build_message, event_body
from django_events.delivery.pausing import paused_names
from django_events.delivery.worker import process_message
from django_events.events import Event
from django_events.models import Delivery, EventRecord, PausedSubscription
from django_events.operations.pausing import (
    ORPHAN_AFTER,
    deliver_orphaned_held,
    pause,
    resume,
)
from django_events.signals import delivery_failed
from tests.app.models import HandlerRun
from tests.conftest import wiring
from tests.ops import drain

pytestmark = pytest.mark.django_db(transaction=True)

PAYLOAD = {"order_id": 7, "total": 12.5}
BASE = {"event": "orders.placed", "handler": "tests.app.handlers.record", "mode": "async"}
KINDS = {
    "idempotent": {**BASE, "name": "sub", "idempotent": True},
    "ordered": {**BASE, "name": "sub", "ordering_key": "order_id"},
    "plain": {**BASE, "name": "sub"},
}


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    def note(sender: Any, **kwargs: Any) -> None:
        sent.append(kwargs)

    delivery_failed.connect(note)
    yield sent
    delivery_failed.disconnect(note)


def handled(declaration: dict[str, Any], status: str = "succeeded") -> tuple[Event, dict[str, Any]]:
    """An event whose delivery ran (its row then set to ``status``); its first message."""
    with wiring(declaration):
        event = publish("orders.placed", PAYLOAD)
        message = build_message(event_body(event), "sub", "default")
        assert process_message(message, 0).status == "succeeded"
    Delivery.objects.filter(event_id=event.id, subscription="sub").update(status=status)
    return event, message


def row(event: Event) -> tuple[str, int, str]:
    found = Delivery.objects.get(event_id=event.id, subscription="sub")
    return found.status, found.attempts, found.last_error


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("status", ["succeeded", "resolved"])
def test_a_paused_subscription_does_not_hold_a_duplicate_of_a_finished_delivery(
    kind: str, status: str
) -> None:
    declaration = KINDS[kind]
    event, message = handled(declaration, status)
    with wiring(declaration):
        pause("sub")
        assert process_message(message, 0).status == "skipped"
        assert row(event) == (status, 1, "")
        result = resume("sub")
    assert result.sent == 0
    assert HandlerRun.objects.filter(event_id=event.id).count() == 1


def test_a_worker_that_does_not_know_the_subscription_leaves_its_success_alone(
    failures: list[dict[str, Any]],
) -> None:
    # A rolling deploy: the duplicate reaches a worker of the release before the subscription.
    event, message = handled(KINDS["idempotent"])
    with wiring({**BASE, "name": "other"}):
        assert process_message(message, 0).status == "skipped"
    assert row(event) == ("succeeded", 1, "")
    assert failures == []


def test_a_worker_older_than_the_event_leaves_its_success_alone() -> None:
    event, message = handled(KINDS["idempotent"])
    newer = {**message, "event": {**message["event"], "version": 2}}
    with wiring(KINDS["idempotent"]):
        outcome = process_message(newer, 0)
    assert (outcome.status, outcome.retry_with) == ("skipped", None)  # no retry to wait with
    assert row(event) == ("succeeded", 1, "")


def test_a_worker_whose_handler_does_not_import_leaves_a_success_alone(
    failures: list[dict[str, Any]],
) -> None:
    event, message = handled(KINDS["ordered"])
    with wiring({**KINDS["ordered"], "handler": "tests.app.no_such_module.handler"}):
        assert process_message(message, 0).status == "skipped"
    assert row(event) == ("succeeded", 1, "")
    assert failures == []


def test_each_still_records_a_delivery_it_does_not_run_that_has_not_finished(
    failures: list[dict[str, Any]],
) -> None:
    # The control: the same messages for deliveries not finished are recorded as before.
    with wiring(KINDS["idempotent"]):
        event = publish("orders.placed", PAYLOAD)
        message = build_message(event_body(event), "sub", "default")
        pause("sub")
        assert process_message(message, 0).status == "held"
        assert row(event)[:2] == ("held", 0)
    with wiring({**BASE, "name": "other"}):
        assert process_message(message, 0).status == "failed"
    assert row(event)[0] == "failed"
    assert [f["subscription"] for f in failures] == ["sub"]


def test_a_replay_reaching_a_paused_plain_subscription_before_its_commit_is_held() -> None:
    # A replay sends inside the transaction that makes the row pending: its message may find
    # the row still succeeded. For a subscription that may run again it is held, not lost.
    event, _ = handled(KINDS["plain"])
    replayed = build_message(event_body(event), "sub", "default", prior_attempts=1, rerun=True)
    with wiring(KINDS["plain"]):
        pause("sub")
        assert process_message(replayed, 0).status == "held"
        assert row(event)[:2] == ("held", 1)
        assert resume("sub").sent == 1


@pytest.mark.parametrize("kind", ["idempotent", "ordered"])
def test_a_rerun_of_an_idempotent_or_ordered_success_is_a_duplicate_too(kind: str) -> None:
    # Their reruns are never sent for a success, or before their rows are pending.
    event, _ = handled(KINDS[kind])
    again = build_message(event_body(event), "sub", "default", prior_attempts=1, rerun=True)
    with wiring(KINDS[kind]):
        pause("sub")
        assert process_message(again, 0).status == "skipped"
    assert row(event) == ("succeeded", 1, "")


BROADCAST = {**BASE, "name": "sub", "queue": "cache", "broadcast": True}


def test_a_broadcast_copy_is_no_duplicate_of_another_workers_success() -> None:
    # One row stands for every worker's copy: this worker's copy is still owed its run.
    event, message = handled(BROADCAST)
    with wiring(BROADCAST):
        pause("sub")
        assert process_message(message, 0).status == "held"
        assert row(event)[0] == "held"
        assert resume("sub").sent == 1
    Delivery.objects.filter(event_id=event.id).update(status="succeeded")
    with wiring({**BROADCAST, "handler": "tests.app.no_such_module.handler"}):
        assert process_message(message, 0).status == "failed"  # never hidden by a success
    status, _, error = row(event)
    assert status == "failed" and "no_such_module" in error


@pytest.mark.parametrize("record", ["all", "failures"])
def test_a_message_held_by_a_stale_read_of_the_pauses_runs_once_when_resumed_meanwhile(
    record: str,
) -> None:
    """A worker reads the pauses at most CACHE_SECONDS old: a resume elsewhere in between read
    the held rows before this one was written. The worker takes the row back and runs it;
    its first run's success (batched) is recorded, not left behind a held row."""
    with wiring(KINDS["plain"], RECORD=record):
        event = publish("orders.placed", PAYLOAD)
        message = build_message(event_body(event), "sub", "default")
        pause("sub")
        assert "sub" in paused_names("default")  # this worker's cache: paused
        PausedSubscription.objects.filter(subscription="sub").delete()  # resumed elsewhere
        assert process_message(message, 0, batch_success=True).status == "succeeded"
        batching.recorder().flush()
        assert row(event) == ("succeeded", 1, "")
        assert resume("sub").sent == 0
    assert HandlerRun.objects.filter(event_id=event.id).count() == 1


def take_back_refused(message: dict[str, Any]) -> Any:
    """Process ``message`` of subscription "sub", paused as this worker last read it, resumed
    elsewhere meanwhile, with the database refusing the take-back of its held row."""
    table = Delivery._meta.db_table

    def refuse_take_back(execute, sql, params, many, context):
        taking_back = sql.startswith(f'UPDATE "{table}"') and params and params[0] == "pending"
        if taking_back and "held" in params:
            raise OperationalError("connection lost")
        return execute(sql, params, many, context)

    pause("sub")
    assert "sub" in paused_names("default")
    PausedSubscription.objects.filter(subscription="sub").delete()  # resumed elsewhere
    with connection.execute_wrapper(refuse_take_back):
        return process_message(message, 0)


def orphaned() -> int:
    """What the relay's pass for held rows of subscriptions not paused sends, a minute on."""
    Delivery.objects.update(updated_at=timezone.now() - timedelta(seconds=ORPHAN_AFTER + 1))
    return deliver_orphaned_held().sent


@pytest.mark.parametrize("record", ["all", "failures"])
def test_a_held_row_the_worker_cannot_take_back_is_left_to_the_relay(record: str) -> None:
    """The database refuses the take-back (held -> pending): the message is acknowledged, not
    retried (its retry ran the handler and, with RECORD "failures", left the row held for the
    relay to send again: two runs), and the row stays held for the relay, which sends it.
    Through a real worker, where it runs once: tests/test_failure_control_delivery.py."""
    with wiring(KINDS["plain"], RECORD=record):
        event = publish("orders.placed", PAYLOAD)
        outcome = take_back_refused(build_message(event_body(event), "sub", "default"))
        assert (outcome.status, outcome.retry_with) == ("held", None)
        assert row(event) == ("held", 0, "")
        assert not HandlerRun.objects.filter(event_id=event.id).exists()
        assert orphaned() == 1  # claimed from held, once (a worker runs it)
    assert row(event) == ("pending", 0, "")


def take_back_answer_lost(message: dict[str, Any]) -> Any:
    """As `take_back_refused`, but the database commits the take-back and its answer is lost
    (the connection drops after the commit): the worker reads a failure."""
    table = Delivery._meta.db_table

    def commit_then_drop(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        taking_back = sql.startswith(f'UPDATE "{table}"') and params and params[0] == "pending"
        if taking_back and "held" in params:
            raise OperationalError("connection lost")
        return result

    pause("sub")
    assert "sub" in paused_names("default")
    PausedSubscription.objects.filter(subscription="sub").delete()  # resumed elsewhere
    with connection.execute_wrapper(commit_then_drop):
        return process_message(message, 0)


def sent_since(via: str, queue: str) -> list[dict[str, Any]]:
    """The messages sent since the last look: on ``queue`` (Celery), or as task rows (``via:
    tasks``, the database task backend: taken, as a worker takes them)."""
    if via == "celery":
        return drain(queue)
    tasks = DBTaskResult.objects.order_by("enqueued_at")
    messages = [t["args"][0] for t in tasks.values_list("args_kwargs", flat=True)]
    tasks.delete()
    return messages


@pytest.mark.parametrize("via", ["celery", "tasks"])
def test_a_take_back_whose_answer_was_lost_is_sent_again_by_the_relay(via: str) -> None:
    """The take-back (held -> pending) commits but its answer is lost: the worker, reading a
    failure, acknowledges the message (above), and the row is pending with no message. Held
    no more, it is not for the relay's pass over held rows: the relay sends it one threshold
    for lost messages later (RESEND_UNFINISHED_AFTER), whichever way its subscription goes."""
    queue = f"tb-{uuid4().hex[:8]}"
    with wiring({**KINDS["plain"], "via": via, "queue": queue}, TASKS_BACKEND="default"):
        event = publish("orders.placed", PAYLOAD)
        sent_since(via, queue)  # its first message
        outcome = take_back_answer_lost(build_message(event_body(event), "sub", "default"))
        assert (outcome.status, outcome.retry_with) == ("held", None)
        assert row(event) == ("pending", 0, "")
        assert orphaned() == 0

        marking.flush()  # the event is marked dispatched
        later = timedelta(seconds=resend_after() + 1)
        EventRecord.objects.update(dispatched_at=F("dispatched_at") - later)
        Delivery.objects.update(updated_at=F("updated_at") - later, retry_at=F("retry_at") - later)
        call_command("events_relay", "--min-age", "0", stdout=io.StringIO())

        [message] = sent_since(via, queue)
        assert message["event"]["id"] == str(event.id)
        assert process_message(message, 0).status == "succeeded"
        call_command("events_relay", "--min-age", "0", stdout=io.StringIO())
        assert sent_since(via, queue) == []  # once
    assert row(event) == ("succeeded", 1, "")
    assert HandlerRun.objects.filter(event_id=event.id).count() == 1


def test_a_broadcasts_take_back_is_never_due_for_the_relay() -> None:
    """A broadcast's copy reaches every worker: the relay never sends one again."""
    with wiring({**KINDS["plain"], "broadcast": True}):
        event = publish("orders.placed", PAYLOAD)
        outcome = take_back_answer_lost(build_message(event_body(event), "sub", "default"))
        assert outcome.status == "held"
    taken_back = Delivery.objects.get(event_id=event.id, subscription="sub")
    assert (taken_back.status, taken_back.retry_at) == ("pending", None)


def test_an_ordered_held_row_the_worker_cannot_take_back_is_left_to_the_relay_too() -> None:
    """As an unordered one's: the message is acknowledged, and the relay hands the key on (its
    first held delivery) a minute on, once. It was retried as well: a retry overlapping the
    relay's message would have passed the gate too (a running row's turn is to run)."""
    queue = f"tb-{uuid4().hex[:8]}"
    with wiring({**KINDS["ordered"], "queue": queue}):
        event = publish("orders.placed", PAYLOAD)
        drain(queue)  # its first message
        outcome = take_back_refused(build_message(event_body(event), "sub", "default"))
        assert (outcome.status, outcome.retry_with) == ("held", None)
        assert row(event) == ("held", 0, "")
        assert orphaned() == 1
        [message] = drain(queue)
        assert process_message(message, 0).status == "succeeded"
        assert orphaned() == 0
        assert drain(queue) == []
    assert row(event) == ("succeeded", 1, "")
    assert HandlerRun.objects.filter(event_id=event.id).count() == 1
