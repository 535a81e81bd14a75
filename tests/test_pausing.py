"""Pausing and resuming subscriptions in-process: sync deliveries, events_eager, the commands,
events_list and the wiring page's buttons (permissions). The worker side is in
test_failure_control_delivery.py."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_events import publish
from django_events.delivery import marking
from django_events.delivery.worker import process_message
from django_events.models import Delivery, EventRecord, PausedSubscription
from django_events.operations.pausing import (
    ORPHAN_AFTER,
    deliver_orphaned_held,
    held,
    pause,
    resume,
)
from django_events.operations.retrying import mark_resolved, retry_failures
from django_events.signals import delivery_failed
from django_events.testing import events_eager
from tests.app.models import HandlerRun
from tests.conftest import wiring
from tests.ops import drain
from tests.test_admin import user_client

pytestmark = pytest.mark.django_db(transaction=True)

RECORD = "tests.app.handlers.record"
WIRING = reverse("admin:django_events_wiring")
PAUSE = reverse("admin:django_events_wiring_pause")


def sub(name: str, mode: str, handler: str = RECORD) -> dict[str, Any]:
    return {"event": "orders.placed", "handler": handler, "mode": mode, "name": name}


def order(n: int) -> dict[str, Any]:
    return {"order_id": n, "total": 1.0}


def test_a_paused_sync_subscription_holds_then_runs_in_event_order_on_resume() -> None:
    with wiring(sub("s", "sync"), sub("other", "sync", "tests.app.handlers.record_other")):
        assert pause("s") is True
        assert pause("s") is False  # already paused
        ids = [publish("orders.placed", order(n)).id for n in range(5)]
        assert HandlerRun.objects.filter(handler="record").count() == 0
        assert HandlerRun.objects.filter(handler="record_other").count() == 5  # not paused
        assert [d.event_id for d in held("s")] == ids
        assert set(held("s").values_list("mode", "attempts")) == {("sync", 0)}

        result = resume("s")

        assert (result.succeeded, result.failed) == (5, 0)
        runs = HandlerRun.objects.filter(handler="record").order_by("pk")
        assert [r.event_id for r in runs] == ids
        assert set(Delivery.objects.filter(subscription="s").values_list("status", "attempts")) == {
            ("succeeded", 1)
        }
        assert not held("s").exists()
        publish("orders.placed", order(9))
        assert HandlerRun.objects.filter(handler="record").count() == 6


def test_a_resume_stopped_midway_leaves_the_deliveries_after_it_held() -> None:
    with wiring(sub("s", "sync", "tests.app.handlers.stops_on_note")):
        pause("s")
        notes = ["go on", "stop", "go on"]
        ids = [
            publish("orders.placed", {**order(n), "note": note}).id for n, note in enumerate(notes)
        ]
        with pytest.raises(SystemExit):
            resume("s")  # the process "dies" in the second handler

        statuses = dict(Delivery.objects.filter(subscription="s").values_list("event_id", "status"))
        # The one a dead process was running says so; the one after it is still held.
        assert [statuses[i] for i in ids] == ["succeeded", "running", "held"]
        result = resume("s")  # not paused any more: it runs what is still held

    assert (result.succeeded, result.failed) == (1, 0)
    assert Delivery.objects.get(event_id=ids[2], subscription="s").status == "succeeded"


@pytest.mark.postgresql  # row locks: SQLite has none
def test_resume_claims_held_rows_whose_events_another_transaction_is_updating() -> None:
    # The background marker or a relay updates event rows while a resume runs; only another
    # resume's lock on the held rows themselves may make it leave them (it skips locked rows).
    with wiring(sub("s", "sync")):
        pause("s")
        ids = [publish("orders.placed", order(n)).id for n in range(2)]
        updating, release = threading.Event(), threading.Event()

        def update_the_events() -> None:
            try:
                with transaction.atomic():
                    EventRecord.objects.filter(pk__in=ids).update(status=F("status"))
                    updating.set()
                    release.wait(30)
            finally:
                connection.close()

        thread = threading.Thread(target=update_the_events)
        thread.start()
        try:
            assert updating.wait(30)
            result = resume("s")
        finally:
            release.set()
            thread.join()

        assert (result.sent, result.succeeded, result.failed) == (0, 2, 0)
        assert not held("s").exists()
        assert HandlerRun.objects.filter(handler="record").count() == 2


def test_a_sync_delivery_held_by_a_stale_read_of_the_pauses_runs_once_resumed() -> None:
    """A publisher reads the pauses at most CACHE_SECONDS old: another process's resume in
    between has read the held rows before this one is written, and nothing would run it."""
    with wiring(sub("s", "sync")):
        pause("s")
        publish("orders.placed", order(1))  # this process now holds "s" paused in its cache
        PausedSubscription.objects.filter(subscription="s").delete()  # resumed elsewhere
        late = publish("orders.placed", order(2))

        assert Delivery.objects.get(event_id=late.id).status == "succeeded"
        assert [r.event_id for r in HandlerRun.objects.all()] == [late.id]
        assert resume("s").succeeded == 1  # the first one, held while paused: run once
        assert HandlerRun.objects.count() == 2 and not held("s").exists()


def test_a_held_sync_delivery_the_publisher_cannot_take_back_stays_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database refuses the claim (held -> running): logged, nothing raised into the code
    that committed, the handler not run; the relay's pass for such rows delivers it later."""
    table = Delivery._meta.db_table

    def refuse_claim(execute, sql, params, many, context):
        claiming = sql.startswith(f'UPDATE "{table}"') and params and params[0] == "running"
        if claiming and "held" in params:
            raise OperationalError("connection lost")
        return execute(sql, params, many, context)

    with wiring(sub("s", "sync")):
        pause("s")
        publish("orders.placed", order(1))  # this process now holds "s" paused in its cache
        PausedSubscription.objects.filter(subscription="s").delete()  # resumed elsewhere
        with connection.execute_wrapper(refuse_claim):
            late = publish("orders.placed", order(2))

    assert Delivery.objects.get(event_id=late.id).status == "held"
    assert not HandlerRun.objects.exists()
    assert "Could not run the held sync deliveries" in caplog.text


