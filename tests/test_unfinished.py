"""events_relay sends again the async deliveries whose message was lost (no outcome, long after
their event was dispatched): operations/unfinished.py, through the command and the relay."""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO
from typing import Any
from uuid import uuid4

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from django_events import publish
from django_events.delivery.lost_messages import QUEUE_ALLOWANCE, resend_after
from django_events.delivery.worker import process_message
from django_events.models import Delivery, EventRecord
from django_events.operations import unfinished
from django_events.operations.pausing import pause, resume
from django_events.operations.relay import relay_backlog
from tests.app.models import HandlerRun
from tests.ops import drain, shop_wiring

RECORD = "tests.app.handlers.record"
PLAIN = {"event": "shop.paid", "handler": RECORD, "mode": "async", "name": "shop-plain"}
ONCE = {**PLAIN, "name": "shop-once", "idempotent": True}
ORDERED = {**PLAIN, "name": "shop-ordered", "ordering_key": "order_id"}
HOUR = 3600.0


def relay(*args: str) -> str:
    out = StringIO()
    call_command("events_relay", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def lost(event: Any, queue: str, *, ago: float) -> None:
    """The event's messages never reached a worker, and it was dispatched ``ago`` s ago."""
    drain(queue)
    drain("big-orders")
    EventRecord.objects.filter(pk=event.id).update(
        status="dispatched", dispatched_at=timezone.now() - timedelta(seconds=ago)
    )


def messages(queue: str) -> list[tuple[str, str]]:
    return [(m["subscription"], m["event"]["id"]) for m in drain(queue)]


@pytest.fixture
def plain(queue: str) -> Any:
    with shop_wiring(queue, SUBSCRIPTIONS=[PLAIN, ONCE]):
        yield queue


@pytest.mark.django_db
def test_a_lost_delivery_is_sent_again_once_and_then_recorded(plain, publish_now) -> None:
    paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
    lost(paid, plain, ago=1.5 * HOUR)  # older than the default threshold (1 h on memory://)

    out = relay()

    assert "resent 3 delivery(ies) with no outcome" in out, out
    sent = drain(plain)
    assert sorted(m["subscription"] for m in sent) == ["shop-once", "shop-plain", "shop-receipt"]
    assert {m["event"]["id"] for m in sent} == {str(paid.id)}
    assert all(m["rerun"] and m["prior_attempts"] == 0 for m in sent)
    # Pending until a worker records the outcome: a second run sends nothing more.
    assert "resent" not in relay()
    assert drain(plain) == []
    # Should the resent message be lost too, it is due again one threshold later.
    due = Delivery.objects.filter(event_id=paid.id).exclude(retry_at=None)
    assert due.count() == 3
    assert min(d.retry_at for d in due) > timezone.now() + timedelta(minutes=59)
    for message in sent:
        process_message(message, 0, manage_connections=False)
    rows = Delivery.objects.filter(event_id=paid.id, mode="async")
    assert not rows.exclude(retry_at=None).exists()  # an outcome clears it
    assert sorted(rows.values_list("subscription", "status", "attempts")) == [
        ("shop-once", "succeeded", 1),
        ("shop-plain", "succeeded", 1),
        ("shop-receipt", "failed", 1),  # its handler fails a first run: an outcome too
    ]
    # shop-audit (sync, ran at publish), then shop-plain and shop-once once each.
    assert HandlerRun.objects.filter(event_id=paid.id, handler="record").count() == 3


@pytest.mark.django_db
def test_a_delivery_with_an_outcome_or_inside_the_threshold_is_not_resent(
    plain, publish_now
) -> None:
    done = publish_now("shop.paid", {"order_id": 1, "total": 10})
    for message in drain(plain):
        process_message(message, 0, manage_connections=False)
    lost(done, plain, ago=1.5 * HOUR)
    young = publish_now("shop.paid", {"order_id": 2, "total": 10})
    lost(young, plain, ago=0.5 * HOUR)

    assert "resent" not in relay()
    assert drain(plain) == []

    # Once it is old enough, the next pass sends it: the walk had not gone past it.
    EventRecord.objects.filter(pk=young.id).update(
        dispatched_at=timezone.now() - timedelta(hours=1.2)
    )
    assert "resent 3 delivery(ies)" in relay()
    assert {e for _, e in messages(plain)} == {str(young.id)}


@pytest.mark.django_db
def test_the_threshold_is_a_setting_and_an_option(plain, publish_now) -> None:
    paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
    lost(paid, plain, ago=120)

    assert "resent" not in relay()
    with override_settings(DJANGO_EVENTS={**_settings(), "RESEND_UNFINISHED_AFTER": 600}):
        assert "resent" not in relay()
    assert "resent 3" in relay("--resend-unfinished-after", "60")
    too_soon = "--resend-unfinished-after must be a positive number of seconds, got 0"
    with pytest.raises(CommandError, match=too_soon):
        relay("--resend-unfinished-after", "0")


def _settings() -> dict[str, Any]:
    from django.conf import settings

    return dict(settings.DJANGO_EVENTS)


def test_the_default_threshold_waits_out_the_brokers_visibility_timeout() -> None:
    from tests import brokers

    assert resend_after(brokers.amqp) == QUEUE_ALLOWANCE
    assert resend_after(brokers.redis) == QUEUE_ALLOWANCE + float(
        brokers.redis.conf.broker_transport_options.get("visibility_timeout", 3600)
    )


@pytest.mark.django_db
def test_filters_and_routing_apply_as_at_publish(queue, publish_now) -> None:
    small = publish_now("shop.paid", {"order_id": 1, "total": 10})
    big = publish_now("shop.paid", {"order_id": 2, "total": 5000})
    lost(small, queue, ago=1.5 * HOUR)
    lost(big, queue, ago=1.5 * HOUR)

    relay()

    # shop-big (queue big-orders, when total >= 1000) only for the big order.
    assert sorted(messages(queue)) == sorted(
        [("shop-receipt", str(small.id)), ("shop-receipt", str(big.id))]
    )
    assert messages("big-orders") == [("shop-big", str(big.id))]


@pytest.mark.django_db
def test_a_queue_holding_a_backlog_is_not_resent_until_it_drained(plain, publish_now) -> None:
    waiting = publish_now("shop.paid", {"order_id": 1, "total": 10})
    EventRecord.objects.filter(pk=waiting.id).update(
        dispatched_at=timezone.now() - timedelta(hours=1.5)
    )  # its messages are still in the queue: a backlog, not a loss

    assert "resent" not in relay()
    assert len(drain(plain)) == 3  # the original messages, nothing more

    assert "resent 3" in relay()  # drained without outcomes: lost


@pytest.mark.django_db
def test_held_paused_and_ordered_deliveries_are_left_to_their_mechanism(queue, publish_now) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[PLAIN, ORDERED]):
        pause("shop-plain")
        first = publish_now("shop.paid", {"order_id": 7, "total": 10})
        second = publish_now("shop.paid", {"order_id": 7, "total": 10})
        for message in drain(queue):
            if message["subscription"] == "shop-plain":
                # The paused subscription's delivery is held by the worker.
                assert process_message(message, 0, manage_connections=False).status == "held"
        # The ordered deliveries' messages are lost, but their rows (written at publish) were
        # touched inside the threshold: left to the gate for now (see the tests below).
        lost(first, queue, ago=1.5 * HOUR)
        lost(second, queue, ago=1.5 * HOUR)

        out = relay()

        assert "resent 2 delivery(ies)" in out, out  # shop-receipt only
        assert {s for s, _ in messages(queue)} == {"shop-receipt"}
        assert set(
            Delivery.objects.filter(subscription="shop-plain").values_list("status", flat=True)
        ) == {"held"}
        assert set(
            Delivery.objects.filter(subscription="shop-ordered").values_list("status", flat=True)
        ) == {"pending"}
        # Resuming sends the held ones, as ever.
        assert resume("shop-plain").sent == 2


