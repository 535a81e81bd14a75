"""django_events.delivery.ordering, in this process: the gate's decisions and what each costs
in database statements at the worker (figure 16 measures the time; docs/ordering.md)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from importlib import import_module
from io import StringIO
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.management import call_command
from django.db import OperationalError, close_old_connections, connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from kombu.exceptions import OperationalError as KombuOperationalError

from django_events import publish, tasks
from django_events.delivery import continuing, marking, ordering
from django_events.delivery.lost_messages import resend_after
from django_events.delivery.worker import Outcome, process_message
from django_events.events import Event
from django_events.models import Delivery, EventRecord, OrderingGate, PausedSubscription
from django_events.tasks import deliver
from tests.app import handlers
from tests.app.models import HandlerRun
from tests.conftest import inserts_refused
from tests.ops import drain, drain_with_headers, shop_wiring
from tests.worker import wait_for

# The migration that last created the ordered finish function.
LATEST_FUNCTION = "django_events.migrations.0012_delivery_uncounted"
TURN_FUNCTION = "django_events.migrations.0013_ordered_turn_function"


@contextmanager
def function_missing(database: str, signature: str, migration: str, create: str) -> Iterator[None]:
    """Drop one of the migrations' functions on ``database`` (a worker newer than its
    migrations, in a rolling deploy), then create it again from ``migration``'s ``create``
    statement; the missing-function warning is forgotten before and after."""
    ordering._warn_missing_function.cache_clear()
    with connections[database].cursor() as cursor:
        cursor.execute(f"DROP FUNCTION {signature}")
    try:
        yield
    finally:
        with connections[database].cursor() as cursor:
            cursor.execute(getattr(import_module(migration), create))
        ordering._warn_missing_function.cache_clear()


def finish_function_missing(database: str = "default") -> AbstractContextManager[None]:
    """`function_missing` of migration 0011's finish (its latest form: 0012's)."""
    signature = "django_events_finish_ordered(bigint, varchar, jsonb, timestamptz)"
    return function_missing(database, signature, LATEST_FUNCTION, "FINISH_ORDERED")


ORDERED = {
    "event": "shop.paid",
    "handler": "tests.app.handlers.record",
    "mode": "async",
    "name": "shop-ordered",
    "ordering_key": "order_id",
}


def gate_statements(queries: CaptureQueriesContext) -> list[str]:
    """The statements of a delivery, leaving out its handler's own (and the worker's
    transaction: savepoints in a test's transaction, BEGIN and COMMIT in a worker) and the
    read of the paused subscriptions, cached for a second a process: whether a delivery
    makes that read depends on the clock, not on its turn."""
    paused = PausedSubscription._meta.db_table
    return [
        q["sql"]
        for q in queries.captured_queries
        if "testapp_" not in q["sql"] and f'FROM "{paused}"' not in q["sql"]
    ]


@pytest.mark.django_db
def test_held_then_handed_on_in_order_in_few_statements(
    queue: str, publish_now: Any, django_capture_on_commit_callbacks: Any
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish_now("shop.paid", {"order_id": 1, "total": 10})
        second = publish_now("shop.paid", {"order_id": 1, "total": 11})
        messages = {
            m["event"]["id"]: m for m in drain(queue) if m["subscription"] == ORDERED["name"]
        }

        def deliver(event: Any) -> tuple[str, list[str]]:
            message = messages.pop(str(event.id))
            with (
                CaptureQueriesContext(connection) as queries,
                django_capture_on_commit_callbacks(execute=True),
            ):
                status = process_message(message, 0, manage_connections=False).status
            return status, gate_statements(queries)

        # The second's message first: its turn and row in one read, then held under the lock.
        status, statements = deliver(second)
        assert (status, len(statements)) == ("held", 5), statements
        # The first runs: one read; lock, success and the hand-on of the key's next (held) in
        # one transaction (on PostgreSQL one conditional UPDATE, elsewhere a read and an
        # UPDATE); after the commit that one read with its event record, its message sent,
        # its relay due time cleared.
        status, statements = deliver(first)
        expected = 8 if connection.vendor == "postgresql" else 9
        assert (status, len(statements)) == ("succeeded", expected), statements
        [again] = [m for m in drain(queue) if m["subscription"] == ORDERED["name"]]
        assert again["event"]["id"] == str(second.id)
        messages[str(second.id)] = again
        # The second again: one read; lock, success and the hand-on (nothing held).
        status, statements = deliver(second)
        assert (status, len(statements)) == ("succeeded", 6), statements

    rows = Delivery.objects.filter(subscription=ORDERED["name"]).order_by("sequence")
    assert list(rows.values_list("sequence", "status", "attempts", "retry_at")) == [
        (1, "succeeded", 1, None),
        (2, "succeeded", 1, None),
    ]


@pytest.mark.django_db(transaction=True)
def test_a_held_or_skipped_message_ends_its_task_done_not_ignored(queue: str) -> None:
    """Its work is done: Celery's `Ignore` would take its traceback twice, format it and
    pickle it to the pool's parent for every message that finds its key busy (figure 16's
    one key). A failure for good still ends ignored (tests/test_worker_outcomes.py)."""
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish("shop.paid", {"order_id": 1, "total": 10})
        second = publish("shop.paid", {"order_id": 1, "total": 11})
        messages = ordered_messages(queue)

        def task_state(message: dict[str, Any]) -> str:
            state: str = deliver.apply(args=(message,)).state
            return state

        assert task_state(messages[str(second.id)]) == "SUCCESS"  # held
        assert task_state(messages[str(first.id)]) == "SUCCESS"  # ran, and ran the second
        assert task_state(messages[str(first.id)]) == "SUCCESS"  # a copy: skipped
        assert task_state(messages[str(second.id)]) == "SUCCESS"  # a copy: skipped
    rows = Delivery.objects.filter(subscription=ORDERED["name"]).order_by("sequence")
    assert list(rows.values_list("status", "attempts")) == [("succeeded", 1)] * 2


# An ordered subscription whose handler asks for a retry on its first ``times`` runs: its runs
# are told from those of the manifest's sync subscriptions, which record every event.
RETRYING = {**ORDERED, "handler": "tests.app.handlers.retry_later"}


def handler_runs(handler: str = "retry_later") -> list[tuple[int, float]]:
    """(order_id, total) of each run of ``handler``, in the order they ran."""
    runs = HandlerRun.objects.filter(handler=handler, event_name="shop.paid").order_by("pk")
    return [(run.payload["order_id"], run.payload["total"]) for run in runs]


@pytest.mark.postgresql  # the run lock lets a task run what it hands on
@pytest.mark.django_db(transaction=True)
def test_the_task_that_hands_a_key_on_runs_its_held_deliveries_itself_in_order(
    queue: str,
) -> None:
    """Not sent to the back of the queue, behind the key's later messages, each of which
    would be held in turn (docs/performance-log.md, "Busy keys")."""
    with shop_wiring(queue, SUBSCRIPTIONS=[RETRYING]):
        events = [
            publish("shop.paid", {"order_id": order, "total": total, "times": 0})
            for order, total in ((1, 10), (1, 11), (2, 20), (1, 12))
        ]
        messages = ordered_messages(queue)
        for event in (events[3], events[1]):  # the key's later ones first: both held
            assert process_message(messages.pop(str(event.id)), 0).status == "held"
        assert deliver.apply(args=(messages.pop(str(events[0].id)),)).state == "SUCCESS"
        assert handler_runs() == [(1, 10), (1, 11), (1, 12)]  # the held ones ran, in order
        assert ordered_messages(queue) == {}  # and no message was sent for them
        assert process_message(messages.pop(str(events[2].id)), 0).status == "succeeded"
    rows = Delivery.objects.filter(subscription=RETRYING["name"]).order_by(
        "ordering_key", "sequence"
    )
    assert list(rows.values_list("ordering_key", "status", "attempts", "retry_at")) == [
        ("1", "succeeded", 1, None),
        ("1", "succeeded", 1, None),
        ("1", "succeeded", 1, None),
        ("2", "succeeded", 1, None),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("declared", "continue_for"),
    [({"timeout": 30}, 1.0), ({}, 0.0)],
    ids=["a-timeout", "no-time-left"],
)
def test_a_handed_on_delivery_with_a_time_limit_or_after_the_tasks_time_is_sent_its_message(
    queue: str, declared: dict[str, Any], continue_for: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task's time limit is its own delivery's: a handler run after it could be cut short
    (a webhook's limit is always set: `broker.soft_limit`). And a task goes on with a busy key
    for `CONTINUE_FOR` seconds, then sends the next one."""
    monkeypatch.setattr(continuing, "CONTINUE_FOR", continue_for)
    with shop_wiring(queue, SUBSCRIPTIONS=[{**ORDERED, **declared}]):
        first = publish("shop.paid", {"order_id": 1, "total": 10})
        second = publish("shop.paid", {"order_id": 1, "total": 11})
        messages = ordered_messages(queue)
        assert process_message(messages[str(second.id)], 0).status == "held"
        ordered = Delivery.objects.filter(subscription=ORDERED["name"])
        ordered.filter(event_id=first.id).update(status="succeeded")  # as if it ran
        with ordering.hand_ons_kept() as kept:
            ordering.release("default", [(ORDERED["name"], "1")])  # hands the key on
            assert [h.pk for h in kept] == [ordered.get(event_id=second.id).pk]
            ran = continuing.run_handed_on(kept, batch_success=False, retry=_no_retry)
        assert ran == 0
        [again] = ordered_messages(queue).values()  # sent on the way out, as before
    assert again["event"]["id"] == str(second.id)