def test_retrying_or_replaying_a_paused_sync_subscription_holds_instead_of_running() -> None:
    """Its handler stops running while paused (docs/commands.md), whoever delivers again."""
    with wiring(sub("s", "sync", "tests.app.handlers.fails_first_time_sync")):
        event = publish("orders.placed", order(1))
        assert Delivery.objects.get(event_id=event.id).status == "failed"
        pause("s")
        for command in (
            ("events_retry", "--subscription", "s"),
            ("events_replay", "s", "--since", "1h"),
        ):
            out = io.StringIO()
            call_command(*command, stdout=out)
            assert "1 held (the subscription is paused: events_resume runs them)" in out.getvalue()
            assert "0 ran and succeeded; 0 ran and failed" in out.getvalue()
            row = Delivery.objects.get(event_id=event.id)
            assert (row.status, row.attempts) == ("held", 1)
        assert HandlerRun.objects.count() == 1  # the first run only

        assert resume("s").succeeded == 1
    assert HandlerRun.objects.count() == 2


def test_held_deliveries_a_resume_records_failed_send_delivery_failed_once_each() -> None:
    """DESIGN 3.18: the signal is sent once when a delivery ends failed, whoever ends it."""
    sent: list[tuple[str, str]] = []

    def note(sender: Any, **kwargs: Any) -> None:
        sent.append((kwargs["subscription"], kwargs["error"]))

    delivery_failed.connect(note)
    try:
        with wiring(sub("a", "async"), sub("gone", "sync")), events_eager():
            pause("a")
            pause("gone")
            publish("orders.placed", order(1))
        with wiring(sub("a", "async"), CELERY_APP="tests.brokers.unreachable"):
            assert resume("a").unsent == 1  # the broker is down: recorded failed
            resume("gone")  # no longer declared: recorded failed
    finally:
        delivery_failed.disconnect(note)
    assert sorted(sent) == [
        ("a", "Not sent again: the broker was unreachable; retry later."),
        (
            "gone",
            "Not run: subscription 'gone' is no longer declared. Retry it once it is declared "
            "again, or mark it resolved.",
        ),
    ]
    assert set(Delivery.objects.values_list("status", flat=True)) == {"failed"}