@pytest.mark.django_db
def test_a_lost_pending_delivery_is_sent_again_but_never_a_broadcasts(
    queue, publish_now, django_capture_on_commit_callbacks
) -> None:
    # Rows a resume left pending, their messages lost. A broadcast's is never resent: a
    # copy would reach every worker, and no one copy's outcome stands for the others.
    broadcast = {**PLAIN, "name": "shop-bc", "broadcast": True}
    with shop_wiring(queue, SUBSCRIPTIONS=[PLAIN, broadcast]):
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        lost(paid, queue, ago=1.5 * HOUR)
        long_ago = timezone.now() - timedelta(seconds=1.5 * HOUR)
        for name in ("shop-plain", "shop-bc"):
            Delivery.objects.create(event_id=paid.id, subscription=name, mode="async")
        Delivery.objects.update(updated_at=long_ago)

        with django_capture_on_commit_callbacks(execute=True):  # sent once the pass commits
            out = relay()

    assert "resent 2 delivery(ies)" in out, out  # shop-plain, and shop-receipt (no row)
    assert sorted(s for s, _ in messages(queue)) == ["shop-plain", "shop-receipt"]
    rows = Delivery.objects.filter(event_id=paid.id)
    assert rows.get(subscription="shop-plain").updated_at > long_ago  # touched: sent once
    assert rows.get(subscription="shop-bc").updated_at == long_ago  # left alone