@pytest.mark.postgresql  # elsewhere no task runs what it hands on
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("where", ["the task", "the worker", "the app"])
def test_a_task_with_a_time_limit_sends_the_delivery_it_hands_on_its_message(
    queue: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wherever the limit is set: the task's own (``task_annotations``), the worker's
    (``celery worker --soft-time-limit``, which Celery keeps on the worker and gives with
    ``worker_init``, before it forks its pool) or the app's settings."""
    if where == "the task":
        monkeypatch.setattr(deliver, "soft_time_limit", 60)
    elif where == "the worker":  # what worker_init gives (its sending: test_ordering_delivery)
        monkeypatch.setenv(tasks.WORKER_TIME_LIMITED, "")  # put back as it was afterwards
        tasks._note_worker_limits(sender=SimpleNamespace(time_limit=None, soft_time_limit=60))
    else:
        monkeypatch.setitem(deliver.app.conf, "task_time_limit", 60)
    with shop_wiring(queue, SUBSCRIPTIONS=[RETRYING]):
        second, sent = first_run_with_the_second_held(queue)
    assert handler_runs() == [(1, 10)]  # not the second: sent its message instead
    assert [m["event"]["id"] for m in sent] == [str(second.id)]


def first_run_with_the_second_held(queue: str) -> tuple[Event, list[dict[str, Any]]]:
    """Two events of one key (`RETRYING`), the second's message held, then the first's run
    by its task: the second event, and the messages of the key sent meanwhile."""
    first = publish("shop.paid", {"order_id": 1, "total": 10, "times": 0})
    second = publish("shop.paid", {"order_id": 1, "total": 11, "times": 0})
    messages = ordered_messages(queue)
    assert process_message(messages[str(second.id)], 0).status == "held"
    assert deliver.apply(args=(messages[str(first.id)],)).state == "SUCCESS"
    return second, list(ordered_messages(queue).values())


HANGING = {**ORDERED, "handler": "tests.app.handlers.hang_plain"}


@pytest.mark.postgresql  # the run lock lets a task run what it hands on
@pytest.mark.django_db(transaction=True)
def test_a_task_goes_on_with_its_key_for_continue_for_then_sends_the_next_its_message(
    queue: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A busy key keeps one task for `CONTINUE_FOR` at most: the delivery its last run hands
    on once that time is up is sent its message, and the key goes on from there, in order."""
    monkeypatch.setenv("DJANGO_EVENTS_FAULT_DIR", str(tmp_path))  # hang_plain's markers
    monkeypatch.setattr(continuing, "CONTINUE_FOR", 0.2)
    with shop_wiring(queue, SUBSCRIPTIONS=[HANGING]):
        events = [
            publish("shop.paid", {"order_id": 1, "total": total, "hang": 0.3})
            for total in (10, 11, 12, 13)
        ]
        messages = ordered_messages(queue)
        for event in events[1:]:
            assert process_message(messages[str(event.id)], 0).status == "held"
        # Its own run, then the next (started in time, ending after it): the third is sent.
        assert deliver.apply(args=(messages[str(events[0].id)],)).state == "SUCCESS"
        assert handler_runs("hang_plain") == [(1, 10), (1, 11)]
        [third] = ordered_messages(queue).values()
        assert third["event"]["id"] == str(events[2].id)
        assert deliver.apply(args=(third,)).state == "SUCCESS"
        assert handler_runs("hang_plain") == [(1, 10), (1, 11), (1, 12), (1, 13)]
        assert ordered_messages(queue) == {}
    rows = Delivery.objects.filter(subscription=HANGING["name"])
    assert {(r.status, r.attempts, r.retry_at) for r in rows} == {("succeeded", 1, None)}


def test_a_limit_of_the_task_counts_though_its_message_has_none() -> None:
    """A worker applies the task's own limits (``task_annotations``) to a message that
    carries none, as the messages of a subscription without ``timeout`` do."""
    deliver.push_request(timelimit=None)
    try:
        assert tasks._without_time_limit(deliver)
        deliver.soft_time_limit = 60
        assert not tasks._without_time_limit(deliver)
    finally:
        deliver.soft_time_limit = None
        deliver.pop_request()


RELAYING = {**ORDERED, "handler": "tests.app.handlers.relays_meanwhile"}


@pytest.mark.postgresql  # the run lock lets a task run what it hands on
@pytest.mark.django_db(transaction=True)
def test_the_relays_copy_of_a_delivery_a_task_runs_for_its_key_runs_nothing_beside_it(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its hand-on made it due for events_relay in `HAND_ON_GRACE` (here at once), so that a
    process dying while it runs has it sent again soon: a relay pass while its handler runs
    sends a copy, which its run lock keeps from running beside it; after the run the copy
    is a duplicate, skipped."""
    monkeypatch.setattr(ordering, "HAND_ON_GRACE", 0.0)
    with shop_wiring(queue, SUBSCRIPTIONS=[RELAYING]):
        first = publish("shop.paid", {"order_id": 1, "total": 10})
        second = publish("shop.paid", {"order_id": 1, "total": 11})
        messages = ordered_messages(queue)
        assert process_message(messages[str(second.id)], 0).status == "held"
        assert deliver.apply(args=(messages[str(first.id)],)).state == "SUCCESS"
        [copy] = ordered_messages(queue).values()
        assert copy["event"]["id"] == str(second.id)
        assert process_message(copy, 0).status == "skipped"
    runs = HandlerRun.objects.filter(handler="relays_meanwhile").order_by("pk")
    assert [(r.event_id, r.payload["retried"]) for r in runs] == [(first.id, 0), (second.id, 1)]
    rows = Delivery.objects.filter(subscription=RELAYING["name"])
    assert {(r.status, r.attempts, r.retry_at) for r in rows} == {("succeeded", 1, None)}


@pytest.mark.django_db(transaction=True)
def test_where_no_run_lock_protects_it_a_task_sends_the_delivery_it_hands_on_its_message(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite, or PostgreSQL behind a pooler in transaction mode (``DISABLE_SERVER_SIDE_
    CURSORS``): a relay copy sent while a handler runs longer than the hand-on's grace would
    run beside it there, so the task does not run it: its message goes, as before."""
    monkeypatch.setitem(connection.settings_dict, "DISABLE_SERVER_SIDE_CURSORS", True)
    assert not ordering.locks_runs("default")
    with shop_wiring(queue, SUBSCRIPTIONS=[RETRYING]):
        second, sent = first_run_with_the_second_held(queue)
        assert handler_runs() == [(1, 10)]
        [again] = sent
        assert again["event"]["id"] == str(second.id)
        assert process_message(again, 0).status == "succeeded"
    assert handler_runs() == [(1, 10), (1, 11)]


@pytest.mark.postgresql  # the run lock lets a task run what it hands on
@pytest.mark.django_db(transaction=True)
def test_a_handed_on_delivery_gone_before_the_task_runs_it_is_said_and_run_nothing(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[RETRYING]):
        first = publish("shop.paid", {"order_id": 1, "total": 10, "times": 0})
        second = publish("shop.paid", {"order_id": 1, "total": 11, "times": 0})
        messages = ordered_messages(queue)
        assert process_message(messages[str(second.id)], 0).status == "held"
        ordered = Delivery.objects.filter(subscription=RETRYING["name"])
        ordered.filter(event_id=first.id).update(status="succeeded")  # as if it ran
        with ordering.hand_ons_kept() as kept:
            ordering.release("default", [(RETRYING["name"], "1")])
            ordered.filter(event_id=second.id).delete()  # pruned meanwhile
            ran = continuing.run_handed_on(kept, batch_success=False, retry=_no_retry)
        assert (ran, kept) == (0, [])
        assert ordered_messages(queue) == {}
    assert handler_runs() == []
    assert "Cannot read a handed-on delivery; events_relay sends it" in caplog.text


def _no_retry(*args: Any) -> None:
    raise AssertionError("no retry was expected")


@pytest.mark.postgresql  # the run lock lets a task run what it hands on
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("counts", [True, False], ids=["counted", "uncounted"])
def test_a_handed_on_delivery_that_asks_for_a_retry_is_sent_one_counted_as_its_second_run(
    queue: str, counts: bool
) -> None:
    """What Celery's retry would send had the delivery been the task's own message: one
    retry counted, after the delay asked for; its payload sealed as every message's is. A
    ``RetryLater(counts=False)`` run stays uncounted (its row and its retry's message)."""
    with shop_wiring(queue, SUBSCRIPTIONS=[RETRYING]):
        first = publish("shop.paid", {"order_id": 1, "total": 10, "times": 0})
        second = publish(
            "shop.paid",
            {
                **{"order_id": 1, "total": 11, "times": 1, "seconds": 30, "counts": counts},
                "email": "b@example.com",
            },
        )
        messages = ordered_messages(queue)
        assert process_message(messages[str(second.id)], 0).status == "held"
        assert deliver.apply(args=(messages[str(first.id)],)).state == "SUCCESS"
        assert handler_runs() == [(1, 10), (1, 11)]
        [(retry, headers)] = drain_with_headers(queue)
    assert retry["event"]["id"] == str(second.id)
    assert "b@example.com" not in json.dumps(retry)  # sealed
    assert headers["retries"] == 1 and headers["eta"] is not None
    assert retry.get("uncounted", 0) == (0 if counts else 1)
    row = Delivery.objects.get(event_id=second.id, subscription=RETRYING["name"])
    assert (row.status, row.attempts, row.uncounted) == ("pending", 1, 0 if counts else 1)
    # Due for events_relay one threshold after the retry's time, should this process die
    # before the broker has the retry (it has no message of its own to be redelivered).
    assert row.retry_at is not None
    assert row.retry_at > timezone.now() + timedelta(seconds=30 + resend_after() - 60)
    with shop_wiring(queue, SUBSCRIPTIONS=[RETRYING]):
        assert deliver.apply(args=(retry,), retries=headers["retries"]).state == "SUCCESS"
    row.refresh_from_db()
    assert (row.status, row.attempts, row.uncounted, row.retry_at) == (
        ("succeeded", 2, 0 if counts else 1, None)
    )


@pytest.mark.postgresql  # the run lock lets a task run what it hands on
@pytest.mark.django_db(transaction=True)
def test_a_handed_on_retry_the_broker_refuses_is_left_to_the_relay(
    queue: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The send itself is replaced (the task's own app is the in-memory broker): what is
    tested is what the task does when it fails, as Celery's retry does for its own delivery."""

    def refused(*args: Any, **kwargs: Any) -> None:
        raise KombuOperationalError("[Errno 111] Connection refused")

    with shop_wiring(queue, SUBSCRIPTIONS=[RETRYING]):
        first = publish("shop.paid", {"order_id": 1, "total": 10, "times": 0})
        second = publish("shop.paid", {"order_id": 1, "total": 11, "times": 1, "seconds": 5})
        messages = ordered_messages(queue)
        assert process_message(messages[str(second.id)], 0).status == "held"
        monkeypatch.setattr(deliver, "apply_async", refused)
        assert deliver.apply(args=(messages[str(first.id)],)).state == "SUCCESS"
        assert drain_with_headers(queue) == []
    row = Delivery.objects.get(event_id=second.id, subscription=RETRYING["name"])
    assert (row.status, row.attempts) == ("pending", 1)
    # events_relay sends it once due: at the retry's own time, not a threshold later.
    assert row.retry_at is not None
    assert row.retry_at < timezone.now() + timedelta(seconds=5)
    assert "The broker did not take the retry of a handed-on delivery" in caplog.text


@pytest.mark.django_db
def test_a_handed_on_message_carries_its_event_and_the_runs_its_row_records(
    queue: str, publish_now: Any, django_capture_on_commit_callbacks: Any
) -> None:
    # Read in one raw query (figure 16's one key): the event record, and the runs so far of a
    # delivery held after runs of its own (here written by hand: two, one of them uncounted).
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish_now("shop.paid", {"order_id": 1, "total": 10})
        second = publish_now("shop.paid", {"order_id": 1, "total": 11})
        messages = ordered_messages(queue)
        with django_capture_on_commit_callbacks(execute=True):
            held = process_message(messages[str(second.id)], 0, manage_connections=False)
            Delivery.objects.filter(event_id=second.id).update(attempts=2, uncounted=1)
            ran = process_message(messages[str(first.id)], 0, manage_connections=False)
            assert (held.status, ran.status) == ("held", "succeeded")
        [again] = ordered_messages(queue).values()
    assert (again["prior_attempts"], again["uncounted"]) == (2, 1)
    assert again["event"] == messages[str(second.id)]["event"]  # as its first message had it


@pytest.mark.django_db
def test_a_handed_on_delivery_deleted_before_its_send_is_said_and_sent_nothing(
    queue: str,
    publish_now: Any,
    django_capture_on_commit_callbacks: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish_now("shop.paid", {"order_id": 1, "total": 10})
        second = publish_now("shop.paid", {"order_id": 1, "total": 11})
        messages = ordered_messages(queue)
        held = process_message(messages[str(second.id)], 0, manage_connections=False)
        with django_capture_on_commit_callbacks() as after_commit:
            ran = process_message(messages[str(first.id)], 0, manage_connections=False)
        assert (held.status, ran.status) == ("held", "succeeded")
        Delivery.objects.filter(event_id=second.id).delete()  # by an admin, meanwhile
        with caplog.at_level(logging.WARNING, "django_events"):
            for callback in after_commit:
                callback()
        assert "Cannot read a handed-on delivery" in caplog.text
        assert ordered_messages(queue) == {}


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.parametrize(("alias", "elsewhere"), [("default", "other"), ("other", "default")])
def test_a_turn_on_postgresql_is_two_statements(queue: str, alias: str, elsewhere: str) -> None:
    # Outside a transaction (a worker), the finish is one statement: the function of
    # migration 0011 (lock, success row, hand-on); figure 16 measures what that buys. The
    # same on the event log's database when it is not default, and none on the other one.
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish("shop.paid", {"order_id": 1, "total": 10}, using=alias)
        second = publish("shop.paid", {"order_id": 1, "total": 11}, using=alias)
        messages = {
            m["event"]["id"]: m for m in drain(queue) if m["subscription"] == ORDERED["name"]
        }

        def deliver(event: Any) -> tuple[str, list[str]]:
            with (
                CaptureQueriesContext(connections[alias]) as queries,
                CaptureQueriesContext(connections[elsewhere]) as stray,
            ):
                status = process_message(messages.pop(str(event.id)), 0).status
            assert gate_statements(stray) == []
            return status, gate_statements(queries)

        assert deliver(second)[0] == "held"
        # The turn, the finish; the handed-on one read and sent (its relay due time is the
        # background marker's to clear, on a connection of its own).
        status, statements = deliver(first)
        assert status == "succeeded" and len(statements) == 3, statements
        assert "django_events_finish_ordered" in statements[1]
        [again] = [m for m in drain(queue) if m["subscription"] == ORDERED["name"]]
        messages[str(second.id)] = again
        status, statements = deliver(second)
        assert (status, len(statements)) == ("succeeded", 2), statements
        marking.flush()

    rows = Delivery.objects.using(alias).filter(subscription=ORDERED["name"]).order_by("sequence")
    assert list(rows.values_list("status", "retry_at")) == [("succeeded", None)] * 2
    assert run_locks() == []  # the finish released each run's lock in its statement


def deliver_the_second_then_the_first(queue: str, using: str = "default") -> None:
    """Publish two events of one key on ``using``; deliver the second (held), then the first
    (its finish hands the second on: a new message on ``queue``)."""
    first = publish("shop.paid", {"order_id": 1, "total": 10}, using=using)
    second = publish("shop.paid", {"order_id": 1, "total": 11}, using=using)
    messages = ordered_messages(queue)
    assert process_message(messages[str(second.id)], 0).status == "held"
    assert process_message(messages[str(first.id)], 0).status == "succeeded"


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_worker_newer_than_the_migrations_still_finishes_and_hands_on(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A rolling deploy: the worker's code calls migration 0011's function before anyone
    # ran migrate. The outcome is recorded the slower way (the transaction), and said once.
    # (The function is dropped alone: the worker's code needs 0012's column.)
    with finish_function_missing(), shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        deliver_the_second_then_the_first(queue)
        [again] = [m for m in drain(queue) if m["subscription"] == ORDERED["name"]]
        assert process_message(again, 0).status == "succeeded"

    rows = Delivery.objects.filter(subscription=ORDERED["name"]).order_by("sequence")
    assert list(rows.values_list("status", "retry_at")) == [("succeeded", None)] * 2
    missing = [r for r in caplog.records if "migration 0011 is not applied" in r.getMessage()]
    assert len(missing) == 1


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_worker_newer_than_the_turn_function_still_reads_its_turn(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A rolling deploy: the worker's code reads its turn through migration 0013's function
    # before anyone ran migrate. It reads it with the statement instead, and says so once.
    signature = "django_events_ordered_turn(uuid, varchar, bigint)"
    with (
        function_missing("default", signature, TURN_FUNCTION, "ORDERED_TURN"),
        shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]),
    ):
        deliver_the_second_then_the_first(queue)
        [again] = ordered_messages(queue).values()
        assert process_message(again, 0).status == "succeeded"
        assert process_message(again, 0).status == "skipped"  # a copy: already done

    rows = Delivery.objects.filter(subscription=ORDERED["name"]).order_by("sequence")
    assert list(rows.values_list("status", flat=True)) == ["succeeded"] * 2
    assert run_locks() == []
    missing = [r.getMessage() for r in caplog.records if "0013 is not applied" in r.getMessage()]
    assert missing == [
        "Run manage.py migrate: django_events migration 0013 is not applied on database "
        "'default'; ordered deliveries read their turn the slower way until it is"
    ]


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_the_function_missing_on_another_database_names_it_and_its_migrate(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The event log on "other", migrated there after default (a plain migrate migrates
    # default only): what the error says to run must reach "other".
    with finish_function_missing("other"), shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        deliver_the_second_then_the_first(queue, "other")

    rows = Delivery.objects.using("other").filter(subscription=ORDERED["name"])
    assert sorted(rows.values_list("status", flat=True)) == ["pending", "succeeded"]
    [missing] = [r.getMessage() for r in caplog.records if "0011 is not applied" in r.getMessage()]
    assert missing == (
        "Run manage.py migrate --database other: django_events migration 0011 is not applied "
        "on database 'other'; ordered deliveries are recorded the slower way until it is"
    )


@pytest.mark.postgresql
@pytest.mark.django_db
def test_a_keys_turn_and_head_read_only_its_unfinished_deliveries(
    queue: str, publish_now: Any
) -> None:
    # A key with a long history: its turn (the worker's claim) and its head (the hand-on)
    # must not walk through the finished deliveries, or each delivery of a busy key gets
    # slower than the last.
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        history = [publish_now("shop.paid", {"order_id": 7, "total": n}) for n in range(300)]
        drain(queue)
        Delivery.objects.filter(event_id__in=[e.id for e in history]).update(status="succeeded")
        latest = publish_now("shop.paid", {"order_id": 7, "total": 1})
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE django_events_delivery")
        with CaptureQueriesContext(connection) as queries:
            claimed = ordering.claim("default", latest.id, ORDERED["name"])
            first = ordering.first_unfinished("default", ORDERED["name"], "7")
        head = Delivery.objects.get(event_id=latest.id, subscription=ORDERED["name"])
        assert claimed.turn is ordering.Turn.RUN and first == (head.pk, "pending")
        ordering.end_run(claimed)

    try:
        for query in queries.captured_queries:
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) " + query["sql"])
                plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "django_events_dlv_turn_idx" in plan, plan
            assert "Rows Removed by Filter: 300" not in plan, plan
    finally:  # the turn's EXPLAIN ANALYZE took its run's lock again
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock_all()")


@pytest.mark.postgresql  # SQLite: the hand-on's gate write waits for any writer before it reads
@pytest.mark.django_db(transaction=True)
def test_a_hand_on_leaves_a_head_a_worker_finished_meanwhile_alone(queue: str) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish("shop.paid", {"order_id": 1, "total": 10})
        second = publish("shop.paid", {"order_id": 1, "total": 11})
        [message] = [
            m
            for m in drain(queue)
            if m["subscription"] == ORDERED["name"] and m["event"]["id"] == str(second.id)
        ]
        assert process_message(message, 0, manage_connections=False).status == "held"
        rows = Delivery.objects.filter(subscription=ORDERED["name"])
        rows.filter(event_id=first.id).update(status="resolved")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [hand_on_pid] = cursor.fetchone()
        locked, waited = threading.Event(), []

        def worker() -> None:
            # A duplicate of the second's message runs it (no key lock while a handler runs)
            # and commits its success once the hand-on below waits for the row.
            try:
                with transaction.atomic():
                    row = rows.select_for_update().get(event_id=second.id)
                    rows.filter(pk=row.pk).update(status="succeeded", attempts=1)
                    locked.set()
                    waited.append(_waits_for_a_lock(hand_on_pid))
            finally:
                connections.close_all()

        thread = threading.Thread(target=worker)
        thread.start()
        assert locked.wait(10)
        ordering.release("default", [(ORDERED["name"], "1")])  # first marked resolved
        thread.join()

        assert waited == [True]  # the hand-on read the row held, then waited to write it
        assert list(rows.order_by("sequence").values_list("status", "retry_at")) == [
            ("resolved", None),
            ("succeeded", None),
        ]
        assert drain(queue) == []  # not sent again


def _waits_for_a_lock(pid: int, timeout: float = 10.0) -> bool:
    """Whether the backend ``pid`` is seen waiting for a lock within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                [pid],
            )
            if cursor.fetchone()[0]:
                return True
            time.sleep(0.05)
    return False


@pytest.mark.django_db
def test_a_delivery_held_by_its_key_shows_in_the_admin(queue: str, publish_now: Any) -> None:
    from django.urls import reverse

    from tests.test_admin import user_client

    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        publish_now("shop.paid", {"order_id": 7, "total": 10})
        second = publish_now("shop.paid", {"order_id": 7, "total": 11})
        [message] = [
            m
            for m in drain(queue)
            if m["subscription"] == ORDERED["name"] and m["event"]["id"] == str(second.id)
        ]
        assert process_message(message, 0, manage_connections=False).status == "held"

        client = user_client("view_eventrecord")
        page = client.get(reverse("admin:django_events_eventrecord_change", args=[second.id]))
        wiring_page = client.get(reverse("admin:django_events_wiring"))

    html = page.content.decode()
    assert page.status_code == 200
    assert "7 #2" in html  # its key and place in line: behind #1
    assert ">held<" in html
    # The wiring page counts it under its subscription, which is not paused: its key holds it.
    wired = wiring_page.content.decode()
    assert (
        f"{ORDERED['name']} (tests.app.handlers.record): async via celery · {queue} · 1 held"
        in wired
    )


def held_behind_a_failure(
    queue: str, publish_now: Any, field: str, key: str
) -> tuple[Event, Event]:
    """Two events of one key (``field``): the first's delivery failed, its error quoting the
    key; the second's held behind it, by a worker. Inside `shop_wiring` of a subscription
    ordered by ``field``."""
    first = publish_now("shop.paid", {"order_id": 1, field: key})
    second = publish_now("shop.paid", {"order_id": 2, field: key})
    Delivery.objects.filter(event_id=first.id, subscription=ORDERED["name"]).update(
        status="failed", attempts=1, last_error=f"RuntimeError: declined {key}"
    )
    [message] = [
        m
        for m in drain(queue)
        if m["subscription"] == ORDERED["name"] and m["event"]["id"] == str(second.id)
    ]
    assert process_message(message, 0, manage_connections=False).status == "held"
    return first, second


@pytest.mark.django_db
def test_a_key_that_is_a_redacted_value_is_masked_where_held_deliveries_show(
    queue: str, publish_now: Any
) -> None:
    from django.urls import reverse

    from tests.test_admin import user_client

    by_email = {**ORDERED, "ordering_key": "email"}
    email = "ada@example.com"
    with shop_wiring(queue, SUBSCRIPTIONS=[by_email]):
        first, second = held_behind_a_failure(queue, publish_now, "email", email)

        page = user_client("view_eventrecord").get(
            reverse("admin:django_events_eventrecord_change", args=[second.id])
        )
        listed, as_json = StringIO(), StringIO()
        call_command("events_list", "--held", stdout=listed)
        call_command("events_list", "--held", "--format", "json", stdout=as_json)

    html = page.content.decode()
    assert "#2" in html and ">held<" in html
    assert email not in html
    assert f"{ORDERED['name']} ['•••']: 1 held, behind {first.id}" in listed.getvalue()
    assert "RuntimeError: declined '•••'" in listed.getvalue()
    assert email not in listed.getvalue() + as_json.getvalue()


@pytest.mark.django_db
def test_held_deliveries_of_an_event_no_longer_declared_mask_every_value(
    queue: str, publish_now: Any
) -> None:
    """Its redact list is unknown: events_list --held masks the key and the head's error as
    the admin does (every value of the payload), not shows them in clear."""
    from django.urls import reverse

    from tests.test_admin import user_client

    by_account = {**ORDERED, "ordering_key": "account"}
    account = "acct-4111-secret"
    with shop_wiring(queue, SUBSCRIPTIONS=[by_account]):
        first, second = held_behind_a_failure(queue, publish_now, "account", account)
        # A deploy renamed the event: its records' declaration, and redact list, are gone.
        EventRecord.objects.filter(pk__in=[first.id, second.id]).update(name="shop.renamed")

        page = user_client("view_eventrecord").get(
            reverse("admin:django_events_eventrecord_change", args=[second.id])
        )
        listed, as_json = StringIO(), StringIO()
        call_command("events_list", "--held", stdout=listed)
        call_command("events_list", "--held", "--format", "json", stdout=as_json)

    assert account not in page.content.decode()  # the admin, as before
    assert f"{ORDERED['name']} ['•••']: 1 held, behind {first.id}" in listed.getvalue()
    assert "RuntimeError: declined '•••'" in listed.getvalue()
    assert account not in listed.getvalue() + as_json.getvalue()


@pytest.mark.django_db(transaction=True)
def test_an_ordered_publish_outside_a_transaction_takes_its_number_with_its_row(
    queue: str,
) -> None:
    # Outside a transaction the gate's number and the delivery row commit together: a row that
    # cannot be written leaves no record and no number (else a later publish of the key could
    # be numbered, written and run first, the gate's lock gone with the first statement).
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        with inserts_refused(Delivery._meta.db_table), pytest.raises(OperationalError):
            publish("shop.paid", {"order_id": 1, "total": 10})
        assert not EventRecord.objects.exists()
        assert not OrderingGate.objects.filter(last_sequence__gt=0).exists()
        event = publish("shop.paid", {"order_id": 1, "total": 11})
    row = Delivery.objects.get(event_id=event.id, subscription=ORDERED["name"])
    assert row.sequence == 1


@pytest.mark.django_db(transaction=True)
def test_a_retry_of_an_ordered_delivery_the_broker_does_not_take_is_left_to_the_relay(
    queue: str,
) -> None:
    """Its message goes at the commit of the retry's claim: the counts are read after it."""
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        event = publish("shop.paid", {"order_id": 3, "total": 10})
        drain(queue)
        ordered = Delivery.objects.filter(event_id=event.id, subscription=ORDERED["name"])
        ordered.update(status="failed", attempts=1)
    out = StringIO()
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED], CELERY_APP="tests.brokers.unreachable"):
        call_command("events_retry", "--subscription", ORDERED["name"], stdout=out)
    assert "0 re-enqueued for a worker" in out.getvalue()
    assert "1 left pending for events_relay" in out.getvalue()
    row = ordered.get()
    assert row.status == "pending" and row.retry_at is not None  # due for the relay


# A run of an ordered delivery and a copy of its message (a broker's redelivery, the relay's
# resend) at the same time: threads, each with a database connection of its own, as two
# worker processes would have.
GATED = {**ORDERED, "handler": "tests.app.handlers.gated"}


@pytest.fixture
def gates() -> Iterator[list[threading.Event]]:
    """`tests.app.handlers.gated`'s gates: its n-th run waits for the n-th to be set."""
    handlers.GATED.clear()
    handlers.GATES[:] = [threading.Event() for _ in range(4)]
    try:
        yield handlers.GATES
    finally:
        for gate in handlers.GATES:
            gate.set()
        handlers.GATED.clear()
        handlers.GATES.clear()


class Worker(threading.Thread):
    """`process_message` in a thread of its own (its own database connection)."""

    def __init__(self, message: dict[str, Any], retries: int = 0) -> None:
        super().__init__()
        self.message, self.retries = message, retries
        self.status: str | None = None
        self.result: Outcome | None = None

    def run(self) -> None:
        try:
            self.result = process_message(self.message, self.retries)
            self.status = self.result.status
        finally:
            connections.close_all()

    def outcome(self, timeout: float = 10.0) -> str | None:
        """Its outcome's status, once it ended within ``timeout`` seconds (None: still runs)."""
        self.join(timeout)
        return None if self.is_alive() else self.status


def gated_runs() -> list[str]:
    return [run["event"] for run in handlers.GATED]


def run_locks() -> list[tuple[int, int]]:
    """The session-level advisory locks held on this database: (backend pid, object id)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, objid FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return [tuple(row) for row in cursor.fetchall()]


def ordered_messages(queue: str, subscription: str = ORDERED["name"]) -> dict[str, Any]:
    return {m["event"]["id"]: m for m in drain(queue) if m["subscription"] == subscription}


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_copy_of_a_running_delivery_runs_nothing_beside_it(
    queue: str, gates: list[threading.Event], caplog: pytest.LogCaptureFixture
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[GATED]):
        first = publish("shop.paid", {"order_id": 1, "total": 10})
        second = publish("shop.paid", {"order_id": 1, "total": 11})
        messages = ordered_messages(queue)
        running = Worker(messages[str(first.id)])
        copy = Worker(messages[str(first.id)])
        try:
            running.start()
            wait_for(lambda: gated_runs() == [str(first.id)], 10, "the first run")
            with caplog.at_level(logging.INFO, "django_events.worker"):
                copy.start()  # the same message again, on another worker, as it runs
                # It runs nothing (a second run would wait at its gate, still running) and
                # comes back later as the same attempt: by then the run has finished.
                assert copy.outcome() == "retry", gated_runs()
            assert gated_runs() == [str(first.id)]
            assert "Running on another worker right now" in caplog.text
            assert copy.result is not None and copy.result.retry_in is not None
            assert copy.result.retry_in >= 1
            comes_back = copy.result.retry_with
            assert comes_back["prior_attempts"] == messages[str(first.id)]["prior_attempts"] - 1
            gates[0].set()
            assert running.outcome() == "succeeded"
        finally:
            for gate in gates:
                gate.set()
            running.join(10)
            copy.join(10)
        # Now a copy is a duplicate of a finished delivery; the key's next one runs after.
        assert process_message(messages[str(first.id)], 0).status == "skipped"
        assert process_message(messages[str(second.id)], 0).status == "succeeded"

    assert gated_runs() == [str(first.id), str(second.id)]
    assert all(run["ended"] for run in handlers.GATED)
    assert run_locks() == []


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_copy_runs_once_the_worker_running_the_delivery_is_gone(
    queue: str, gates: list[threading.Event]
) -> None:
    # The worker dies as its handler runs: PostgreSQL ends its session, and the lock with it;
    # the message, never acknowledged, comes back and runs.
    with shop_wiring(queue, SUBSCRIPTIONS=[GATED]):
        event = publish("shop.paid", {"order_id": 1, "total": 10})
        message = ordered_messages(queue)[str(event.id)]
        dying = Worker(message)
        try:
            dying.start()
            wait_for(lambda: gated_runs() == [str(event.id)], 10, "the first run")
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [handlers.GATED[0]["pid"]])
            wait_for(lambda: not run_locks(), 10, "its session to end")
            gates[1].set()
            assert process_message(message, 0).status == "succeeded"
            assert gated_runs() == [str(event.id)] * 2
            assert handlers.GATED[1]["ended"] and not handlers.GATED[0]["ended"]
        finally:
            gates[0].set()
            dying.join(10)
        # Its handler ended after all: its success is saved on a new connection.
        assert dying.status == "succeeded"
    assert Delivery.objects.get(event_id=event.id, subscription=GATED["name"]).status == (
        "succeeded"
    )
    assert run_locks() == []


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("handler", "retry", "payload", "status"),
    [
        ("always_fails", {"max_attempts": 3, "backoff": 0.1}, {}, "retry"),
        ("always_fails", {"max_attempts": 1}, {}, "failed"),
        ("permanent_failure", {}, {"n": 1}, "failed"),
        ("retry_later", {}, {"times": 2}, "retry"),
    ],
)
def test_a_run_that_did_not_finish_releases_its_lock_for_the_retry(
    queue: str, handler: str, retry: dict[str, Any], payload: dict[str, Any], status: str
) -> None:
    # A worker keeps its connection between deliveries (CONN_MAX_AGE): a lock left held by
    # a failed run would make its retry, on another worker process, look running.
    declaration = {**ORDERED, "handler": f"tests.app.handlers.{handler}", "retry": retry}
    with shop_wiring(queue, SUBSCRIPTIONS=[declaration]):
        event = publish("shop.paid", {"order_id": 1, "total": 10, **payload})
        message = ordered_messages(queue)[str(event.id)]
        assert process_message(message, 0, manage_connections=False).status == status
        assert run_locks() == []
        elsewhere = Worker(message, retries=1)
        elsewhere.start()
        elsewhere.join(10)
        assert process_message(message, 2, manage_connections=False).status != "skipped"
    runs = HandlerRun.objects.filter(event_id=event.id, handler=handler).count()
    assert (elsewhere.status, runs) == (status, 3)
    assert run_locks() == []


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_an_idempotent_ordered_run_holds_its_lock_until_its_transaction_hands_on(
    queue: str, gates: list[threading.Event]
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[{**GATED, "idempotent": True}]):
        event = publish("shop.paid", {"order_id": 1, "total": 10})
        message = ordered_messages(queue)[str(event.id)]
        running = Worker(message)
        try:
            running.start()
            wait_for(lambda: gated_runs() == [str(event.id)], 10, "the first run")
            copy = Worker(message)
            copy.start()
            assert copy.outcome() == "retry"  # not waiting for its row's lock
            gates[0].set()
            assert running.outcome() == "succeeded"
        finally:
            gates[0].set()
            running.join(10)
        assert process_message(message, 0, manage_connections=False).status == "skipped"
    assert gated_runs() == [str(event.id)]
    assert run_locks() == []


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_claim_whose_earlier_delivery_finishes_as_it_holds_takes_the_lock_too(
    queue: str,
) -> None:
    # The claim reads an unfinished delivery before it; by the time it has locked the key's
    # turn to hold, that one has finished: it runs, and its run's lock is taken then.
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish("shop.paid", {"order_id": 1, "total": 10})
        second = publish("shop.paid", {"order_id": 1, "total": 11})
        rows = Delivery.objects.filter(subscription=ORDERED["name"])

        def first_finishes(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            if "pg_advisory_xact_lock" in sql and rows.get(event_id=first.id).status == "pending":
                rows.filter(event_id=first.id).update(status="succeeded")
            return execute(sql, params, many, context)

        with connection.execute_wrapper(first_finishes):
            claimed = ordering.claim("default", second.id, ORDERED["name"])
        assert claimed.turn is ordering.Turn.RUN and claimed.lock is not None
        assert len(run_locks()) == 1
        copy = threading.Thread(
            target=lambda: (
                turns.append(ordering.claim("default", second.id, ORDERED["name"]).turn),
                connections.close_all(),
            )
        )
        turns: list[ordering.Turn] = []
        copy.start()
        copy.join(10)
        assert turns == [ordering.Turn.RUNNING]
        ordering.end_run(claimed)
        ordering.end_run(claimed)  # once only
    assert run_locks() == []


POOLED_RUNS: list[str] = []


def closes_its_connection_then_fails_once(event: Event) -> None:
    """A handler that lets Django close its connection (a long one may), failing once."""
    POOLED_RUNS.append(str(event.id))
    close_old_connections()  # with CONN_MAX_AGE = 0: back to the pool, its session alive
    if len(POOLED_RUNS) == 1:
        raise RuntimeError("the first run fails")


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_with_djangos_connection_pool_a_failed_runs_retry_runs(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Django's pool takes a connection back, its session's locks held, where Django closes
    # it: a run lock taken there would make the retry of a failed run find it "running".
    POOLED_RUNS.clear()
    connection.close()
    options = {**connection.settings_dict.get("OPTIONS", {}), "pool": {"min_size": 2}}
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    subscription = {
        **ORDERED,
        "handler": f"{__name__}.closes_its_connection_then_fails_once",
        "retry": {"max_attempts": 3, "backoff": 0.1},
    }
    try:
        with shop_wiring(queue, SUBSCRIPTIONS=[subscription]):
            event = publish("shop.paid", {"order_id": 1, "total": 10})
            message = ordered_messages(queue)[str(event.id)]
            first = Worker(message)
            first.start()
            assert first.outcome() == "retry"
            retry = Worker(message, retries=1)
            retry.start()
            assert retry.outcome() == "succeeded"
        assert [str(event.id)] * 2 == POOLED_RUNS
        assert run_locks() == []
    finally:
        connection.close()
        connection.close_pool()


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_behind_a_pooler_in_transaction_mode_a_claim_takes_no_lock(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A session's lock would stay with a server connection the pooler hands to other clients.
    monkeypatch.setitem(connection.settings_dict, "DISABLE_SERVER_SIDE_CURSORS", True)
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        event = publish("shop.paid", {"order_id": 1, "total": 10})
        claimed = ordering.claim("default", event.id, ORDERED["name"])
        assert (claimed.turn, claimed.lock, run_locks()) == (ordering.Turn.RUN, None, [])