def test_the_relay_delivers_held_rows_a_resume_could_not_see() -> None:
    """A row held by a process that read the pauses before a resume committed (a resume in
    an admin request's transaction) is still held once the pause is gone; the relay runs it
    a minute later. Rows of a subscription still paused, or held just now, wait."""
    with wiring(sub("s", "sync"), sub("p", "sync", "tests.app.handlers.record_other")):
        pause("s")
        pause("p")
        orphan, young = (publish("orders.placed", order(n)).id for n in (1, 2))
        PausedSubscription.objects.filter(subscription="s").delete()  # that resume committed
        Delivery.objects.filter(event_id=orphan).update(
            updated_at=timezone.now() - timedelta(seconds=ORPHAN_AFTER + 1)
        )
        Delivery.objects.filter(event_id=orphan, subscription="p").update(
            updated_at=timezone.now() - timedelta(seconds=ORPHAN_AFTER + 1)
        )

        call_command("events_relay", "--min-age", "0", stdout=io.StringIO())

        statuses = set(Delivery.objects.values_list("event_id", "subscription", "status"))
        assert statuses == {
            (orphan, "s", "succeeded"),
            (young, "s", "held"),  # its writer may still take it back itself
            (orphan, "p", "held"),  # still paused
            (young, "p", "held"),
        }
        assert [r.event_id for r in HandlerRun.objects.all()] == [orphan]


def test_the_relay_leaves_an_ordered_keys_held_deliveries_to_their_turn() -> None:
    """Held behind a failed delivery of their key, not by a pause: nothing to deliver."""
    ordered = {**sub("o", "async"), "ordering_key": "order_id"}
    with wiring(ordered, CELERY_APP="tests.brokers.unreachable"):
        first, second = (publish("orders.placed", order(1)).id for _ in range(2))
        rows = Delivery.objects.filter(subscription="o")
        rows.filter(event_id=first).update(status="failed")
        rows.filter(event_id=second).update(status="held")
        rows.update(updated_at=timezone.now() - timedelta(seconds=ORPHAN_AFTER + 1))

        assert deliver_orphaned_held().sent == 0
        assert rows.get(event_id=second).status == "held"


@pytest.mark.postgresql  # the plans PostgreSQL chooses once it has statistics
def test_the_relay_reads_a_blocked_keys_held_deliveries_once_a_pass() -> None:
    """A key blocked behind a failed delivery holds every later one of it, for as long as
    the failure waits for a retry or a resolve: each relay pass must not compare each of
    them with every one before it (a pass took 90 s at 50,000, growing as their square)."""
    count = 2000
    long_ago = timezone.now() - timedelta(seconds=ORPHAN_AFTER + 1)
    with wiring({**sub("o", "async"), "ordering_key": "order_id"}):
        records = EventRecord.objects.bulk_create(
            EventRecord(
                id=uuid4(),
                name="orders.placed",
                payload=order(1),
                occurred_at=long_ago,
                correlation_id=uuid4(),
                status="dispatched",
            )
            for _ in range(count)
        )
        Delivery.objects.bulk_create(
            Delivery(
                event_id=record.pk,
                subscription="o",
                mode="async",
                status="failed" if number == 1 else "held",
                ordering_key="1",
                sequence=number,
            )
            for number, record in enumerate(records, start=1)
        )
        Delivery.objects.update(updated_at=long_ago)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE django_events_delivery")

        with CaptureQueriesContext(connection) as queries:
            assert deliver_orphaned_held().sent == 0

        for query in queries.captured_queries:
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) " + query["sql"])
                plan = "\n".join(row[0] for row in cursor.fetchall())
            removed = re.findall(r"Rows Removed by \w+(?: \w+)?: (\d+)", plan)
            assert all(int(n) <= count for n in removed), plan
    assert Delivery.objects.filter(status="held").count() == count - 1


def ordered_on(queue: str) -> dict[str, Any]:
    """An ordered async subscription "o" whose messages go to ``queue`` (in-memory broker)."""
    return {**sub("o", "async"), "ordering_key": "order_id", "queue": queue}


def deliver_waiting(queue: str) -> list[tuple[UUID, str]]:
    """Run the messages waiting on ``queue`` as a worker would: (event id, outcome) each."""
    return [(UUID(m["event"]["id"]), process_message(m, 0).status) for m in drain(queue)]