@pytest.mark.django_db
def test_events_recording_only_failures_are_not_checked(plain, publish_now) -> None:
    with shop_wiring(plain, SUBSCRIPTIONS=[PLAIN], RECORD="failures"):
        paid = publish("shop.paid", {"order_id": 1, "total": 10})
        EventRecord.objects.create(
            id=paid.id,
            name=paid.name,
            payload=paid.data,
            correlation_id=paid.correlation_id,
            status="dispatched",
        )
        lost(paid, plain, ago=1.5 * HOUR)

        assert "resent" not in relay()


@pytest.mark.django_db
def test_a_subscription_wired_after_the_event_is_not_sent_it(queue, publish_now) -> None:
    paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
    lost(paid, queue, ago=1.5 * HOUR)
    newer = publish_now("shop.paid", {"order_id": 2, "total": 10})
    lost(newer, queue, ago=0.5 * HOUR)
    assert "resent 1" in relay()  # shop-receipt, of the first event
    drain(queue)

    with shop_wiring(queue, SUBSCRIPTIONS=[PLAIN]):  # a new subscription is deployed
        relay()
        EventRecord.objects.filter(pk=newer.id).update(
            dispatched_at=timezone.now() - timedelta(hours=1.2)
        )
        out = relay()

    assert "resent 1" in out, out  # shop-receipt of the second; shop-plain was not wired then
    assert messages(queue) == [("shop-receipt", str(newer.id))]


@pytest.mark.django_db
def test_the_relay_function_reports_what_it_resent(plain, publish_now, caplog) -> None:
    paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
    lost(paid, plain, ago=1.5 * HOUR)

    with caplog.at_level("WARNING", logger="django_events.relay"):
        result = relay_backlog()

    assert (result.resent, result.checked) == (3, 2)  # checked once per queue
    [line] = [r.getMessage() for r in caplog.records if "Resent" in r.getMessage()]
    assert "Resent 3 async deliveries with no outcome recorded 3600s after" in line
    # No outcome is what is known: a lost message, or a success row a killed worker lost.
    assert "their message lost, or a worker killed before it wrote their outcome" in line
    assert "their message was lost" not in line
    assert "shop-once x1, shop-plain x1, shop-receipt x1" in line


@pytest.mark.django_db
def test_a_resent_message_lost_again_is_sent_once_more_when_due(plain, publish_now) -> None:
    paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
    lost(paid, plain, ago=1.5 * HOUR)
    assert "resent 3" in relay()
    drain(plain)  # lost again
    Delivery.objects.filter(event_id=paid.id).update(retry_at=timezone.now())

    assert "and 3 due delivery(ies) (retries, hand-ons)" in relay()
    assert sorted(s for s, _ in messages(plain)) == ["shop-once", "shop-plain", "shop-receipt"]


