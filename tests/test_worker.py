"""django_events.delivery.worker, in this process: what a delivery writes."""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection, connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_events.delivery import marking
from django_events.delivery.lost_messages import resend_after
from django_events.delivery.worker import keep_retry_due, process_message
from django_events.models import Delivery, EventRecord
from django_events.operations.pausing import pause, resume
from tests.app.models import HandlerRun
from tests.ops import MANIFESTS, drain, shop_wiring

RECORD = "tests.app.handlers.record"
ONCE = {"event": "shop.paid", "handler": RECORD, "mode": "async", "name": "shop-once"}
FLAKY = {
    "event": "shop.paid",
    "handler": "tests.app.handlers.fails_first_time",
    "mode": "async",
    "name": "shop-flaky",
}


@pytest.mark.django_db
def test_an_idempotent_success_is_written_once_with_its_duration(queue: str, publish_now) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[{**ONCE, "idempotent": True}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-once"]
        table = Delivery._meta.db_table

        with CaptureQueriesContext(connection) as queries:
            assert process_message(message, 0, manage_connections=False).status == "succeeded"

    row: Any = Delivery.objects.get(event_id=paid.id, subscription="shop-once")
    assert (row.status, row.attempts) == ("succeeded", 1)
    assert row.duration_ms is not None and row.duration_ms >= 0
    writes = [
        q["sql"]
        for q in queries.captured_queries
        if table in q["sql"] and q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE"))
    ]
    assert len(writes) == 2, writes  # the running row (insert-or-keep), then its success


@pytest.mark.django_db
def test_a_retry_whose_message_is_lost_falls_due_for_the_relay(queue: str, publish_now) -> None:
    # A worker killed as it takes a retry's message (Redis' BRPOP window, the filesystem
    # transport) loses it: the retry's row falls due for the relay one threshold after the
    # retry's own time, and the relay's retries send it then.
    with shop_wiring(queue, SUBSCRIPTIONS=[FLAKY]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        before = timezone.now()
        outcome = process_message(message, 0, manage_connections=False)
        after = timezone.now()
        assert outcome.status == "retry" and outcome.retry_in is not None
        row: Any = Delivery.objects.get(event_id=paid.id, subscription="shop-flaky")
        wait = timedelta(seconds=outcome.retry_in + resend_after())
        assert (row.status, row.attempts) == ("pending", 1)
        assert before + wait <= row.retry_at <= after + wait

        # The retry's message never came: once the row is due, the relay sends the retry.
        Delivery.objects.filter(pk=row.pk).update(retry_at=timezone.now() - timedelta(seconds=1))
        out = StringIO()
        call_command("events_relay", "--min-age", "0", stdout=out, stderr=StringIO())
        assert "1 due delivery(ies) (retries, hand-ons)" in out.getvalue()
        [again] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        assert process_message(again, 0, manage_connections=False).status == "succeeded"

    row.refresh_from_db()
    assert (row.status, row.attempts, row.retry_at) == ("succeeded", 2, None)


@pytest.mark.django_db(transaction=True)  # the ordered claim and finish commit
def test_an_ordered_retry_is_left_to_the_relays_check_of_its_key(queue: str, publish_now) -> None:
    # An ordered key's first unfinished delivery has a check of its own for a lost message
    # (pending, no due time, untouched): its retry row gets no due time.
    with shop_wiring(queue, SUBSCRIPTIONS=[{**FLAKY, "ordering_key": "order_id"}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        assert process_message(message, 0, manage_connections=False).status == "retry"

    row: Any = Delivery.objects.get(event_id=paid.id, subscription="shop-flaky")
    assert (row.status, row.attempts, row.retry_at) == ("pending", 1, None)


@pytest.mark.django_db(transaction=True)
def test_an_ordered_retry_without_a_message_of_its_own_is_made_due_or_said_when_it_cannot_be(
    queue: str, publish_now, caplog: pytest.LogCaptureFixture
) -> None:
    """`keep_retry_due`, for a delivery a task ran for its key (`continuing`): its row falls
    due one threshold after the retry's time; a database that refuses that is logged, and
    the retry goes on (the row keeps what it had)."""
    with shop_wiring(queue, SUBSCRIPTIONS=[{**FLAKY, "ordering_key": "order_id"}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        outcome = process_message(message, 0, manage_connections=False)
    row: Any = Delivery.objects.get(event_id=paid.id, subscription="shop-flaky")
    assert (outcome.status, row.retry_at) == ("retry", None)

    def refuse(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("UPDATE") and Delivery._meta.db_table in sql:
            raise OperationalError("the delivery rows cannot be written")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse):
        keep_retry_due(outcome)
    assert "Could not make a retry's delivery due for events_relay" in caplog.text
    row.refresh_from_db()
    assert row.retry_at is None

    keep_retry_due(outcome)
    row.refresh_from_db()
    assert outcome.retry_in is not None
    least = timezone.now() + timedelta(seconds=outcome.retry_in + resend_after() - 60)
    assert row.retry_at is not None and row.retry_at > least


# RetryLater(counts=False) runs of a delivery sent again from its row (tests/manifests/
# failctl.yaml: fc-retry-later asks for `times` uncounted retries, then raises; max_attempts 2).
FAILCTL = [*MANIFESTS, Path(settings.BASE_DIR) / "manifests" / "failctl.yaml"]
UNCOUNTED_THEN_FAILS = {"n": 1, "times": 2, "seconds": 0.1, "counts": False, "then_fail": True}


def retry_later_messages(queue: str) -> list[dict[str, Any]]:
    return [m for m in drain(queue) if m["subscription"] == "fc-retry-later"]


def retry_later_row(event_id: Any) -> tuple[str, int, int]:
    row = Delivery.objects.get(event_id=event_id, subscription="fc-retry-later")
    return row.status, row.attempts, row.uncounted


@pytest.mark.django_db
def test_uncounted_runs_stay_uncounted_when_the_relay_sends_a_lost_retry(
    queue: str, publish_now
) -> None:
    with shop_wiring(queue, MANIFESTS=FAILCTL):
        job = publish_now("fc.job", UNCOUNTED_THEN_FAILS)
        [message] = retry_later_messages(queue)
        first = process_message(message, 0, manage_connections=False)
        second = process_message(first.retry_with, 1, manage_connections=False)
        assert (first.status, second.status) == ("retry", "retry")
        assert retry_later_row(job.id) == ("pending", 2, 2)

        # The second retry's message was lost: the relay sends it from the row once due.
        Delivery.objects.filter(event_id=job.id).update(retry_at=timezone.now())
        out = StringIO()
        call_command("events_relay", "--min-age", "0", stdout=out, stderr=StringIO())
        assert "1 due delivery(ies) (retries, hand-ons)" in out.getvalue()
        [again] = retry_later_messages(queue)
        assert (again["prior_attempts"], again["uncounted"]) == (2, 2)
        # The first run that counts raises: 1 of max_attempts 2, so it is retried once more.
        third = process_message(again, 0, manage_connections=False)
        assert third.status == "retry"
        assert retry_later_row(job.id) == ("pending", 3, 2)
        assert process_message(again, 1, manage_connections=False).status == "failed"
        assert retry_later_row(job.id) == ("failed", 4, 2)

        # A manual retry goes on from the row too.
        call_command("events_retry", "--all", stdout=StringIO(), stderr=StringIO())
        [retried] = retry_later_messages(queue)
        assert (retried["prior_attempts"], retried["uncounted"]) == (4, 2)


@pytest.mark.django_db
def test_uncounted_runs_stay_uncounted_across_a_pause_and_resume(queue: str, publish_now) -> None:
    with shop_wiring(queue, MANIFESTS=FAILCTL):
        job = publish_now("fc.job", UNCOUNTED_THEN_FAILS)
        [message] = retry_later_messages(queue)
        first = process_message(message, 0, manage_connections=False)
        assert first.status == "retry"

        pause("fc-retry-later")
        assert process_message(first.retry_with, 1, manage_connections=False).status == "held"
        assert retry_later_row(job.id) == ("held", 1, 1)
        assert resume("fc-retry-later").sent == 1
        [again] = retry_later_messages(queue)
        assert (again["prior_attempts"], again["uncounted"]) == (1, 1)

        second = process_message(again, 0, manage_connections=False)  # the second uncounted
        assert second.status == "retry"
        third = process_message(second.retry_with, 1, manage_connections=False)
        assert third.status == "retry"  # the first run that counts: 1 of max_attempts 2
        assert retry_later_row(job.id) == ("pending", 3, 2)
        assert process_message(second.retry_with, 2, manage_connections=False).status == "failed"

    assert retry_later_row(job.id) == ("failed", 4, 2)


@pytest.mark.django_db
def test_the_first_failure_after_uncounted_runs_waits_the_first_backoff(
    queue: str, publish_now
) -> None:
    # fc-retry-later: backoff 0.1 s, doubling, no jitter. Three uncounted runs do not grow it.
    with shop_wiring(queue, MANIFESTS=FAILCTL):
        publish_now("fc.job", {**UNCOUNTED_THEN_FAILS, "times": 3})
        [message] = retry_later_messages(queue)
        for retries in range(3):
            outcome = process_message(message, retries, manage_connections=False)
            assert (outcome.status, outcome.retry_in) == ("retry", 0.1)  # RetryLater's own
            message = outcome.retry_with
        failure = process_message(message, 3, manage_connections=False)
    assert (failure.status, failure.retry_in) == ("retry", 0.1)  # counted attempt 1


@pytest.mark.django_db
def test_a_replay_gets_max_attempts_of_its_own(queue: str, publish_now) -> None:
    # A read model rebuilt after its deliveries failed for good: the replay's runs are
    # retried on failure as a first delivery's are; attempts still count every run.
    with shop_wiring(queue, MANIFESTS=FAILCTL):
        job = publish_now("fc.job", {"n": 1, "times": 0, "then_fail": True})
        [message] = retry_later_messages(queue)
        assert process_message(message, 0, manage_connections=False).status == "retry"
        assert process_message(message, 1, manage_connections=False).status == "failed"
        assert retry_later_row(job.id) == ("failed", 2, 0)

        call_command("events_replay", "fc-retry-later", stdout=StringIO(), stderr=StringIO())
        # The row says what the message carries (the relay or a hand-on may send it from there).
        assert retry_later_row(job.id) == ("pending", 2, 2)
        [replayed] = retry_later_messages(queue)
        assert process_message(replayed, 0, manage_connections=False).status == "retry"
        assert retry_later_row(job.id) == ("pending", 3, 2)
        assert process_message(replayed, 1, manage_connections=False).status == "failed"
    assert retry_later_row(job.id) == ("failed", 4, 2)


@pytest.mark.django_db
def test_a_replay_the_broker_refused_leaves_the_failure_as_it_was(queue: str, publish_now) -> None:
    # Nothing ran: the failure keeps its counts, so a manual retry still gets one run.
    with shop_wiring(queue, MANIFESTS=FAILCTL):
        job = publish_now("fc.job", {"n": 1, "times": 0, "then_fail": True})
        [message] = retry_later_messages(queue)
        process_message(message, 0, manage_connections=False)
        assert process_message(message, 1, manage_connections=False).status == "failed"
    with shop_wiring(queue, MANIFESTS=FAILCTL, CELERY_APP="tests.brokers.unreachable"):
        out = StringIO()
        with pytest.raises(CommandError):
            call_command("events_replay", "fc-retry-later", stdout=out, stderr=StringIO())
        assert "1 not sent (broker unreachable)" in out.getvalue()
    assert retry_later_row(job.id) == ("failed", 2, 0)

    with shop_wiring(queue, MANIFESTS=FAILCTL):
        call_command("events_retry", "--all", stdout=StringIO(), stderr=StringIO())
        [retried] = retry_later_messages(queue)
        assert process_message(retried, 0, manage_connections=False).status == "failed"


ORDERED_LATER = {
    "name": "fc-ordered-later",
    "event": "fc.job",
    "handler": "tests.app.handlers.retry_later",
    "mode": "async",
    "ordering_key": "n",
    "retry": {"max_attempts": 2, "backoff": 0.1, "max_backoff": 1, "jitter": False},
}


def ordered_later(queue: str) -> list[dict[str, Any]]:
    return [m for m in drain(queue) if m["subscription"] == ORDERED_LATER["name"]]


def ordered_row(event_id: Any) -> tuple[str, int, int]:
    row = Delivery.objects.get(event_id=event_id, subscription=ORDERED_LATER["name"])
    return row.status, row.attempts, row.uncounted


@pytest.mark.django_db
def test_a_lost_ordered_head_is_resent_with_its_uncounted_runs(
    queue: str, publish_now, django_capture_on_commit_callbacks
) -> None:
    with shop_wiring(queue, MANIFESTS=FAILCTL, SUBSCRIPTIONS=[ORDERED_LATER]):
        job = publish_now("fc.job", {"n": 1, "times": 1, "counts": False, "then_fail": True})
        [message] = ordered_later(queue)
        assert process_message(message, 0, manage_connections=False).status == "retry"
        assert ordered_row(job.id) == ("pending", 1, 1)
        # The retry's message is lost: the relay's check of the key's head sends it again.
        drain(queue)
        ago = timezone.now() - timedelta(seconds=resend_after() + 60)
        EventRecord.objects.filter(pk=job.id).update(status="dispatched", dispatched_at=ago)
        Delivery.objects.filter(event_id=job.id).update(updated_at=ago)
        with django_capture_on_commit_callbacks(execute=True):
            out = StringIO()
            call_command("events_relay", stdout=out, stderr=StringIO())
        assert "resent" in out.getvalue(), out.getvalue()
        [again] = ordered_later(queue)
        assert (again["prior_attempts"], again["uncounted"]) == (1, 1)
        # Its first counted run fails: 1 of max_attempts 2, retried.
        assert process_message(again, 0, manage_connections=False).status == "retry"


@pytest.mark.django_db
def test_a_handed_on_delivery_carries_its_uncounted_runs(
    queue: str, publish_now, django_capture_on_commit_callbacks
) -> None:
    with shop_wiring(queue, MANIFESTS=FAILCTL, SUBSCRIPTIONS=[ORDERED_LATER]):
        head = publish_now("fc.job", {"n": 2, "times": 0})
        behind = publish_now("fc.job", {"n": 2, "times": 1, "counts": False, "then_fail": True})
        first_head, first_behind = ordered_later(queue)
        assert process_message(first_head, 0, manage_connections=False).status == "succeeded"
        ordered_later(queue)  # the hand-on's copy of `behind` (sent at publish already)
        uncounted = process_message(first_behind, 0, manage_connections=False)
        assert uncounted.status == "retry"
        assert ordered_row(behind.id) == ("pending", 1, 1)
        # A replay of the head makes it unfinished again: `behind`'s retry meets it, held.
        until = EventRecord.objects.get(pk=behind.id).occurred_at.isoformat()
        with django_capture_on_commit_callbacks(execute=True):
            call_command(
                "events_replay", ORDERED_LATER["name"], "--until", until, stdout=StringIO()
            )
        [replayed] = ordered_later(queue)
        assert replayed["event"]["id"] == str(head.id)
        assert process_message(uncounted.retry_with, 1, manage_connections=False).status == "held"
        assert ordered_row(behind.id) == ("held", 1, 1)
        # The head succeeds: the key is handed on to `behind`, sent from its row.
        with django_capture_on_commit_callbacks(execute=True):
            assert process_message(replayed, 0, manage_connections=False).status == "succeeded"
        [handed] = ordered_later(queue)
        assert handed["event"]["id"] == str(behind.id)
        assert (handed["prior_attempts"], handed["uncounted"]) == (1, 1)
        assert process_message(handed, 0, manage_connections=False).status == "retry"


@pytest.mark.django_db(transaction=True)
def test_an_outcome_the_database_cannot_store_before_migrate_waits_for_it(queue: str) -> None:
    # A worker of a new release started before migrate: the column it writes is missing.
    # A final failure is not dropped unseen (no failed row, no signal): it waits, as for a
    # database that is down, and is recorded once migrate ran.
    from django_events import publish

    with shop_wiring(queue, MANIFESTS=FAILCTL):
        job = publish("fc.job", {"n": 1, "times": 0, "then_fail": True})
        [message] = retry_later_messages(queue)
        call_command("migrate", "django_events", "0011", verbosity=0)
        try:
            last = process_message(message, 1)  # attempt 2 of max_attempts 2
        finally:
            call_command("migrate", "django_events", verbosity=0)
        assert last.status == "retry"
        assert process_message(message, 1).status == "failed"
    assert retry_later_row(job.id) == ("failed", 2, 0)


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_a_missing_column_of_a_migrated_database_is_not_waited_for(queue: str) -> None:
    # Every migration applied, yet a column is gone (dropped by hand, a search_path): no
    # migrate brings it back, so the outcome is logged and dropped, as any refused write.
    from django.db import connection

    from django_events import publish

    table = Delivery._meta.db_table
    with shop_wiring(queue, MANIFESTS=FAILCTL):
        publish("fc.job", {"n": 1, "times": 0, "then_fail": True})
        [message] = retry_later_messages(queue)
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table} RENAME COLUMN uncounted TO not_here")
        try:
            last = process_message(message, 1)
        finally:
            with connection.cursor() as cursor:
                cursor.execute(f"ALTER TABLE {table} RENAME COLUMN not_here TO uncounted")
    assert last.status == "failed"


# Retries before the handler ran (the database could not be read or written for it): the
# retry's run is the same attempt, so the handler's own failures get max_attempts and backoff.
ONCE_MORE = {"max_attempts": 2, "backoff": 0.1, "max_backoff": 1, "jitter": False}


@contextmanager
def refused_once(*words: str) -> Iterator[None]:
    """The next query whose SQL holds all of ``words`` fails as a lost connection does."""
    left = [True]

    def refuse(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if left and all(word in sql for word in words):
            left.clear()
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(refuse):
        yield
    assert not left, f"no query with {words}"


def flaky_row(event_id: Any) -> tuple[str, int]:
    row = Delivery.objects.get(event_id=event_id, subscription="shop-flaky")
    return row.status, row.attempts


@pytest.mark.django_db(transaction=True)  # the gate's outage closes the connection
def test_a_retry_for_an_unreachable_ordering_gate_counts_no_run(queue: str, publish_now) -> None:
    with shop_wiring(
        queue, SUBSCRIPTIONS=[{**FLAKY, "ordering_key": "order_id", "retry": ONCE_MORE}]
    ):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        # The claim's read of its turn: on PostgreSQL, migration 0013's function.
        postgresql = connection.vendor == "postgresql"
        turn = ("django_events_ordered_turn",) if postgresql else ("ordering_key", "sequence")
        with refused_once(*turn):
            gate = process_message(message, 0, manage_connections=False)
        # Not the first backoff (0.1 s): a retry that ran nothing waits a second at least.
        assert (gate.status, gate.retry_in) == ("retry", 1.0)
        # The handler's first run fails: 1 of max_attempts 2, retried after the first backoff.
        first = process_message(gate.retry_with or message, 1, manage_connections=False)
        assert (first.status, first.retry_in) == ("retry", 0.1)
        assert flaky_row(paid.id) == ("pending", 1)


@pytest.mark.django_db(transaction=True)  # the refused write ends its transaction
def test_a_retry_for_a_hold_not_recorded_counts_no_run(queue: str, publish_now) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[{**FLAKY, "retry": ONCE_MORE}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        pause("shop-flaky")
        with refused_once("INSERT", Delivery._meta.db_table):
            hold = process_message(message, 0, manage_connections=False)
        assert hold.status == "retry"
        resume("shop-flaky")
        first = process_message(hold.retry_with or message, 1, manage_connections=False)
        assert (first.status, first.retry_in) == ("retry", 0.1)
        assert flaky_row(paid.id) == ("pending", 1)


@pytest.mark.django_db(transaction=True)  # the refused write ends its transaction
def test_a_retry_for_an_idempotent_run_the_database_refused_to_start_counts_no_run(
    queue: str, publish_now
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[{**FLAKY, "idempotent": True, "retry": ONCE_MORE}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        with refused_once("INSERT", Delivery._meta.db_table):
            start = process_message(message, 0, manage_connections=False)
        assert start.status == "retry"
        first = process_message(start.retry_with or message, 1, manage_connections=False)
        assert (first.status, first.retry_in) == ("retry", 0.1)
        assert flaky_row(paid.id) == ("pending", 1)


@pytest.mark.django_db(transaction=True)  # the endpoint table's outage closes the connection
def test_a_retry_for_an_unreadable_webhook_endpoint_counts_no_run(queue: str, publish_now) -> None:
    from django_events.delivery import endpoints
    from django_events.models import WebhookEndpoint
    from tests.webhook_receiver import Receiver

    secret = "whsec_" + base64.b64encode(b"endpoint-secret-0123456789abcdef").decode()
    with Receiver(secret) as receiver, shop_wiring(queue, WEBHOOKS_ALLOW_PRIVATE=True):
        endpoint, _ = endpoints.create_endpoint(receiver.url("flaky"), ["shop.*"], secret=secret)
        name = endpoints.subscription_name(endpoint.pk)
        paid = publish_now("shop.paid", {"order_id": 1})
        [message] = [m for m in drain(queue) if m["subscription"] == name]
        with refused_once("SELECT", WebhookEndpoint._meta.db_table):
            unread = process_message(message, 0, manage_connections=False)
        assert unread.status == "retry" and receiver.of("flaky") == []
        # The first POST answers 500: attempt 1, retried after the first backoff.
        first = process_message(unread.retry_with or message, 1, manage_connections=False)
        assert (first.status, first.retry_in) == ("retry", 0.1)
    row = Delivery.objects.get(event_id=paid.id, subscription=name)
    assert (row.status, row.attempts, row.response_status) == ("pending", 1, 500)


@pytest.mark.django_db
def test_a_message_claiming_more_uncounted_runs_than_runs_is_rejected(
    queue: str, publish_now, caplog
) -> None:
    # Forged or corrupt: its handler's failures would count below zero, and be retried with
    # no backoff for as long as the claim lasts.
    with shop_wiring(queue, SUBSCRIPTIONS=[FLAKY]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-flaky"]
        forged = {**message, "prior_attempts": 1, "uncounted": 1000}
        assert process_message(forged, 0, manage_connections=False).status == "rejected"
        assert process_message(forged, 998, manage_connections=False).status == "rejected"
    assert "uncounted (1000) exceeds the runs before this one" in caplog.text
    assert not Delivery.objects.filter(event_id=paid.id, subscription="shop-flaky").exists()


@pytest.mark.parametrize("idempotent", [False, True])
@pytest.mark.django_db(transaction=True)  # the event record's foreign key is checked at commit
def test_a_success_brings_back_the_event_record_pruned_while_its_message_waited(
    idempotent: bool, queue: str, caplog
) -> None:
    # A backlog older than the prune's in-flight threshold (`resend_after`): events_prune
    # deleted the record of an event whose message still waited in the queue. The handler
    # runs once; its success is recorded, with the record written back, not dropped.
    from django_events import publish

    with shop_wiring(queue, SUBSCRIPTIONS=[{**ONCE, "idempotent": idempotent}]):
        paid = publish("shop.paid", {"order_id": 1, "total": 10})
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-once"]
        # Marked now: on PostgreSQL the background marker's mark would date the dispatch today.
        marking.flush()
        ago = timezone.now() - timedelta(days=2)
        EventRecord.objects.filter(pk=paid.id).update(
            status="dispatched", occurred_at=ago, dispatched_at=ago
        )
        call_command("events_prune", "--days", "1", "--include-failures", stdout=StringIO())
        assert not EventRecord.objects.filter(pk=paid.id).exists()
        runs = HandlerRun.objects.filter(handler="record", event_id=paid.id)
        before = runs.count()  # shop-audit's, in sync mode

        assert process_message(message, 0, manage_connections=False).status == "succeeded"
        assert process_message(message, 0, manage_connections=False).status == "succeeded"

    row = Delivery.objects.get(event_id=paid.id, subscription="shop-once")
    assert (row.status, row.attempts) == ("succeeded", 1)
    record = EventRecord.objects.get(pk=paid.id)
    assert (record.name, record.payload) == ("shop.paid", {"order_id": 1, "total": 10})
    # A redelivered idempotent message is a no-op; a plain one runs again.
    assert runs.count() - before == (1 if idempotent else 2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "worker" in r.name]


@pytest.mark.postgresql  # SQLite's one write lock keeps events_prune waiting anyway
@pytest.mark.django_db(transaction=True)  # the delivery and the prune: a connection each
def test_events_prune_waits_for_an_idempotent_delivery_under_way(
    queue: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog
) -> None:
    # A backlog older than the prune's in-flight threshold, and the prune runs while the
    # handler does. PostgreSQL checks the running row's foreign key only at commit: the
    # prune deleted the record under the handler, whose transaction then failed on it
    # ("Handler failed (attempt 1 of 3)", an IntegrityError), and the handler ran again.
    from django_events import publish

    monkeypatch.setenv("DJANGO_EVENTS_FAULT_DIR", str(tmp_path))
    slow = {**ONCE, "handler": "tests.app.handlers.hang_once", "idempotent": True}
    with shop_wiring(
        queue,
        MANIFESTS=[],
        EVENTS={"shop.paid": {"schema": {"type": "object"}}},
        SUBSCRIPTIONS=[slow],
    ):
        paid = publish("shop.paid", {"order_id": 1, "hang": 3})
        marking.flush()  # marked dispatched now, not after the dates below (PostgreSQL)
        [message] = drain(queue)
        ago = timezone.now() - timedelta(days=2)
        EventRecord.objects.filter(pk=paid.id).update(
            status="dispatched", occurred_at=ago, dispatched_at=ago
        )
        outcomes: list[str] = []

        def deliver() -> None:
            try:
                outcomes.append(process_message(message, 0).status)
            finally:
                connections.close_all()

        running = threading.Thread(target=deliver)
        running.start()
        try:
            marker = tmp_path / f"{paid.id}-hang_once"
            deadline = time.monotonic() + 10
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), "the handler never started"
            pruned = StringIO()
            call_command("events_prune", "--days", "1", stdout=pruned)  # waits for the run
        finally:
            running.join()

    assert outcomes == ["succeeded"]
    assert HandlerRun.objects.filter(handler="hang_once", event_id=paid.id).count() == 1
    # Then pruned, as its age says: the record and its finished delivery.
    assert pruned.getvalue().startswith("Deleted 1 event record(s) and 1 delivery(ies)")
    assert not EventRecord.objects.filter(pk=paid.id).exists()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "worker" in r.name]


@pytest.mark.postgresql  # SQLite's one write lock serializes these transactions anyway
@pytest.mark.django_db(transaction=True)  # two connections, each delivery its own transaction
def test_an_idempotent_delivery_does_not_wait_for_another_of_its_event_to_finish(
    queue: str, publish_now, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # RECORD "failures": the event has no record until a delivery writes it. One the first
    # delivery wrote inside its transaction would make the second wait for its handler.
    monkeypatch.setenv("DJANGO_EVENTS_FAULT_DIR", str(tmp_path))
    slow = {**ONCE, "name": "shop-slow", "handler": "tests.app.handlers.hang_once"}
    with shop_wiring(
        queue,
        MANIFESTS=[],
        EVENTS={"shop.paid": {"schema": {"type": "object"}}},
        SUBSCRIPTIONS=[{**slow, "idempotent": True}, {**ONCE, "idempotent": True}],
        RECORD="failures",
    ):
        paid = publish_now("shop.paid", {"order_id": 1, "hang": 5})
        assert not EventRecord.objects.filter(pk=paid.id).exists()
        messages = {m["subscription"]: m for m in drain(queue)}
        outcomes: list[str] = []

        def deliver_slowly() -> None:
            try:
                outcomes.append(process_message(messages["shop-slow"], 0).status)
            finally:
                connections.close_all()

        hanging = threading.Thread(target=deliver_slowly)
        hanging.start()
        try:
            marker = tmp_path / f"{paid.id}-hang_once"
            deadline = time.monotonic() + 10
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), "the slow handler never started"
            assert process_message(messages["shop-once"], 0).status == "succeeded"
            assert hanging.is_alive()  # done while the slow handler still runs
        finally:
            hanging.join()
    assert outcomes == ["succeeded"]
    statuses = Delivery.objects.filter(event_id=paid.id).values_list("status", flat=True)
    assert sorted(statuses) == ["succeeded", "succeeded"]


# crm.placed: stored at v1 ({"order_id", "total"}), declared now at v2 (total -> amount).
CRM_V1 = {"schema": {"type": "object", "required": ["order_id"]}}
CRM_V2 = {
    "version": 2,
    "upcast": {1: "tests.app.upcasters.split_total"},
    "schema": {"type": "object", "required": ["order_id", "amount", "currency"]},
}
CRM_V3 = {
    **CRM_V2,
    "version": 3,
    "upcast": {1: "tests.app.upcasters.split_total", 2: "tests.app.upcasters.add_channel"},
}
CRM_SECRET = "whsec_" + base64.b64encode(b"crm-secret-0123456789abcdefghij").decode()
CRM_HOOK = {
    "event": "crm.placed",
    "mode": "webhook",
    "name": "crm",
    "url": "https://hooks.example.com/crm",  # never reached: nothing is sent
    "secret": "CRM_WH_SECRET",
}
CRM_ASYNC = {"event": "crm.placed", "handler": RECORD, "mode": "async", "name": "crm-async"}
CRM_SYNC = {"event": "crm.placed", "handler": RECORD, "mode": "sync", "name": "crm-sync"}


@contextmanager
def failures_signalled() -> Iterator[list[tuple[str, str, int]]]:
    """(subscription, mode, attempts) of each `delivery_failed` sent meanwhile."""
    from django_events.signals import delivery_failed

    sent: list[tuple[str, str, int]] = []

    def receiver(sender: str, mode: str, attempts: int, **kwargs: Any) -> None:
        sent.append((sender, mode, attempts))

    delivery_failed.connect(receiver)
    try:
        yield sent
    finally:
        delivery_failed.disconnect(receiver)


@pytest.mark.django_db
def test_a_failing_upcaster_is_recorded_with_the_subscriptions_mode_and_no_run(
    queue: str, publish_now, settings: Any
) -> None:
    # A replay of a stored v1 event whose upcaster raises (no "total"): the handler never
    # ran, in any mode. The worker recorded mode "async" for the webhook, and 1 attempt
    # where a sync retry or replay records the runs as they were (0).
    settings.CRM_WH_SECRET = CRM_SECRET
    with shop_wiring(queue, EVENTS={"crm.placed": CRM_V1}):
        stored = publish_now("crm.placed", {"order_id": 11})
    subscriptions = [CRM_HOOK, CRM_ASYNC, CRM_SYNC]
    with (
        shop_wiring(queue, EVENTS={"crm.placed": CRM_V2}, SUBSCRIPTIONS=subscriptions),
        failures_signalled() as signalled,
    ):
        for name in ("crm", "crm-async", "crm-sync"):
            call_command("events_replay", name, "--since", "10m", stdout=StringIO())
        outcomes = [process_message(m, 0, manage_connections=False).status for m in drain(queue)]

    assert outcomes == ["failed", "failed"]
    rows = Delivery.objects.filter(event_id=stored.id).order_by("subscription")
    error = (
        "Upcaster v1 -> v2 of event 'crm.placed' (tests.app.upcasters.split_total) raised "
        "KeyError: 'total'"
    )
    assert [(r.subscription, r.mode, r.status, r.attempts, r.last_error) for r in rows] == [
        ("crm", "webhook", "failed", 0, error),
        ("crm-async", "async", "failed", 0, error),
        ("crm-sync", "sync", "failed", 0, error),
    ]
    assert sorted(signalled) == [
        ("crm", "webhook", 0),
        ("crm-async", "async", 0),
        ("crm-sync", "sync", 0),
    ]
    assert not HandlerRun.objects.filter(event_id=stored.id).exists()


MISSING = "tests.app.no_such_module.handle"
RAISES_ON_IMPORT = "tests.app.raises_on_import.handle"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "why"),
    [
        (MISSING, "No module named 'tests.app.no_such_module'"),
        # Not an ImportError: the worker's task raised it, with no row, and the relay sent
        # the message again and again; the sync path counted a run.
        (RAISES_ON_IMPORT, "RuntimeError: this module needs a setting the worker lacks"),
    ],
    ids=["missing", "raises-on-import"],
)
def test_a_handler_that_does_not_import_is_a_failure_with_no_run_in_every_mode(
    queue: str, publish_now, path: str, why: str
) -> None:
    # DESIGN: `Delivery.attempts` counts the handler's runs; a handler that does not import
    # never ran (as a failing upcaster's). Both modes recorded 1 attempt, so a retry once the
    # module is deployed had one run less than max_attempts.
    missing = [{**CRM_ASYNC, "handler": path}, {**CRM_SYNC, "handler": path}]
    with (
        shop_wiring(queue, EVENTS={"crm.placed": CRM_V1}, SUBSCRIPTIONS=missing),
        failures_signalled() as signalled,
    ):
        event = publish_now("crm.placed", {"order_id": 12})  # the sync one fails at commit
        [message] = drain(queue)
        assert process_message(message, 0, manage_connections=False).status == "failed"

    rows = Delivery.objects.filter(event_id=event.id).order_by("subscription")
    assert [(r.subscription, r.status, r.attempts) for r in rows] == [
        ("crm-async", "failed", 0),
        ("crm-sync", "failed", 0),
    ]
    expected = f"HandlerImportError: Handler {path!r} does not import: {why}"
    assert [r.last_error for r in rows] == [expected, expected]
    assert sorted(signalled) == [("crm-async", "async", 0), ("crm-sync", "sync", 0)]


@pytest.mark.django_db
@pytest.mark.parametrize("prior_attempts", [0, 2])
def test_a_subscription_not_declared_on_this_worker_records_the_runs_before_it(
    queue: str, publish_now, prior_attempts: int
) -> None:
    # A message (a first send, or the retry of a delivery that ran twice) reaching a worker of
    # a release that does not declare its subscription: nothing ran, so the runs stay as
    # they were (they were one more).
    from django_events.delivery.messages import build_message, event_body

    with shop_wiring(queue, EVENTS={"crm.placed": CRM_V1}), failures_signalled() as signalled:
        event = publish_now("crm.placed", {"order_id": 13})
        message = build_message(event_body(event), "crm-gone", "default", prior_attempts)
        assert process_message(message, 0, manage_connections=False).status == "failed"

    row = Delivery.objects.get(event_id=event.id, subscription="crm-gone")
    assert (row.status, row.attempts) == ("failed", prior_attempts)
    assert row.last_error == "Unknown subscription 'crm-gone': not declared on this worker"
    assert signalled == [("crm-gone", "async", prior_attempts)]


@pytest.mark.django_db(databases=["default", "other"])
def test_a_message_for_a_database_this_worker_lacks_waits_for_a_worker_that_has_it(
    queue: str, django_capture_on_commit_callbacks: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The publisher's DATABASES has an alias the worker's lacks (settings drift, or a worker
    # of another project on the queue). Its outcome belongs in that database, next to its
    # event: the worker ran the handler and recorded it on `default` instead, where the
    # event's log never saw it (the relay sent it again: a second run).
    from django_events import publish

    with shop_wiring(queue, SUBSCRIPTIONS=[ONCE]):
        with django_capture_on_commit_callbacks(using="other", execute=True):
            paid = publish("shop.paid", {"order_id": 1, "total": 10}, using="other")
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-once"]
        assert message["db"] == "other"
        runs = HandlerRun.objects.filter(event_id=paid.id)
        ran_at_commit = runs.count()  # the sync subscriptions of the shop wiring
        lacking = {"default": settings.DATABASES["default"]}
        with (
            pytest.warns(UserWarning, match="Overriding setting DATABASES"),
            override_settings(DATABASES=lacking),
            caplog.at_level(logging.ERROR, logger="django_events.worker"),
        ):
            outcome = process_message(message, 0, manage_connections=False)

        # Nothing ran, nothing was recorded anywhere; sent again, counting no attempt.
        assert outcome.status == "waiting"
        assert outcome.retry_in is not None and outcome.retry_in >= 1
        assert outcome.retry_with == {**message, "prior_attempts": -1}
        assert runs.count() == ran_at_commit
        for alias in ("default", "other"):
            rows = Delivery.objects.using(alias).filter(event_id=paid.id)
            assert not rows.filter(subscription="shop-once").exists()
        assert not EventRecord.objects.using("default").filter(pk=paid.id).exists()
        [logged] = [r.getMessage() for r in caplog.records if r.name == "django_events.worker"]
        assert logged.startswith(
            "Database 'other' is not in this worker's DATABASES ('default'): subscription "
            f"'shop-once', event shop.paid {paid.id} not run; sent again in "
        )
        assert logged.endswith(
            "to fix: give this worker the DATABASES of the publishers (with 'other'), or stop "
            f"it consuming queue {queue!r}"
        )

        # A worker that has the database runs it, as the first attempt.
        retried = process_message(outcome.retry_with, 1, manage_connections=False)
        assert retried.status == "succeeded"

    row = Delivery.objects.using("other").get(event_id=paid.id, subscription="shop-once")
    assert (row.status, row.attempts) == ("succeeded", 1)
    assert not Delivery.objects.using("default").filter(event_id=paid.id).exists()
    assert runs.count() == ran_at_commit + 1


@pytest.mark.django_db
def test_a_broadcast_copy_for_a_database_this_worker_lacks_is_not_sent_again(
    queue: str, publish_now, caplog: pytest.LogCaptureFixture
) -> None:
    # A retry of a broadcast copy would reach every worker again: the copy is dropped.
    from django_events.delivery.messages import build_message, event_body

    everywhere = {**ONCE, "name": "shop-everywhere", "broadcast": True}
    with shop_wiring(queue, SUBSCRIPTIONS=[everywhere]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        message = build_message(event_body(paid), "shop-everywhere", "reporting")
        runs = HandlerRun.objects.filter(event_id=paid.id)
        ran_at_commit = runs.count()  # the sync subscriptions of the shop wiring
        with caplog.at_level(logging.ERROR, logger="django_events.worker"):
            outcome = process_message(message, 0, manage_connections=False)

    assert (outcome.status, outcome.retry_in) == ("rejected", None)
    assert runs.count() == ran_at_commit
    assert not Delivery.objects.filter(event_id=paid.id, subscription="shop-everywhere")
    assert (
        "Database 'reporting' is not in this worker's DATABASES ('default', 'other'): the "
        "broadcast copy of subscription 'shop-everywhere', event shop.paid "
        f"{paid.id} was not run on this worker, and is not sent again"
    ) in caplog.text


# A broadcast copy's retry would go to the fanout exchange it came from: every worker would
# get another copy, and those that ran it would run it again. It is dropped instead.
EVERYWHERE = {**ONCE, "name": "shop-everywhere", "broadcast": True}


def broadcast_copy(event: Any, subscription: str = "shop-everywhere") -> dict[str, Any]:
    from django_events.delivery.messages import build_message, event_body

    return build_message(event_body(event), subscription, "default")


def dropped_line(caplog: pytest.LogCaptureFixture, subscription: str, event: Any) -> str:
    """The error the worker logged as it dropped the broadcast copy, without its reason."""
    prefix = (
        f"The broadcast copy of subscription {subscription!r}, event {event.name} {event.id} "
        f"is dropped on this worker ({socket.gethostname()} pid {os.getpid()}), not sent "
        "again (a retry would reach every worker): "
    )
    [line] = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.getMessage().startswith(prefix)
    ]
    return line.removeprefix(prefix)


@pytest.mark.django_db
def test_a_broadcast_copy_too_new_for_this_worker_is_recorded_failed_not_sent_again(
    queue: str, publish_now
) -> None:
    everywhere = {**CRM_ASYNC, "name": "crm-everywhere", "broadcast": True}
    with shop_wiring(queue, EVENTS={"crm.placed": CRM_V3}, SUBSCRIPTIONS=[everywhere]):
        newer = publish_now("crm.placed", {"order_id": 1, "amount": 3, "currency": "EUR"})
        message = broadcast_copy(newer, "crm-everywhere")
        # A worker of the new release ran its copy.
        assert process_message(message, 0, manage_connections=False).status == "succeeded"
    with (
        shop_wiring(queue, EVENTS={"crm.placed": CRM_V2}, SUBSCRIPTIONS=[everywhere]),
        failures_signalled() as signalled,
    ):
        outcome = process_message(message, 0, manage_connections=False)

    assert (outcome.status, outcome.retry_in) == ("failed", None)
    # As a copy whose handler failed: that worker's failure is not hidden by another's success.
    row = Delivery.objects.get(event_id=newer.id, subscription="crm-everywhere")
    assert (row.status, row.attempts) == ("failed", 0)
    assert row.last_error == (
        f"on {socket.gethostname()} pid {os.getpid()}: Not run on this worker: Event "
        "'crm.placed' is version 3; this process knows up to version 2. A broadcast copy is "
        "not sent again (it would reach every worker)"
    )
    assert signalled == [("crm-everywhere", "async", 0)]
    assert HandlerRun.objects.filter(event_id=newer.id).count() == 1


@pytest.mark.django_db(transaction=True)  # the refused write ends its transaction
@pytest.mark.parametrize(
    ("handler", "paused", "why"),
    [
        (
            RECORD,
            True,
            "its subscription is paused, and the held delivery could not be recorded",
        ),
        (
            "tests.app.handlers.always_fails",
            False,
            "its handler failed (on {worker}: RuntimeError: boom for 1) and the failure could "
            "not be recorded",
        ),
        (
            "tests.app.nowhere.handle",
            False,
            "its handler does not import (HandlerImportError: Handler "
            "'tests.app.nowhere.handle' does not import: No module named 'tests.app.nowhere'), "
            "and the failure could not be recorded",
        ),
    ],
    ids=["held", "failed", "unimportable"],
)
def test_a_broadcast_copy_whose_outcome_the_database_cannot_take_is_not_sent_again(
    queue: str,
    publish_now,
    caplog: pytest.LogCaptureFixture,
    handler: str,
    paused: bool,
    why: str,
) -> None:
    # Any other delivery waits for the database (a retry that counts no run); a broadcast
    # copy's retry would reach every worker, and this worker's ones again at each round.
    with shop_wiring(queue, SUBSCRIPTIONS=[{**EVERYWHERE, "handler": handler}]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        if paused:
            pause("shop-everywhere")
        try:
            with (
                refused_once("INSERT", Delivery._meta.db_table),
                caplog.at_level(logging.ERROR, logger="django_events.worker"),
            ):
                outcome = process_message(broadcast_copy(paid), 0, manage_connections=False)
        finally:
            if paused:  # this process caches what is paused
                resume("shop-everywhere")

    assert (outcome.status, outcome.retry_in, outcome.retry_with) == ("failed", None, None)
    worker = f"{socket.gethostname()} pid {os.getpid()}"
    assert dropped_line(caplog, "shop-everywhere", paid) == why.format(worker=worker)
    assert not Delivery.objects.filter(event_id=paid.id, subscription="shop-everywhere")


@pytest.mark.django_db
def test_a_webhook_waiting_for_a_newer_worker_keeps_its_mode(
    queue: str, publish_now, settings: Any
) -> None:
    settings.CRM_WH_SECRET = CRM_SECRET
    with shop_wiring(queue, EVENTS={"crm.placed": CRM_V3}, SUBSCRIPTIONS=[CRM_HOOK]):
        newer = publish_now("crm.placed", {"order_id": 1, "amount": 3, "currency": "EUR"})
        [message] = drain(queue)
    with shop_wiring(queue, EVENTS={"crm.placed": CRM_V2}, SUBSCRIPTIONS=[CRM_HOOK]):
        assert process_message(message, 0, manage_connections=False).status == "waiting"

    row = Delivery.objects.get(event_id=newer.id, subscription="crm")
    assert (row.mode, row.status, row.attempts) == ("webhook", "pending", 0)
    assert row.last_error == (
        "Waiting for a newer worker: Event 'crm.placed' is version 3; this process knows up to "
        "version 2"
    )
    # docs/evolving.md quotes it for its own event, word for word (it once had a tail more).
    docs = Path(__file__).resolve().parent.parent / "docs" / "evolving.md"
    quoted = row.last_error.replace("'crm.placed'", "'orders.order_placed'")
    assert f"`{quoted}`" in " ".join(docs.read_text().split())


@pytest.mark.django_db
def test_a_stored_payload_the_schema_now_refuses_is_a_failure_with_no_run(
    queue: str, publish_now
) -> None:
    # The schema tightened without a version bump: as a failing upcaster, nothing ran.
    with shop_wiring(queue, EVENTS={"crm.placed": CRM_V1}):
        stored = publish_now("crm.placed", {"order_id": 11})
    strict = {"schema": {"type": "object", "required": ["order_id", "total"]}}
    with shop_wiring(queue, EVENTS={"crm.placed": strict}, SUBSCRIPTIONS=[CRM_ASYNC, CRM_SYNC]):
        for name in ("crm-async", "crm-sync"):
            call_command("events_replay", name, "--since", "10m", stdout=StringIO())
        [message] = drain(queue)
        assert process_message(message, 0, manage_connections=False).status == "failed"

    rows = Delivery.objects.filter(event_id=stored.id).order_by("subscription")
    assert [(r.subscription, r.status, r.attempts) for r in rows] == [
        ("crm-async", "failed", 0),
        ("crm-sync", "failed", 0),
    ]
    assert all("'total' is a required property" in r.last_error for r in rows)