def hand_on_a_minute_later(queue: str) -> list[tuple[UUID, str]]:
    """Relay passes a minute on (two: what the first sent, the second does not send again);
    what the messages they sent came to."""
    marking.flush()  # the events are marked dispatched: the relay does not send them again
    Delivery.objects.update(updated_at=timezone.now() - timedelta(seconds=ORPHAN_AFTER + 1))
    for _ in range(2):
        call_command("events_relay", "--min-age", "0", stdout=io.StringIO())
    return deliver_waiting(queue)


def test_the_relay_hands_on_an_ordered_key_whose_first_delivery_a_resume_could_not_see() -> None:
    """Held by a pause a resume could not see (see above), a key's first unfinished delivery
    has nothing before it to finish and hand it on, and the key's later deliveries wait
    behind it: the relay hands it on a minute later, as the gate would, then the key goes on
    in its order, each delivery once."""
    queue = f"held-{uuid4().hex[:8]}"
    with wiring(ordered_on(queue)):
        pause("o")
        first, second = (publish("orders.placed", order(1)).id for _ in range(2))
        other = publish("orders.placed", order(2)).id  # another key
        messages = {UUID(m["event"]["id"]): m for m in drain(queue)}
        assert process_message(messages.pop(first), 0).status == "held"
        assert process_message(messages.pop(other), 0).status == "held"
        PausedSubscription.objects.filter(subscription="o").delete()  # that resume committed
        # Whether this worker reads the pause (a cached read) or not: its key's turn holds it.
        assert process_message(messages.pop(second), 0).status == "held"

        # Each key's first delivery, not the one behind it.
        assert hand_on_a_minute_later(queue) == [(first, "succeeded"), (other, "succeeded")]
        assert deliver_waiting(queue) == [(second, "succeeded")]  # handed on by the first
        assert hand_on_a_minute_later(queue) == []  # nothing twice

    runs = HandlerRun.objects.order_by("pk").values_list("event_id", flat=True)
    assert list(runs) == [first, other, second]
    assert set(Delivery.objects.values_list("status", flat=True)) == {"succeeded"}


def test_the_relay_delivers_the_rows_the_gate_held_once_ordering_key_is_removed() -> None:
    """Held behind a failed delivery of their key, then the subscription loses its
    ordering_key (a deploy): no gate hands them on any more, so the relay delivers them as
    any held rows, oldest event first."""
    queue = f"held-{uuid4().hex[:8]}"
    with wiring(ordered_on(queue)):
        first, second, third = (publish("orders.placed", order(1)).id for _ in range(3))
        messages = {UUID(m["event"]["id"]): m for m in drain(queue)}
        assert process_message(messages.pop(second), 0).status == "held"  # behind the first
        assert process_message(messages.pop(third), 0).status == "held"
        Delivery.objects.filter(event_id=first).update(status="failed")  # its retry to come
    unordered = {k: v for k, v in ordered_on(queue).items() if k != "ordering_key"}
    with wiring(unordered):
        assert hand_on_a_minute_later(queue) == [(second, "succeeded"), (third, "succeeded")]
    runs = HandlerRun.objects.order_by("pk").values_list("event_id", flat=True)
    assert list(runs) == [second, third]


@pytest.mark.postgresql  # SQLite: the worker's write waits for the resume's commit
def test_an_ordered_delivery_held_while_a_resume_was_uncommitted_is_handed_on() -> None:
    """A resume inside a transaction (the admin's, under ATOMIC_REQUESTS) lists the held rows;
    a worker still reads the pause until it commits, and holds the key's first delivery."""
    queue = f"held-{uuid4().hex[:8]}"
    with wiring(ordered_on(queue)):
        pause("o")
        event = publish("orders.placed", order(1)).id
        [message] = drain(queue)
        listed, commit = threading.Event(), threading.Event()

        def resume_in_a_request() -> None:
            try:
                with transaction.atomic():
                    resume("o")
                    listed.set()
                    commit.wait(30)
            finally:
                connection.close()

        thread = threading.Thread(target=resume_in_a_request)
        thread.start()
        try:
            assert listed.wait(30)
            assert process_message(message, 0).status == "held"
        finally:
            commit.set()
            thread.join()
        assert not PausedSubscription.objects.exists()
        assert list(held("o").values_list("event_id", flat=True)) == [event]

        assert hand_on_a_minute_later(queue) == [(event, "succeeded")]
    assert list(HandlerRun.objects.values_list("event_id", flat=True)) == [event]