def ordered_and_lost(*events: Any, queue: str, ago: float) -> None:
    """The events' messages are lost; dispatched, and their ordered rows last touched, ``ago``
    seconds ago."""
    for event in events:
        lost(event, queue, ago=ago)
    Delivery.objects.filter(
        event_id__in=[e.id for e in events], subscription="shop-ordered"
    ).update(updated_at=timezone.now() - timedelta(seconds=ago))


def ordered_rows() -> list[tuple[str, int, str, int]]:
    rows = Delivery.objects.filter(subscription="shop-ordered").order_by("ordering_key", "sequence")
    return list(rows.values_list("ordering_key", "sequence", "status", "attempts"))


@pytest.mark.django_db
def test_a_lost_first_delivery_of_an_ordered_key_is_sent_again_then_its_key_follows(
    queue, publish_now, django_capture_on_commit_callbacks
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        first = publish_now("shop.paid", {"order_id": 7, "total": 10})
        second = publish_now("shop.paid", {"order_id": 7, "total": 11})
        other = publish_now("shop.paid", {"order_id": 8, "total": 12})
        ordered_and_lost(first, second, other, queue=queue, ago=1.5 * HOUR)

        with django_capture_on_commit_callbacks(execute=True):  # sent once the pass commits
            out = relay()

        # The first of each key (shop-receipt: no row, as before); the second waits its turn.
        assert "resent 5 delivery(ies)" in out, out
        sent = drain(queue)
        assert sorted((m["subscription"], m["event"]["id"]) for m in sent) == sorted(
            [("shop-ordered", str(first.id)), ("shop-ordered", str(other.id))]
            + [("shop-receipt", str(e.id)) for e in (first, second, other)]
        )
        assert all(m["rerun"] for m in sent)
        # Touched now: a second pass does not send them again.
        with django_capture_on_commit_callbacks(execute=True):
            assert "resent" not in relay()
        assert drain(queue) == []
        assert not Delivery.objects.filter(subscription="shop-ordered").exclude(retry_at=None)

        for message in sent:
            if message["subscription"] == "shop-ordered":
                process_message(message, 0, manage_connections=False)
        assert ordered_rows() == [
            ("7", 1, "succeeded", 1),
            ("7", 2, "pending", 0),
            ("8", 1, "succeeded", 1),
        ]

        # The second is the key's first unfinished one now, its message lost as well.
        with django_capture_on_commit_callbacks(execute=True):
            assert "resent 1 delivery(ies)" in relay()
        [message] = drain(queue)
        assert (message["subscription"], message["event"]["id"]) == ("shop-ordered", str(second.id))
        process_message(message, 0, manage_connections=False)
    assert ordered_rows() == [
        ("7", 1, "succeeded", 1),
        ("7", 2, "succeeded", 1),
        ("8", 1, "succeeded", 1),
    ]


@pytest.mark.django_db
def test_ordered_deliveries_a_worker_has_or_will_get_are_not_sent_again(
    queue, publish_now, django_capture_on_commit_callbacks
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        failed = publish_now("shop.paid", {"order_id": 1, "total": 10})
        behind = publish_now("shop.paid", {"order_id": 1, "total": 10})
        young = publish_now("shop.paid", {"order_id": 2, "total": 10})
        due = publish_now("shop.paid", {"order_id": 3, "total": 10})
        ordered_and_lost(failed, behind, due, queue=queue, ago=1.5 * HOUR)
        lost(young, queue, ago=1.5 * HOUR)  # its row touched inside the threshold
        # A failed first holds its key (the gate's business); a due time is a retry's.
        Delivery.objects.filter(event_id=failed.id, subscription="shop-ordered").update(
            status="failed"
        )
        Delivery.objects.filter(event_id=due.id, subscription="shop-ordered").update(
            retry_at=timezone.now() + timedelta(minutes=5)
        )

        with django_capture_on_commit_callbacks(execute=True):
            assert "resent 4 delivery(ies)" in relay()  # shop-receipt's only

        assert {s for s, _ in messages(queue)} == {"shop-receipt"}

        gone = publish_now("shop.paid", {"order_id": 4, "total": 10})
        ordered_and_lost(gone, queue=queue, ago=1.5 * HOUR)
        publish_now("shop.paid", {"order_id": 5, "total": 10})  # its messages wait: a backlog
        with django_capture_on_commit_callbacks(execute=True):
            assert "resent" not in relay()
        drain(queue)
        with django_capture_on_commit_callbacks(execute=True):
            assert "resent 2 delivery(ies)" in relay()  # the queue drained
        assert sorted(messages(queue)) == [
            ("shop-ordered", str(gone.id)),
            ("shop-receipt", str(gone.id)),
        ]


@pytest.mark.django_db
def test_the_relay_reads_an_ordered_keys_backlog_once_a_key(queue) -> None:
    """After an outage an ordered key has thousands of pending deliveries, untouched (their
    messages wait, or were lost): the pass finds each key's first unfinished delivery as the
    gate does, through the index of unfinished deliveries, once a key. Checking each pending
    row against those before it cost a pass one index probe a row on PostgreSQL, and on
    SQLite, which cannot use that index for a bound parameter, a walk through the key's
    finished history a row (docs/performance-log.md)."""
    keys, history, backlog = 3, 20, 200
    long_ago = timezone.now() - timedelta(seconds=1.5 * HOUR)
    with shop_wiring(queue, SUBSCRIPTIONS=[ORDERED]):
        records, rows = [], []
        for key in range(keys):
            for number in range(1, history + backlog + 1):
                records.append(
                    EventRecord(
                        id=uuid4(),
                        name="shop.paid",
                        payload={"order_id": key, "total": number},
                        occurred_at=long_ago,
                        correlation_id=uuid4(),
                        status="dispatched",
                        dispatched_at=long_ago,
                    )
                )
                status = "succeeded" if number <= history else "pending"
                rows.append(
                    Delivery(
                        event_id=records[-1].pk,
                        subscription="shop-ordered",
                        mode="async",
                        status=status,
                        ordering_key=str(key),
                        sequence=number,
                    )
                )
        EventRecord.objects.bulk_create(records)
        Delivery.objects.bulk_create(rows)
        Delivery.objects.update(updated_at=long_ago)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        drain(queue)
        statements: list[tuple[str, Any]] = []

        def keep(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            statements.append((sql, params))
            return execute(sql, params, many, context)

        with connection.execute_wrapper(keep):
            result = unfinished.resend_unfinished(older_than=HOUR)

        assert result.resent["shop-ordered"] == keys  # each key's first, once
        heads = Delivery.objects.filter(sequence=history + 1)
        assert set(heads.values_list("retry_at", flat=True)) != {None}  # claimed
        plans = [
            explain(sql, params)
            for sql, params in statements
            if sql.startswith("SELECT") and "ordering_key" in sql
        ]
        reads = 0
        for plan in plans:
            if connection.vendor == "postgresql":
                # Each read of the deliveries runs once a key, not once a row.
                loops = re.findall(r"on django_events_delivery\b.*loops=(\d+)", plan)
                assert all(int(n) <= keys for n in loops), plan
            else:
                loops = [line for line in plan.splitlines() if "ordering_key=?" in line]
                assert all("dlv_turn_idx" in line for line in loops), plan
            reads += len(loops)
        assert reads


def explain(sql: str, params: Any) -> str:
    """The plan of a statement as it ran, with its parameters bound (PostgreSQL: run again)."""
    prefix = "EXPLAIN (ANALYZE, COSTS OFF) " if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute((prefix or "EXPLAIN QUERY PLAN ") + sql, params)
        return "\n".join(str(row[0] if prefix else row[-1]) for row in cursor.fetchall())


def worker_finishes_during_the_broker_check(monkeypatch: Any, held: list[dict[str, Any]]) -> None:
    """A worker that held ``held`` (prefetched: not in the queue's count) runs them while the
    relay asks the broker for that count, between the relay's read and its resend."""
    real = unfinished.waiting_messages

    def waiting_messages(queue: str) -> int | None:
        while held:
            process_message(held.pop(0), 0, manage_connections=False)
        return real(queue)

    monkeypatch.setattr(unfinished, "waiting_messages", waiting_messages)


@pytest.mark.django_db
def test_a_lost_head_a_worker_finishes_during_the_pass_is_left_alone(
    queue, publish_now, django_capture_on_commit_callbacks, monkeypatch, caplog
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[{**ORDERED, "idempotent": True}]):
        head = publish_now("shop.paid", {"order_id": 7, "total": 10})
        taken = drain(queue)  # a worker prefetched them: the queue is empty
        for message in taken:
            if message["subscription"] != "shop-ordered":
                process_message(message, 0, manage_connections=False)
        ordered_and_lost(head, queue=queue, ago=1.5 * HOUR)
        held = [m for m in taken if m["subscription"] == "shop-ordered"]
        worker_finishes_during_the_broker_check(monkeypatch, held)

        with (
            caplog.at_level("INFO", logger="django_events.relay"),
            django_capture_on_commit_callbacks(execute=True),
        ):
            out = relay()

        assert held == []  # the worker ran it after the relay read the head
        assert "1 delivery(ies) taken for lost not sent again" in caplog.text
        assert "resent" not in out, out
        assert drain(queue) == []  # nothing sent
        assert ordered_rows() == [("7", 1, "succeeded", 1)]
        assert not Delivery.objects.filter(subscription="shop-ordered").exclude(retry_at=None)
        # shop-audit (sync, ran at publish), then shop-ordered once.
        assert HandlerRun.objects.filter(event_id=head.id, handler="record").count() == 2


@pytest.mark.django_db
def test_a_delivery_a_worker_records_during_the_pass_is_left_alone(
    plain, publish_now, monkeypatch, caplog
) -> None:
    paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
    held = drain(plain)  # a worker prefetched them: the queue is empty
    lost(paid, plain, ago=1.5 * HOUR)
    worker_finishes_during_the_broker_check(monkeypatch, held)

    with caplog.at_level("INFO", logger="django_events.relay"):
        out = relay()

    assert held == []  # the worker ran them after the relay read their rows (none)
    assert caplog.text.count("delivery(ies) taken for lost not sent again") == 3
    assert "resent" not in out, out
    assert drain(plain) == []  # nothing sent
    rows = Delivery.objects.filter(event_id=paid.id, mode="async")
    assert not rows.exclude(retry_at=None).exists()
    assert sorted(rows.values_list("subscription", "status", "attempts")) == [
        ("shop-once", "succeeded", 1),
        ("shop-plain", "succeeded", 1),
        ("shop-receipt", "failed", 1),
    ]


# -- webhooks: manifest `mode: webhook` subscriptions and run-time endpoints -----------------

HOOK = {
    "event": "shop.paid",
    "mode": "webhook",
    "name": "shop-hook",
    "url": "https://hooks.example.com/in",
    "secret": "SHOP_HOOK_SECRET",
}


def endpoint_since(ago: float, **fields: Any) -> Any:
    """A webhook endpoint for shop.* that was created (and last changed) ``ago`` s ago."""
    from django_events.delivery import endpoints
    from django_events.models import WebhookEndpoint

    endpoint, _ = endpoints.create_endpoint("https://crm.example.com/in", ["shop.*"], **fields)
    then = timezone.now() - timedelta(seconds=ago)
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(created_at=then, updated_at=then)
    return endpoints.subscription_name(endpoint.pk)


@pytest.mark.django_db
def test_a_lost_webhook_delivery_is_sent_again_manifest_and_endpoint(queue, publish_now) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[HOOK]):
        hook = endpoint_since(2 * HOUR)
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        lost(paid, queue, ago=1.5 * HOUR)

        out = relay()

        assert "resent 3 delivery(ies) with no outcome" in out, out
        assert sorted(messages(queue)) == sorted(
            (name, str(paid.id)) for name in ("shop-hook", hook, "shop-receipt")
        )
        rows = Delivery.objects.filter(event_id=paid.id, subscription__in=["shop-hook", hook])
        assert set(rows.values_list("status", "mode")) == {("pending", "webhook")}
        assert "resent" not in relay()  # pending until a worker records the outcome


@pytest.mark.django_db
def test_an_endpoints_own_queue_is_walked_too(queue, publish_now) -> None:
    hooks_queue = f"{queue}-hooks"
    with shop_wiring(queue, WEBHOOK_ENDPOINTS={"queue": hooks_queue}):
        hook = endpoint_since(2 * HOUR)
        paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
        drain(hooks_queue)
        lost(paid, queue, ago=1.5 * HOUR)

        assert "resent 2 delivery(ies)" in relay()

        assert messages(hooks_queue) == [(hook, str(paid.id))]
        assert messages(queue) == [("shop-receipt", str(paid.id))]


@pytest.mark.django_db
def test_an_endpoint_added_enabled_or_changed_after_the_event_is_not_sent_it(
    queue, publish_now
) -> None:
    from django_events.delivery import endpoints
    from django_events.models import WebhookEndpoint

    paid = publish_now("shop.paid", {"order_id": 1, "total": 10})
    lost(paid, queue, ago=1.5 * HOUR)
    # One added after the event was dispatched; one changed (created, enabled again, edited:
    # its `updated_at`) 3 s before it, which publishers may have seen only `refresh` (5 s)
    # later; and a disabled one.
    later = endpoint_since(HOUR)
    changed = endpoint_since(1.5 * HOUR + 3)
    off = endpoint_since(2 * HOUR, enabled=False)

    assert "resent 1 delivery(ies)" in relay()  # shop-receipt alone

    assert messages(queue) == [("shop-receipt", str(paid.id))]
    assert not Delivery.objects.filter(subscription__in=[later, changed, off]).exists()
    assert endpoints.for_event("shop.paid")  # the enabled ones do receive new events
    assert WebhookEndpoint.objects.count() == 3


def _stored_on(alias: str, *, status: str, ago: float) -> EventRecord:
    """A ``shop.paid`` record on ``alias`` (occurred and, unless pending, dispatched ``ago``
    s ago) without a delivery row: its async deliveries have no outcome."""
    import uuid

    at = timezone.now() - timedelta(seconds=ago)
    return EventRecord.objects.using(alias).create(
        id=uuid.uuid4(),
        name="shop.paid",
        payload={"order_id": 1, "total": 10},
        correlation_id=uuid.uuid4(),
        occurred_at=at,
        status=status,
        dispatched_at=None if status == "pending" else at,
    )


@pytest.mark.django_db(databases=["default", "other"])
def test_resend_unfinished_uses_the_routers_database_by_default(queue) -> None:
    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]):
        paid = _stored_on("other", status="dispatched", ago=1.5 * HOUR)

        assert unfinished.resend_unfinished().total == 1

    assert messages(queue) == [("shop-receipt", str(paid.id))]
    assert Delivery.objects.using("other").get().status == "pending"


@pytest.mark.django_db(databases=["default", "other"])
def test_the_relay_of_another_database_resends_to_the_endpoints_it_sends_to(queue) -> None:
    """An event log on a database of its own (``publish(using=...)``, ``--database``): the
    relay sends its pending records to the endpoints publishers and workers read (the
    routers', here ``default``), and its lost-message check looks for those same endpoints'
    deliveries (it read the endpoints of the relayed database: none, nothing resent)."""
    hook = endpoint_since(2 * HOUR)
    dispatched = _stored_on("other", status="dispatched", ago=1.5 * HOUR)

    assert "resent 2 delivery(ies)" in relay("--database", "other")
    assert sorted(messages(queue)) == sorted(
        [(hook, str(dispatched.pk)), ("shop-receipt", str(dispatched.pk))]
    )

    pending = _stored_on("other", status="pending", ago=60)
    assert "Relayed 1 event(s)" in relay("--database", "other")
    assert sorted(messages(queue)) == sorted(
        [(hook, str(pending.pk)), ("shop-receipt", str(pending.pk))]
    )
    assert not Delivery.objects.using("default").exists()