def test_a_paused_async_subscription_is_held_under_events_eager() -> None:
    with wiring(sub("a", "async")), events_eager():
        pause("a")
        event = publish("orders.placed", order(1))
        assert HandlerRun.objects.count() == 0
        assert list(held("a").values_list("event_id", "mode", "attempts")) == [
            (event.id, "async", 0)
        ]


def test_commands_refuse_unknown_and_inline_subscriptions() -> None:
    with wiring(sub("i", "inline")):
        with pytest.raises(CommandError, match="Unknown subscription 'nope'"):
            call_command("events_pause", "nope")
        with pytest.raises(CommandError, match="Subscription 'i' is inline"):
            call_command("events_pause", "i")
        with pytest.raises(CommandError, match="Unknown subscription 'nope'"):
            call_command("events_resume", "nope")
        for command in ("events_pause", "events_resume"):
            with pytest.raises(CommandError, match="invalid choice: 'nope'"):
                call_command(command, "i", "--database", "nope")
    assert not PausedSubscription.objects.exists()


def test_events_resume_says_when_the_subscription_was_not_paused() -> None:
    with wiring(sub("s", "sync")):
        out = io.StringIO()
        call_command("events_pause", "s", stdout=out)
        call_command("events_resume", "s", stdout=out)
        call_command("events_resume", "s", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("Resumed 's'. Held deliveries: 0 re-enqueued")
    assert lines[2].startswith("'s' was not paused. Held deliveries: 0 re-enqueued")


def test_the_wiring_page_says_what_events_pause_and_events_resume_say() -> None:
    """Pausing one paused already, resuming one not paused: said so, not "Paused"/"Resumed"."""
    with wiring(sub("s", "sync")):
        operator = user_client("view_eventrecord", "change_failure")

        def said(action: str) -> str:
            answer = operator.post(PAUSE, {"name": "s", "action": action}, follow=True)
            return answer.content.decode()

        assert "Paused &#x27;s&#x27;." in said("pause")
        assert "&#x27;s&#x27; was already paused." in said("pause")
        assert "Resumed &#x27;s&#x27;. Held deliveries: 0 re-enqueued" in said("resume")
        not_paused = said("resume")
    assert "&#x27;s&#x27; was not paused. Held deliveries: 0 re-enqueued" in not_paused
    assert "Resumed" not in not_paused


def test_events_resume_says_held_sync_deliveries_ran_not_that_they_ran_again() -> None:
    """Held sync deliveries never ran before; one whose handler does not import does not run
    now either: counted apart, not as a run that failed."""
    missing = sub("m", "sync", "tests.app.no_such_module.handle")
    with wiring(sub("s", "sync"), missing):
        pause("s")
        pause("m")
        publish("orders.placed", order(1))
        out = io.StringIO()
        call_command("events_resume", "s", stdout=out)
        call_command("events_resume", "m", stdout=out)
    assert out.getvalue().splitlines() == [
        "Resumed 's'. Held deliveries: 0 re-enqueued for a worker; 1 ran and succeeded; "
        "0 ran and failed.",
        "Resumed 'm'. Held deliveries: 0 re-enqueued for a worker; 0 ran and succeeded; "
        "0 ran and failed; 1 not run (recorded failed with the reason).",
    ]
    missed = Delivery.objects.get(subscription="m")
    assert (missed.status, missed.attempts) == ("failed", 0)
    assert "no_such_module" in missed.last_error


def test_events_list_shows_paused_and_held() -> None:
    with wiring(sub("s", "sync")):
        call_command("events_pause", "s", stdout=io.StringIO())
        publish("orders.placed", order(1))
        out = io.StringIO()
        call_command("events_list", "--format", "json", "--state", stdout=out)
        data = json.loads(out.getvalue())
        assert (data["paused"], data["held"]) == ({"s": 1}, {"s": 1})
        out = io.StringIO()
        call_command("events_list", "--state", stdout=out)
        assert "s: paused, 1 held" in out.getvalue()
        out = io.StringIO()
        call_command("events_list", "--held", stdout=out)
        assert out.getvalue().splitlines() == [
            "s: 1 held, paused (events_resume s sends them)",
            "1 held delivery(ies)",
        ]
        out = io.StringIO()
        call_command("events_list", stdout=out)
        assert "held" not in out.getvalue()  # the wiring alone needs no database


def test_events_list_state_says_active_for_a_subscription_never_paused() -> None:
    """Held rows behind a failure of their key, no pause: the line said "resumed", as if an
    operator had paused and resumed it; the admin's wiring page says "active"."""
    ordered = {**sub("o", "async"), "ordering_key": "order_id"}
    with wiring(ordered, CELERY_APP="tests.brokers.unreachable"):
        first, *later = (publish("orders.placed", order(1)).id for _ in range(4))
        Delivery.objects.filter(event_id=first).update(status="failed", attempts=1)
        Delivery.objects.filter(event_id__in=later).update(status="held")
        out = io.StringIO()
        call_command("events_list", "--state", "--no-endpoints", stdout=out)

    assert out.getvalue().splitlines()[-1] == "  o: active, 3 held"
    assert "resumed" not in out.getvalue()


def test_events_list_held_names_the_failure_a_paused_keys_deliveries_wait_behind() -> None:
    """Paused, and the key's first delivery failed: the line said "paused (events_resume o
    sends them)", but after a resume the worker holds them again behind the failure, in
    order: what releases them is a retry or resolve of that failure."""
    ordered = {**sub("o", "async"), "ordering_key": "order_id"}
    with wiring(ordered, CELERY_APP="tests.brokers.unreachable"):
        pause("o")
        first, *later = (publish("orders.placed", order(1)).id for _ in range(7))
        Delivery.objects.filter(event_id=first).update(
            status="failed", attempts=1, last_error="RuntimeError: declined\nTraceback"
        )
        Delivery.objects.filter(event_id__in=later).update(status="held")
        alone = publish("orders.placed", order(2)).id  # a key the pause alone holds
        Delivery.objects.filter(event_id=alone).update(status="held")
        listed = io.StringIO()
        call_command("events_list", "--held", stdout=listed)

    failure = (
        f"behind {first} (failed, 1 attempt(s)): RuntimeError: declined; retry it "
        "(events_retry) or mark it resolved (the admin) to send them"
    )
    assert listed.getvalue().splitlines() == [
        f"o [1]: 6 held, {failure}; paused too (events_resume o does not send them before it)",
        "o [2]: 1 held, paused (events_resume o sends them)",
        "7 held delivery(ies)",
    ]


def test_events_list_held_names_no_head_for_a_subscription_without_keys() -> None:
    """Held deliveries of an unordered subscription wait for nothing ahead of them: the pause,
    or events_relay once resumed. The JSON named a "head" all the same (the first unfinished
    delivery of the subscription: a failure of another event, or one of the held ones), and
    the text, once resumed, said they waited behind that failure."""
    with wiring(sub("u", "sync")):
        failed = publish("orders.placed", order(1)).id
        Delivery.objects.filter(event_id=failed).update(
            status="failed", attempts=1, last_error="RuntimeError: declined"
        )
        pause("u")
        publish("orders.placed", order(2))
        publish("orders.placed", order(3))
        listed, as_json = io.StringIO(), io.StringIO()
        call_command("events_list", "--held", stdout=listed)
        call_command("events_list", "--held", "--format", "json", stdout=as_json)
        PausedSubscription.objects.all().delete()  # resumed, its held rows not yet handed on
        resumed, resumed_json = io.StringIO(), io.StringIO()
        call_command("events_list", "--held", stdout=resumed)
        call_command("events_list", "--held", "--format", "json", stdout=resumed_json)

    assert listed.getvalue().splitlines() == [
        "u: 2 held, paused (events_resume u sends them)",
        "2 held delivery(ies)",
    ]
    assert json.loads(as_json.getvalue()) == [
        {"subscription": "u", "ordering_key": None, "held": 2, "head": None, "paused": True}
    ]
    assert resumed.getvalue().splitlines() == [
        "u: 2 held, behind nothing (events_relay hands it on)",
        "2 held delivery(ies)",
    ]
    assert json.loads(resumed_json.getvalue()) == [
        {"subscription": "u", "ordering_key": None, "held": 2, "head": None, "paused": False}
    ]


def test_resuming_a_subscription_no_longer_declared_records_its_held_rows_failed() -> None:
    # Held, nothing could ever run them, resolve them or prune their events.
    with wiring(sub("gone", "sync")):
        pause("gone")
        events = [publish("orders.placed", order(n)) for n in (1, 2)]
    rows = Delivery.objects.filter(subscription="gone")
    with wiring(sub("s", "sync")):
        result = resume("gone")
        assert result.skipped == ["2 held deliveries recorded failed: 'gone' is no longer declared"]
        assert not held("gone").exists()
        assert not PausedSubscription.objects.exists()
        assert set(rows.values_list("status", "attempts", "last_error")) == {
            (
                "failed",
                0,
                "Not run: subscription 'gone' is no longer declared. Retry it once it is "
                "declared again, or mark it resolved.",
            )
        }
        assert mark_resolved(rows.filter(event_id=events[0].id)) == 1
    with wiring(sub("gone", "sync")):  # declared again: a retry runs the other
        assert retry_failures(rows.filter(event_id=events[1].id)).succeeded == 1
    assert list(HandlerRun.objects.values_list("event_id", flat=True)) == [events[1].id]


def test_wiring_page_pauses_and_resumes_with_the_change_permission() -> None:
    with wiring(sub("s", "sync"), sub("i", "inline", "tests.app.handlers.record_other")):
        operator = user_client("view_eventrecord", "change_failure")
        page = operator.get(WIRING).content.decode()
        assert page.count('name="action" value="pause"') == 1  # not for the inline one
        response = operator.post(PAUSE, {"name": "s", "action": "pause"}, follow=True)
        assert "Paused &#x27;s&#x27;." in response.content.decode()
        publish("orders.placed", order(1))
        page = operator.get(WIRING).content.decode()
        assert 'de-badge de-held">paused' in page
        assert "1 held" in page
        assert 'value="resume"' in page

        response = operator.post(PAUSE, {"name": "s", "action": "resume"}, follow=True)
        assert "Resumed &#x27;s&#x27;. Held deliveries: 0 re-enqueued" in response.content.decode()
        assert "1 ran and succeeded" in response.content.decode()
        assert HandlerRun.objects.filter(handler="record").count() == 1

        response = operator.post(PAUSE, {"name": "i", "action": "pause"}, follow=True)
        assert "Subscription &#x27;i&#x27; is inline" in response.content.decode()


def test_wiring_page_refusing_a_pause_tells_the_user_and_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A name that cannot be paused is the user's mistake, not the server's fault."""
    with wiring(sub("s", "sync"), sub("i", "inline", "tests.app.handlers.record_other")):
        operator = user_client("view_eventrecord", "change_failure")
        with caplog.at_level(logging.DEBUG, logger="django_events"):
            unknown = operator.post(PAUSE, {"name": "nope", "action": "pause"}, follow=True)
            inline = operator.post(PAUSE, {"name": "i", "action": "pause"}, follow=True)
            resumed = operator.post(PAUSE, {"name": "nope", "action": "resume"}, follow=True)
    assert "Unknown subscription &#x27;nope&#x27;" in unknown.content.decode()
    assert "Subscription &#x27;i&#x27; is inline" in inline.content.decode()
    assert "Unknown subscription &#x27;nope&#x27;" in resumed.content.decode()
    ours = [r for r in caplog.records if r.name.startswith("django_events")]
    assert [(r.levelno, r.exc_info) for r in ours] == [(logging.INFO, None)] * 3
    assert not PausedSubscription.objects.exists()


def test_pausing_needs_the_change_permission() -> None:
    with wiring(sub("s", "sync")):
        viewer = user_client("view_eventrecord", "view_failure")
        page = viewer.get(WIRING).content.decode()
        assert 'value="pause"' not in page
        assert viewer.post(PAUSE, {"name": "s", "action": "pause"}).status_code == 403
        operator = user_client("view_eventrecord", "change_failure")
        assert operator.get(PAUSE).status_code == 403  # POST only
        assert operator.post(PAUSE, {"name": "s", "action": "explode"}).status_code == 403
    assert not PausedSubscription.objects.exists()
