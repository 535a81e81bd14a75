"""Operator commands: events_list, events_retry, events_replay, events_prune."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from datetime import datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, ManagementUtility, call_command
from django.db import OperationalError, connection, connections, transaction
from django.utils import timezone

from django_events import publish
from django_events.delivery import marking
from django_events.delivery.batching import recorder
from django_events.delivery.lost_messages import resend_after
from django_events.delivery.recording import delivery, save_deliveries
from django_events.delivery.worker import process_message
from django_events.models import Delivery, EventRecord, IdempotencyKey, PausedSubscription
from django_events.operations.redelivery import NOT_SENT
from django_events.signals import delivery_failed
from tests.app.models import HandlerRun
from tests.conftest import wiring
from tests.ops import drain, shop_wiring, work
from tests.test_registry import typed_events  # noqa: F401 - a fixture

RECORD = "tests.app.handlers.record"


def run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def fails(command: str, *args: str) -> str:
    with pytest.raises(CommandError) as caught:
        run(command, *args)
    return str(caught.value)


# -- events_list -----------------------------------------------------------------------------


@pytest.mark.django_db  # the webhook endpoints are listed too
def test_events_list_table(queue) -> None:
    table = run("events_list")
    lines = table.splitlines()
    assert lines[0].split() == [
        "EVENT",
        "SUBSCRIPTION",
        "MODE",
        "VIA",
        "QUEUE",
        "FILTER",
        "RETRY",
        "FLAGS",
        "ORIGIN",
    ]
    big = next(line for line in lines if "shop-big" in line)
    assert big.split()[:6] == [
        "shop.paid",
        "shop-big",
        "async",
        "celery",
        "big-orders",
        '{"total":{"gte":1000}}',
    ]
    assert "idempotent" in big and re.search(r"admin\.yaml:\d+$", big)
    assert any(line.startswith("orders.placed") and " - " in line for line in lines)
    assert re.search(r"^\d+ event\(s\), \d+ subscription link\(s\)$", lines[-1])


def test_events_list_shows_the_schema_a_payload_is_checked_against() -> None:
    with wiring(EVENTS={"x.plain": {}}):  # no schema: any object, as configuration.md says
        data = json.loads(run("events_list", "--format", "json", "--no-endpoints"))
    [plain] = [e for e in data["events"] if e["name"] == "x.plain"]
    assert plain["schema"] == {"type": "object"}


@pytest.mark.django_db  # the webhook endpoints are listed too
def test_events_list_json_is_the_registry(queue) -> None:
    data = json.loads(run("events_list", "--format", "json"))
    events = {e["name"]: e for e in data["events"]}
    paid = events["shop.paid"]
    assert paid["redact"] == ["email", "card.number"]
    assert paid["schema"]["required"] == ["order_id"]
    subs = {s["name"]: s for s in paid["subscriptions"]}
    assert set(subs) == {"shop-audit", "shop-big", "shop-ledger", "shop-receipt"}
    assert subs["shop-receipt"]["retry"]["max_attempts"] == 1
    assert subs["shop-receipt"]["queue"] == queue
    assert subs["shop-audit"]["queue"] is None and subs["shop-audit"]["event"] == "shop.*"
    assert data["problems"] == 0


@pytest.mark.django_db  # the webhook endpoints are listed too
def test_events_list_mermaid(queue) -> None:
    chart = run("events_list", "--format", "mermaid").splitlines()
    assert chart[0] == "flowchart LR"
    assert any(re.fullmatch(r'  e\d+\(\["shop\.paid"\]\)', line) for line in chart)
    assert any('shop-big<br/>async via celery · big-orders"]' in line for line in chart)
    assert any(
        re.fullmatch(r'  e\d+ -->\|"\{#quot;total#quot;:\{#quot;gte#quot;:1000\}\}"\| s\d+', line)
        for line in chart
    )


def test_events_list_mermaid_says_what_runs_each_subscription() -> None:
    """The table's VIA column, in the chart too: a celery worker or a db_worker runs it."""
    handled = {"event": "orders.placed", "handler": RECORD}
    subscriptions = [
        {**handled, "name": "by-celery", "mode": "async", "queue": "billing"},
        {**handled, "name": "by-tasks", "mode": "async", "queue": "mails", "via": "tasks"},
        {**handled, "name": "here", "mode": "sync"},
    ]
    with wiring(*subscriptions):
        chart = run("events_list", "--format", "mermaid", "--no-endpoints").splitlines()

    boxes = {line.split("[", 1)[1] for line in chart if re.match(r"  s\d+\[", line)}
    assert boxes == {
        '"by-celery<br/>async via celery · billing"]',
        '"by-tasks<br/>async via tasks · mails"]',
        '"here<br/>sync"]',
    }


def test_events_list_refuses_state_in_mermaid_as_a_usage_error() -> None:
    """The chart has no place for paused subscriptions: --state used to be ignored there
    without a word. As manage.py runs it: exit 2, the usage on stderr, nothing listed."""
    out, err = StringIO(), StringIO()
    argv = ["manage.py", "events_list", "--format", "mermaid", "--state", "--no-endpoints"]
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exited:
        ManagementUtility(argv).execute()

    assert exited.value.code == 2
    assert out.getvalue() == ""
    assert err.getvalue().startswith("usage: manage.py events_list")
    assert err.getvalue().endswith(
        "error: --state lists paused subscriptions in the table and JSON formats, "
        "not in --format mermaid\n"
    )
    with pytest.raises(CommandError, match="^Error: --state lists paused subscriptions"):
        run("events_list", "--format", "mermaid", "--state")


@pytest.mark.django_db  # what --held used to read before it printed
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["--held", "--format", "mermaid"],
            "--held lists held deliveries in the table and JSON formats, not in --format mermaid",
        ),
        *(
            (
                ["--held", "--state", *fmt],
                "--held lists held deliveries instead of the wiring, and --state adds paused "
                "subscriptions to the wiring: use one of them",
            )
            for fmt in ([], ["--format", "json"])
        ),
    ],
)
def test_events_list_refuses_held_with_what_it_does_not_list_as_a_usage_error(
    args: list[str], error: str
) -> None:
    """--held printed its plain text for --format mermaid and ignored --state."""
    out, err = StringIO(), StringIO()
    argv = ["manage.py", "events_list", *args]
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exited:
        ManagementUtility(argv).execute()

    assert exited.value.code == 2
    assert out.getvalue() == ""
    assert err.getvalue().startswith("usage: manage.py events_list")
    assert err.getvalue().endswith(f"error: {error}\n")


@pytest.mark.django_db  # the webhook endpoints are listed too
def test_events_list_mermaid_keeps_names_inside_their_labels(queue) -> None:
    evil = {
        "name": 'x"]\n  click s0 href "javascript:alert(1)"\n  `md`',
        "event": "shop.refunded",
        "handler": "tests.app.handlers.record",
        "queue": "q\r\nq",
        "mode": "async",
    }
    with shop_wiring(queue, SUBSCRIPTIONS=[evil]):
        chart = run("events_list", "--format", "mermaid").splitlines()
    assert not any(line.lstrip().startswith("click") for line in chart)
    assert all(re.fullmatch(r"flowchart LR|  (e|s)\d+.*", line) for line in chart), chart
    [node] = [line for line in chart if "javascript" in line]
    assert "#quot;" in node and "`" not in node


@pytest.mark.django_db  # the webhook endpoints are listed too (on main since endpoints2)
@pytest.mark.usefixtures("typed_events")
def test_events_list_says_where_each_declaration_comes_from(tmp_path) -> None:
    manifest = tmp_path / "events.yaml"  # outside the working directory: shown whole
    manifest.write_text(
        "version: 1\n"
        "events:\n"
        "  crm.synced: {}\n"
        "subscriptions:\n"
        "  - {name: crm-hook, event: crm.synced, mode: webhook, url: CRM_WEBHOOK_URL,\n"
        "     secret: CRM_SECRET}\n"
        "  - {name: crm-literal, event: crm.synced, mode: webhook, secret: CRM_SECRET,\n"
        "     url: 'https://crm.example/hooks/in?token=s3cret'}\n"
    )
    from_settings = {"event": "billing.invoiced", "handler": RECORD, "name": "from-settings"}

    with wiring(from_settings, MANIFESTS=[manifest], EVENTS={"billing.invoiced": {}}):
        data = json.loads(run("events_list", "--format", "json"))

    events = {e["name"]: e for e in data["events"]}
    assert events["crm.synced"]["origin"] == f"{manifest}:3"
    assert events["typed.order_placed"]["origin"] == "@event tests.app.typed_events.OrderPlaced"
    assert events["billing.invoiced"]["origin"] == (
        "settings.DJANGO_EVENTS['EVENTS']['billing.invoiced']"
    )
    [settings_sub] = events["billing.invoiced"]["subscriptions"]
    assert settings_sub["origin"] == "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]"
    hooks = {s["name"]: s for s in events["crm.synced"]["subscriptions"]}
    assert hooks["crm-hook"]["handler"] == "webhook -> CRM_WEBHOOK_URL"
    assert hooks["crm-literal"]["handler"] == "webhook -> https://crm.example/"  # no token
    assert "s3cret" not in json.dumps(data)


@pytest.mark.django_db  # the webhook endpoints are listed too (on main since endpoints2)
def test_events_list_table_flags_and_a_broken_wiring() -> None:
    subscriptions = [
        {"name": "slow", "event": "orders.placed", "handler": RECORD, "mode": "async"}
        | {"timeout": 2.5, "give_up_after": 600},
        {"name": "in-order", "event": "orders.placed", "handler": RECORD, "mode": "async"}
        | {"ordering_key": "order_id"},
        {"name": "stray", "event": "nothing.*", "handler": RECORD},  # matches no event
        {"name": "lost", "event": "orders.nope", "handler": RECORD},  # undeclared: E105
    ]
    with wiring(*subscriptions):
        # As manage.py runs it, system checks first unless the command opts out of them
        # (call_command() never runs them).
        out = StringIO()
        with redirect_stdout(out):
            ManagementUtility(["manage.py", "events_list"]).execute()
        table = out.getvalue().splitlines()
        chart = run("events_list", "--format", "mermaid").splitlines()

    [slow] = [line for line in table if " slow " in line]
    assert "timeout=2.5s,give_up_after=600s" in slow
    [ordered] = [line for line in table if " in-order " in line]
    assert "ordered by order_id" in ordered
    [stray] = [line for line in table if " stray " in line]
    assert stray.startswith("(no event)")
    assert not any(" lost " in line for line in table)  # left out: events_check names it
    assert table[-1] == (
        "3 event(s), 2 subscription link(s); 1 configuration error(s): run events_check"
    )
    assert '  s2["stray<br/>sync"]' in chart  # a box, no arrow reaches it
    assert not any(line.endswith(" s2") for line in chart)


def test_events_list_rejects_an_unknown_format() -> None:
    assert "invalid choice: 'yaml'" in fails("events_list", "--format", "yaml")


# -- events_retry ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "Say which failures to retry"),
        (("--subscription", "nope"), "Unknown subscription 'nope'"),
        (("--event", "nope.nope"), "Unknown event 'nope.nope'"),
        (("--since", "yesterday"), "--since: 'yesterday' is not an ISO date"),
        (("--until", "2026-13-01"), "--until: '2026-13-01' is not a valid date"),
        (("--since", "99999999999d"), "--since: '99999999999d' reaches back before the year 1"),
        (("--since", "1d", "--until", "2d"), "--since ("),
        (("--all", "--database", "nope"), "invalid choice: 'nope'"),
    ],
)
def test_events_retry_bad_arguments(queue, args, message) -> None:
    assert message in fails("events_retry", *args)


@pytest.mark.django_db
def test_events_retry_by_subscription_reruns_sync_handlers(publish_now) -> None:
    event = publish_now("shop.paid", {"order_id": 1})
    other = publish_now("shop.refunded", {"order_id": 2})
    save_deliveries("default", [delivery(other.id, "shop-audit", "sync", "failed", 1, "Boom")])

    out = run("events_retry", "--subscription", "shop-ledger")

    assert "0 re-enqueued for a worker; 1 ran and succeeded; 0 ran and failed." in out
    ledger = Delivery.objects.get(event_id=event.id, subscription="shop-ledger")
    assert (ledger.status, ledger.attempts) == ("succeeded", 2)
    audit = Delivery.objects.get(event_id=other.id, subscription="shop-audit")
    assert (audit.status, audit.attempts) == ("failed", 1)  # not selected


@pytest.mark.django_db
def test_events_retry_by_event_and_time_range(publish_now) -> None:
    old = publish_now("shop.paid", {"order_id": 1})
    new = publish_now("shop.paid", {"order_id": 2})
    Delivery.objects.filter(event_id=old.id).update(updated_at=timezone.now() - timedelta(days=3))

    assert "1 ran and succeeded" in run("events_retry", "--event", "shop.paid", "--since", "1d")
    assert Delivery.objects.get(event_id=new.id, subscription="shop-ledger").status == "succeeded"
    assert Delivery.objects.get(event_id=old.id, subscription="shop-ledger").status == "failed"
    assert "1 ran and succeeded" in run("events_retry", "--until", "2d")
    assert Delivery.objects.get(event_id=old.id, subscription="shop-ledger").status == "succeeded"
    assert "0 ran and succeeded" in run("events_retry", "--all")  # nothing left


@pytest.mark.django_db
@pytest.mark.parametrize("since", ["2026-01-05", "2026-1-5", "2026-01-05T00:00"])
def test_events_retry_since_a_day_starts_at_its_midnight(publish_now, since) -> None:
    before = publish_now("shop.paid", {"order_id": 1})
    after = publish_now("shop.paid", {"order_id": 2})
    for event, moment in ((before, (1, 4, 23)), (after, (1, 5, 0))):
        month, day, hour = moment
        Delivery.objects.filter(event_id=event.id).update(
            updated_at=timezone.make_aware(datetime(2026, month, day, hour, 30))
        )

    assert "1 ran and succeeded" in run("events_retry", "--since", since)
    assert Delivery.objects.get(event_id=after.id, subscription="shop-ledger").status == "succeeded"
    assert Delivery.objects.get(event_id=before.id, subscription="shop-ledger").status == "failed"


@pytest.mark.django_db
def test_events_retry_skips_failures_their_subscription_no_longer_takes(publish_now) -> None:
    first = publish_now("shop.refunded", {"order_id": 1})
    second = publish_now("shop.refunded", {"order_id": 2})
    save_deliveries(
        "default",
        [  # shop-ledger now takes shop.paid only; "gone" is declared no more
            delivery(first.id, "shop-ledger", "sync", "failed", 1, "Boom"),
            delivery(first.id, "gone", "sync", "failed", 1, "Boom"),
            delivery(second.id, "gone", "sync", "failed", 1, "Boom"),
        ],
    )
    out, err = StringIO(), StringIO()

    with pytest.raises(CommandError) as caught:  # nothing retried: exit status 1
        call_command("events_retry", "--all", stdout=out, stderr=err)

    assert str(caught.value) == (
        "No failed delivery was retried: 3 were skipped, for the reasons above."
    )
    assert out.getvalue() == (
        "Retried failed deliveries: 0 re-enqueued for a worker; 0 ran and succeeded; "
        "0 ran and failed; 3 skipped.\n"
    )
    assert sorted(err.getvalue().splitlines()) == sorted(
        [
            f"Skipped shop-ledger <- {first.id}: event 'shop.refunded' no longer reaches this "
            "subscription",
            f"Skipped gone <- {first.id}: the subscription is no longer declared",
            f"Skipped gone <- {second.id}: the subscription is no longer declared",
        ]
    )
    skipped = Delivery.objects.filter(subscription__in=["gone", "shop-ledger"])
    assert set(skipped.values_list("status", "attempts")) == {("failed", 1)}
    # With one to retry besides, the command succeeds and says what it skipped.
    save_deliveries("default", [delivery(first.id, "shop-audit", "sync", "failed", 1, "Boom")])
    assert "1 ran and succeeded; 0 ran and failed; 3 skipped." in run("events_retry", "--all")


@pytest.mark.django_db(transaction=True)
def test_events_retry_all_reenqueues_async_with_prior_attempts(queue) -> None:
    event = publish("shop.paid", {"order_id": 3})
    work(queue)  # the worker's first run fails (max_attempts: 1)
    save_deliveries("default", [delivery(event.id, "shop-receipt", "async", "failed", 4, "Boom")])

    out = run("events_retry", "--all")

    assert "1 re-enqueued for a worker; 1 ran and succeeded" in out  # + shop-ledger
    [message] = drain(queue)
    assert (message["subscription"], message["prior_attempts"]) == ("shop-receipt", 4)
    assert message["event"]["id"] == str(event.id)


@pytest.mark.django_db(transaction=True)
def test_events_retry_waits_for_a_worker_writing_meanwhile(queue) -> None:
    """Another process takes the write lock just after the retry read its failures: the
    retry waits for it, on SQLite too (check W209's transaction_mode, in tests/settings.py);
    before, SQLite refused the retry's first write at once ("database is locked")."""
    event = publish("shop.paid", {"order_id": 3})
    work(queue)
    save_deliveries("default", [delivery(event.id, "shop-receipt", "async", "failed", 1, "Boom")])
    table = Delivery._meta.db_table
    locked, worker_errors = threading.Event(), []

    def worker_writes() -> None:  # a worker's write transaction, held a moment
        try:
            with transaction.atomic():
                HandlerRun.objects.create(handler="worker", event_id=uuid.uuid4(), event_name="x")
                locked.set()
                time.sleep(0.5)
        except Exception as exc:  # reported by the assertion below
            worker_errors.append(exc)
        finally:
            locked.set()
            connections.close_all()

    worker = threading.Thread(target=worker_writes)

    def worker_writes_after_the_read(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if sql.startswith("SELECT") and f'FROM "{table}"' in sql and not worker.ident:
            worker.start()
            locked.wait(timeout=1)  # where the mode takes the lock at BEGIN, it waits for us
        return result

    with connection.execute_wrapper(worker_writes_after_the_read):
        out = run("events_retry", "--subscription", "shop-receipt")
    worker.join()

    assert "1 re-enqueued for a worker" in out
    assert worker_errors == []
    assert HandlerRun.objects.filter(handler="worker").count() == 1
    [message] = drain(queue)
    assert (message["subscription"], message["prior_attempts"]) == ("shop-receipt", 1)


@pytest.mark.django_db
def test_events_retry_reports_an_unreachable_broker(publish_now, caplog) -> None:
    event = publish_now("shop.paid", {"order_id": 5})
    save_deliveries("default", [delivery(event.id, "shop-receipt", "async", "failed", 1, "Boom")])
    with shop_wiring(CELERY_APP="tests.brokers.unreachable"):
        message = fails("events_retry", "--subscription", "shop-receipt")
    assert "The broker did not take every delivery" in message
    row = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
    assert (row.status, row.attempts, row.last_error) == ("failed", 1, "Boom")
    # The log says so too: the delivery stays failed, not "pending for events_relay".
    [logged] = [r.getMessage() for r in caplog.records if "Broker unreachable" in r.getMessage()]
    assert logged.startswith("Broker unreachable; 1 delivery(ies) not sent again: ")


@pytest.mark.django_db
def test_a_retry_or_replay_dying_while_sending_leaves_the_delivery_failed(
    publish_now,
) -> None:
    event = publish_now("shop.paid", {"order_id": 5})
    save_deliveries("default", [delivery(event.id, "shop-receipt", "async", "failed", 1, "Boom")])

    for command in (
        ["events_retry", "--subscription", "shop-receipt"],
        ["events_replay", "shop-receipt"],
    ):
        with (
            shop_wiring(CELERY_APP="tests.ops.dies_while_sending"),
            pytest.raises(SystemExit),
        ):
            run(*command)

        row = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
        assert (row.status, row.attempts) == ("failed", 1), command  # still a failure


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "command",
    [["events_retry", "--subscription", "shop-receipt"], ["events_replay", "shop-receipt"]],
)
def test_a_delivery_sent_again_whose_message_is_lost_is_sent_once_more_by_the_relay(
    queue, command
) -> None:
    event = publish("shop.paid", {"order_id": 6})
    marking.flush()  # the event marked dispatched: the relay below has no outbox work
    work(queue)  # shop-receipt's first run fails for good (max_attempts: 1)
    assert "1 re-enqueued for a worker" in run(*command)
    row = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
    assert (row.status, row.retry_at) == ("pending", None)

    # Untouched for longer than the threshold (an hour on this broker), its event dispatched
    # before: while its message waits in the queue (a backlog), it is not sent again.
    long_ago = timezone.now() - timedelta(seconds=resend_after() * 1.5)
    EventRecord.objects.filter(pk=event.id).update(dispatched_at=long_ago)
    Delivery.objects.filter(pk=row.pk).update(updated_at=long_ago)
    assert "resent" not in run("events_relay", "--min-age", "0")
    # The message is lost (a worker killed as it takes it): once the queue is seen empty,
    # the relay sends it again.
    assert [m["subscription"] for m in drain(queue)] == ["shop-receipt"]
    assert "resent 1 delivery(ies)" in run("events_relay", "--min-age", "0")
    [again] = drain(queue)
    assert (again["subscription"], again["prior_attempts"]) == ("shop-receipt", 1)
    assert "resent" not in run("events_relay", "--min-age", "0")  # touched now: once
    assert process_message(again, 0).status == "succeeded"

    row.refresh_from_db()
    assert (row.status, row.attempts, row.retry_at) == ("succeeded", 2, None)


@pytest.mark.django_db
def test_an_unknown_subscription_name_gets_the_names_it_may_mean() -> None:
    # A default name is "<event>:<handler path>": users type the handler's name.
    plain = {"event": "orders.placed", "handler": RECORD}
    with wiring(plain, {**plain, "name": "shop-big"}):
        assert fails("events_retry", "--subscription", "record") == (
            "Unknown subscription 'record'; did you mean "
            "'orders.placed:tests.app.handlers.record'? (events_list lists them)"
        )
        assert fails("events_replay", "shop-bgi") == (
            "Unknown subscription 'shop-bgi'; did you mean 'shop-big'? (events_list lists them)"
        )
        assert fails("events_pause", "zzz") == "Unknown subscription 'zzz' (events_list lists them)"


# -- events_replay ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope",), "Unknown subscription 'nope' (events_list lists them)"),
        (("shop-big", "--event", "shop.refunded"), "does not receive event 'shop.refunded'"),
        (("shop-audit", "--since", "soon"), "--since: 'soon' is not an ISO date"),
        (("shop-audit", "--since", "2026-01-02", "--until", "2026-01-01"), "must be before"),
        (("shop-audit", "--database", "nope"), "invalid choice: 'nope'"),
    ],
)
def test_events_replay_bad_arguments(queue, args, message) -> None:
    assert message in fails("events_replay", *args)


def test_events_replay_needs_a_subscription() -> None:
    assert "the following arguments are required: subscription" in fails("events_replay")


@pytest.mark.django_db
def test_events_replay_reruns_a_sync_subscription_for_chosen_events(publish_now) -> None:
    old = publish_now("shop.paid", {"order_id": 1})
    EventRecord.objects.filter(pk=old.id).update(occurred_at=timezone.now() - timedelta(days=2))
    new = publish_now("shop.paid", {"order_id": 2})
    refunded = publish_now("shop.refunded", {"order_id": 3})

    out = run("events_replay", "shop-audit", "--event", "shop.paid", "--since", "1d")

    assert out.startswith("Replayed 1 stored event(s) to shop-audit: ")
    runs = HandlerRun.objects.filter(handler="record")
    assert runs.filter(event_id=new.id).count() == 2
    assert runs.filter(event_id=old.id).count() == 1
    assert runs.filter(event_id=refunded.id).count() == 1
    assert Delivery.objects.get(event_id=new.id, subscription="shop-audit").attempts == 2

    # --until: the old one only, whatever its name.
    out = run("events_replay", "shop-audit", "--until", "1d")

    assert out.startswith("Replayed 1 stored event(s) to shop-audit: ")
    assert runs.filter(event_id=old.id).count() == 2
    assert runs.filter(event_id=new.id).count() == 2


@pytest.mark.django_db
def test_events_replay_sends_async_and_applies_the_filter(publish_now, queue) -> None:
    small = publish_now("shop.paid", {"order_id": 1, "total": 10})
    big = publish_now("shop.paid", {"order_id": 2, "total": 5000})
    drain("big-orders")

    out = run("events_replay", "shop-big")

    assert "Replayed 2 stored event(s) to shop-big: 1 re-enqueued for a worker" in out
    assert "1 skipped" in out
    [message] = drain("big-orders")
    assert message["event"]["id"] == str(big.id) and message["prior_attempts"] == 0
    assert not Delivery.objects.filter(event_id=small.id, subscription="shop-big").exists()
    assert Delivery.objects.get(event_id=big.id, subscription="shop-big").status == "pending"


@pytest.mark.django_db
def test_a_replayed_success_replaces_its_pending_row_with_batched_success_records(
    django_capture_on_commit_callbacks, queue
) -> None:
    # A plain async subscription (not idempotent), so its successes can be batched.
    plain = {"event": "shop.paid", "handler": RECORD, "mode": "async", "name": "shop-plain"}
    with shop_wiring(queue, SUBSCRIPTIONS=[plain]):
        with django_capture_on_commit_callbacks(execute=True):
            paid = publish("shop.paid", {"order_id": 7, "total": 10})
        drain(queue)  # the first message is lost: no Delivery row for shop-plain
        run("events_replay", "shop-plain")
        [message] = [m for m in drain(queue) if m["subscription"] == "shop-plain"]
        assert message["rerun"] is True and message["prior_attempts"] == 0
        assert Delivery.objects.get(event_id=paid.id, subscription="shop-plain").status == "pending"

        # SUCCESS_RECORDS = "batched" leaves first runs to a background writer that never
        # overwrites a row: a rerun's success is written at once, over the pending row.
        outcome = process_message(message, 0, manage_connections=False, batch_success=True)

    assert outcome.status == "succeeded"
    row = Delivery.objects.get(event_id=paid.id, subscription="shop-plain")
    assert (row.status, row.attempts) == ("succeeded", 1)


# -- events_prune ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "the following arguments are required: --days"),
        (("--days", "0"), "--days must be a positive number of days, got 0"),
        (("--days", "nan"), "--days must be a positive number of days, got nan"),
        (("--days", "inf"), "--days must be a positive number of days, got inf"),
        (("--days", "1e9"), "--days 1e+09 reaches back before the year 1"),
        (("--days", "ten"), "invalid float value: 'ten'"),
        (("--days", "3", "--database", "nope"), "invalid choice: 'nope'"),
    ],
)
def test_events_prune_bad_arguments(args, message) -> None:
    assert message in fails("events_prune", *args)


@pytest.mark.django_db
def test_events_prune_keeps_failures_and_pending_unless_asked(publish_now) -> None:
    failed = publish_now("shop.paid", {"order_id": 1})  # shop-ledger failed
    fine = publish_now("shop.refunded", {"order_id": 2})  # + orders.shipped from its chain
    recent = publish_now("shop.refunded", {"order_id": 3})
    recent_ids = [
        recent.id,
        *EventRecord.objects.filter(causation_id=recent.id).values_list("pk", flat=True),
    ]
    long_ago = timezone.now() - timedelta(days=40)
    EventRecord.objects.exclude(pk__in=recent_ids).update(
        occurred_at=long_ago, dispatched_at=long_ago
    )
    pending = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.paid",
        payload={"order_id": 9},
        correlation_id=uuid.uuid4(),
        occurred_at=timezone.now() - timedelta(days=40),
    )

    out = run("events_prune", "--days", "30")

    assert "Deleted 2 event record(s) and 2 delivery(ies) older than 30 day(s)." in out
    assert "Kept 1 old record(s) with failures (--include-failures deletes them)." in out
    assert "Kept 1 old record(s) still pending: run events_relay." in out
    left = set(EventRecord.objects.values_list("pk", flat=True))
    assert left == {failed.id, pending.pk, *recent_ids}
    assert not EventRecord.objects.filter(pk=fine.id).exists()

    out = run("events_prune", "--days", "30", "--include-failures")
    assert "Deleted 1 event record(s) and 2 delivery(ies)" in out
    assert set(EventRecord.objects.values_list("pk", flat=True)) == {pending.pk, *recent_ids}


@pytest.mark.django_db
@pytest.mark.parametrize("flags", [(), ("--include-failures",)])
def test_events_prune_keeps_events_whose_deliveries_are_not_finished(publish_now, flags) -> None:
    # A retry that waits, a paused subscription's held delivery, a handler that runs: their
    # events are still to be delivered, however old (an ordered key's later events too).
    events = {
        status: publish_now("shop.refunded", {"order_id": n})
        for n, status in enumerate(["pending", "held", "running", "succeeded"])
    }
    save_deliveries(
        "default",
        [delivery(e.id, "shop-audit", "async", status, 1) for status, e in events.items()],
    )
    EventRecord.objects.update(occurred_at=timezone.now() - timedelta(days=40))

    out = run("events_prune", "--days", "30", *flags)

    assert "Kept 3 old record(s) with deliveries not finished (pending, held or running)." in out
    left = set(EventRecord.objects.filter(name="shop.refunded").values_list("pk", flat=True))
    assert left == {events[s].id for s in ("pending", "held", "running")}
    assert Delivery.objects.filter(subscription="shop-audit").count() == 3


@pytest.mark.django_db(transaction=True)
def test_events_prune_keeps_a_delivery_a_retry_reopens_while_it_deletes(publish_now) -> None:
    """The retry's claim (failed -> pending) commits while prune's DELETE waits for its row
    lock: the DELETE then sees the row pending, and the event is kept."""
    event = publish_now("shop.refunded", {"order_id": 1})
    save_deliveries("default", [delivery(event.id, "shop-audit", "async", "failed", 1)])
    EventRecord.objects.update(occurred_at=timezone.now() - timedelta(days=40))
    audit = Delivery.objects.filter(event_id=event.id, subscription="shop-audit")
    table = Delivery._meta.db_table

    def claim_first(execute, sql, params, many, context):
        if sql.startswith(f'DELETE FROM "{table}"') and audit.filter(status="failed").exists():
            audit.update(status="pending")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(claim_first):
        run("events_prune", "--days", "30", "--include-failures")

    assert audit.get().status == "pending"
    assert EventRecord.objects.filter(pk=event.id).exists()


ARCHIVE_REFUNDS = {
    "name": "shop-archive",
    "event": "shop.refunded",
    "handler": RECORD,
    "mode": "async",
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("subscription", ["shop-archive", "shop-audit"])  # async, sync
def test_events_replay_skips_records_events_prune_deletes_meanwhile(queue, subscription) -> None:
    """Prune deletes an old record after the replay read it, before the replay writes its
    delivery: the replay sends (or runs) nothing for it and says so; nothing breaks."""
    old, gone, kept = timezone.now() - timedelta(days=40), uuid.uuid4(), uuid.uuid4()
    for pk, occurred_at in [(gone, old), (kept, timezone.now())]:
        EventRecord.objects.create(
            id=pk,
            name="shop.refunded",
            payload={"order_id": 1},
            correlation_id=uuid.uuid4(),
            status="dispatched",
            occurred_at=occurred_at,
        )
    table, pruned = Delivery._meta.db_table, StringIO()

    def prune_first(execute, sql, params, many, context):
        # The replay's first look at the deliveries: it has read the records by then.
        if not pruned.tell() and table in sql:
            pruned.write("prune: ")
            call_command("events_prune", "--days", "30", stdout=pruned)
        return execute(sql, params, many, context)

    out, err = StringIO(), StringIO()
    with shop_wiring(queue, SUBSCRIPTIONS=[ARCHIVE_REFUNDS]):
        with connection.execute_wrapper(prune_first):
            call_command("events_replay", subscription, stdout=out, stderr=err)
        sent = [message["event"]["id"] for message in drain(queue)]

    assert "Deleted 1 event record(s)" in pruned.getvalue()
    assert "Replayed 2 stored event(s)" in out.getvalue() and "1 skipped" in out.getvalue()
    assert f"Skipped {gone}: its record was deleted meanwhile (events_prune)" in err.getvalue()
    assert not EventRecord.objects.filter(pk=gone).exists()
    assert not Delivery.objects.filter(event_id=gone).exists()
    if subscription == "shop-archive":
        assert sent == [str(kept)]
    else:
        assert list(HandlerRun.objects.values_list("event_id", flat=True)) == [kept]
    row = Delivery.objects.get(event_id=kept, subscription=subscription)
    assert row.status == ("pending" if subscription == "shop-archive" else "succeeded")


@pytest.mark.postgresql  # SQLite has no row locks: its writers take turns, a whole transaction each
@pytest.mark.django_db(transaction=True)
def test_events_prune_waits_for_a_replay_writing_deliveries_and_keeps_the_record(queue) -> None:
    """Prune starts while a replay holds its record, the delivery row written, not yet
    committed: prune waits, then sees the delivery pending and keeps the record."""
    record = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.refunded",
        payload={"order_id": 1},
        correlation_id=uuid.uuid4(),
        status="dispatched",
        occurred_at=timezone.now() - timedelta(days=40),
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [replay_pid] = cursor.fetchone()
    table, pruned, failed, waited = Delivery._meta.db_table, StringIO(), [], []
    prune_pid: list[int] = []

    def prune() -> None:
        try:
            with connection.cursor() as cursor:  # this thread's own connection
                cursor.execute("SELECT pg_backend_pid()")
                prune_pid.extend(cursor.fetchone())
            call_command("events_prune", "--days", "30", stdout=pruned)
        except Exception as exc:  # the test says what failed
            failed.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=prune)

    def prune_meanwhile(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if sql.startswith(f'UPDATE "{table}"') and not waited:
            thread.start()  # the replay's row is written; its transaction goes on
            waited.append(_blocked_by(replay_pid, prune_pid, thread))
        return result

    with shop_wiring(queue, SUBSCRIPTIONS=[ARCHIVE_REFUNDS]):
        with connection.execute_wrapper(prune_meanwhile):
            out = run("events_replay", "shop-archive")
        thread.join(30)
        sent = [message["event"]["id"] for message in drain(queue)]

    assert failed == [] and waited == [True]
    assert "1 re-enqueued for a worker" in out and sent == [str(record.pk)]
    assert "Deleted 0 event record(s)" in pruned.getvalue()
    assert "Kept 1 old record(s) with deliveries not finished" in pruned.getvalue()
    assert Delivery.objects.get(event_id=record.pk, subscription="shop-archive").status == "pending"


def _blocked_by(pid: int, waiting: list[int], thread: threading.Thread) -> bool:
    """Whether the backend in ``waiting`` (once there) is seen waiting for a lock ``pid``
    holds, before ``thread`` ends or 10 s pass."""
    deadline = time.monotonic() + 10
    with connection.cursor() as cursor:
        while thread.is_alive() and time.monotonic() < deadline:
            if waiting:
                cursor.execute("SELECT %s = ANY(pg_blocking_pids(%s))", [pid, waiting[0]])
                if cursor.fetchone()[0]:
                    return True
            time.sleep(0.02)
    return False


WAITING = [
    {
        "name": "x-once",
        "event": "x.waiting",
        "handler": RECORD,
        "mode": "async",
        "idempotent": True,
    },
    {"name": "x-plain", "event": "x.waiting", "handler": RECORD, "mode": "async"},
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("days", "occurred", "dispatched"),
    [
        ("0.01", timedelta(minutes=20), timedelta(minutes=20)),  # a retention under an hour
        ("30", timedelta(days=40), timedelta(minutes=20)),  # relayed after an outage
    ],
    ids=["short-retention", "relayed-late"],
)
def test_events_prune_keeps_a_record_whose_first_deliveries_may_still_wait_in_a_queue(
    queue, days, occurred, dispatched
) -> None:
    """A first delivery has no `Delivery` row until a worker writes its outcome, which needs
    the record: prune keeps a record dispatched less than the lost-message threshold ago."""
    with shop_wiring(queue, MANIFESTS=[], EVENTS={"x.waiting": {}}, SUBSCRIPTIONS=WAITING):
        event = publish("x.waiting", {"n": 1})
        marking.flush()
        now = timezone.now()
        EventRecord.objects.filter(pk=event.id).update(
            occurred_at=now - occurred, dispatched_at=now - dispatched
        )

        out = run("events_prune", "--days", days)
        # The worker reaches the backlog only now.
        outcomes = [
            process_message(message, 0, manage_connections=False, batch_success=True)
            for message in drain(queue)
        ]
        recorder().flush()

    rows = Delivery.objects.filter(event_id=event.id).values_list("subscription", "status")
    assert (sorted(rows), [o.status for o in outcomes]) == (
        [("x-once", "succeeded"), ("x-plain", "succeeded")],
        ["succeeded", "succeeded"],
    )
    assert HandlerRun.objects.filter(event_id=event.id).count() == 2  # once each
    assert f"Kept 1 old record(s) dispatched less than {resend_after():g} s ago" in out

    # Past the threshold it goes as any other: its deliveries are finished.
    EventRecord.objects.filter(pk=event.id).update(
        dispatched_at=now - timedelta(seconds=resend_after() + 1)
    )
    assert "Deleted 1 event record(s) and 2 delivery(ies)" in run("events_prune", "--days", days)


@pytest.mark.django_db
def test_events_prune_deletes_expired_idempotency_keys_only() -> None:
    now = timezone.now()
    for key, expires_at in [
        ("old", now - timedelta(seconds=1)),
        ("live", now + timedelta(hours=1)),
    ]:
        IdempotencyKey.objects.create(
            event_name="shop.paid", key=key, event_id=uuid.uuid4(), expires_at=expires_at
        )

    out = run("events_prune", "--days", "30")

    assert "Deleted 1 expired inbound idempotency key(s)." in out
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["live"]


@pytest.mark.django_db(transaction=True)
def test_a_retried_success_is_recorded_for_an_event_recorded_on_failure_only(queue) -> None:
    event = publish("orders.cancelled", {})  # record: failures
    assert not EventRecord.objects.filter(pk=event.id).exists()
    assert [o.status for o in work(queue)] == ["failed"]  # the failure brings the record

    assert "1 re-enqueued for a worker" in run("events_retry", "--subscription", "cancel-notice")
    assert [o.status for o in work(queue)] == ["succeeded"]

    row = Delivery.objects.get(event_id=event.id, subscription="cancel-notice")
    assert (row.status, row.attempts) == ("succeeded", 2)


@pytest.mark.django_db
def test_events_replay_skips_what_an_idempotent_subscription_already_did(publish_now) -> None:
    done = publish_now("shop.paid", {"order_id": 1, "total": 2000})
    failed = publish_now("shop.paid", {"order_id": 2, "total": 3000})
    save_deliveries(
        "default",
        [
            delivery(done.id, "shop-big", "async", "succeeded", 1),
            delivery(failed.id, "shop-big", "async", "failed", 2, "Boom"),
        ],
    )
    drain("big-orders")

    out = run("events_replay", "shop-big")

    assert "1 re-enqueued for a worker" in out and "1 skipped" in out
    [message] = drain("big-orders")
    assert (message["event"]["id"], message["prior_attempts"]) == (str(failed.id), 2)
    assert Delivery.objects.get(event_id=done.id, subscription="shop-big").status == "succeeded"


FANOUT = {
    "name": "shop-fanout",
    "event": "shop.refunded",
    "handler": "tests.app.handlers.record_other",
    "mode": "async",
    "broadcast": True,
}


@pytest.mark.django_db
def test_a_broadcast_failure_is_not_retried_nor_replayed(publish_now, queue) -> None:
    # A retry or replay goes to the fanout exchange: every worker would run it again,
    # and a copy's success never overwrites the row, which would stay pending for good.
    with shop_wiring(queue, SUBSCRIPTIONS=[FANOUT]):
        event = publish_now("shop.refunded", {"order_id": 1})
        save_deliveries(
            "default", [delivery(event.id, "shop-fanout", "async", "failed", 1, "on host1: Boom")]
        )

        out, err = StringIO(), StringIO()
        with pytest.raises(CommandError, match="retried: 1 was skipped, for the reasons above"):
            call_command("events_retry", "--subscription", "shop-fanout", stdout=out, stderr=err)
        message = fails("events_replay", "shop-fanout")

    assert "0 re-enqueued for a worker" in out.getvalue() and "1 skipped" in out.getvalue()
    assert "a broadcast is not retried" in err.getvalue()
    assert "Subscription 'shop-fanout' is a broadcast" in message
    row = Delivery.objects.get(event_id=event.id, subscription="shop-fanout")
    assert (row.status, row.attempts, row.last_error) == ("failed", 1, "on host1: Boom")


ARCHIVE = {
    "name": "cancel-archive",
    "event": "orders.cancelled",
    "handler": "tests.app.handlers.record",
    "mode": "async",
}


@pytest.mark.django_db(transaction=True)
def test_a_replayed_success_of_an_event_recorded_on_failure_only_leaves_nothing_pending(
    queue,
) -> None:
    with shop_wiring(queue, SUBSCRIPTIONS=[ARCHIVE]):
        event = publish("orders.cancelled", {})
        outcomes = sorted(o.status for o in work(queue))
        assert outcomes == ["failed", "succeeded"]  # cancel-notice failed: the record is kept

        assert "1 re-enqueued for a worker" in run("events_replay", "cancel-archive")
        assert [o.status for o in work(queue)] == ["succeeded"]

    assert HandlerRun.objects.filter(handler="record", event_id=event.id).count() == 2
    statuses = Delivery.objects.filter(event_id=event.id).values_list("subscription", "status")
    assert dict(statuses) == {"cancel-notice": "failed"}  # RECORD: failures keeps no success


@pytest.mark.django_db
def test_an_unsent_replay_of_an_event_recorded_on_failure_only_is_a_failure(queue) -> None:
    record = EventRecord.objects.create(
        id=uuid.uuid4(), name="orders.cancelled", correlation_id=uuid.uuid4(), status="dispatched"
    )
    with shop_wiring(queue, SUBSCRIPTIONS=[ARCHIVE], CELERY_APP="tests.brokers.unreachable"):
        message = fails("events_replay", "cancel-archive")
    assert "they are marked failed" in message
    row = Delivery.objects.get(event_id=record.pk, subscription="cancel-archive")
    assert (row.status, row.attempts, row.last_error) == ("failed", 0, NOT_SENT)

    # Retried, its first run (no success row kept for this event) finishes the row, due time
    # included: a row left due would be sent again and again.
    with shop_wiring(queue, SUBSCRIPTIONS=[ARCHIVE]):
        assert "1 re-enqueued" in run("events_retry", "--subscription", "cancel-archive")
        [message] = drain(queue)
        assert process_message(message, 0, manage_connections=False).status == "succeeded"
    row.refresh_from_db()
    assert (row.status, row.attempts, row.retry_at) == ("succeeded", 1, None)


@pytest.mark.django_db
def test_a_replay_stopped_midway_has_recorded_each_run_before(publish_now, queue) -> None:
    first = publish_now("shop.paid", {"order_id": 1, "note": "go on"})
    EventRecord.objects.filter(pk=first.id).update(occurred_at=timezone.now() - timedelta(1))
    last = publish_now("shop.paid", {"order_id": 2, "note": "stop"})
    stopper = {
        "name": "shop-stopper",
        "event": "shop.paid",
        "handler": "tests.app.handlers.stops_on_note",
    }

    with shop_wiring(queue, SUBSCRIPTIONS=[stopper]), pytest.raises(SystemExit):
        run("events_replay", "shop-stopper")  # the process "dies" in the second handler

    runs = HandlerRun.objects.filter(handler="stops_on_note")
    assert set(runs.values_list("event_id", flat=True)) == {first.id, last.id}
    done = Delivery.objects.get(event_id=first.id, subscription="shop-stopper")
    assert (done.status, done.attempts) == ("succeeded", 1)
    stopped = Delivery.objects.get(event_id=last.id, subscription="shop-stopper")
    assert stopped.status == "running"  # the one a dead process leaves: it says so


@pytest.mark.django_db
def test_a_retry_stopped_midway_leaves_the_failures_after_it_failed(publish_now, queue) -> None:
    notes = ["go on", "stop", "go on"]
    events = [
        publish_now("shop.paid", {"order_id": n, "note": note}) for n, note in enumerate(notes)
    ]
    save_deliveries(
        "default", [delivery(e.id, "shop-stopper", "sync", "failed", 1, "Boom") for e in events]
    )
    stopper = {
        "name": "shop-stopper",
        "event": "shop.paid",
        "handler": "tests.app.handlers.stops_on_note",
    }

    with shop_wiring(queue, SUBSCRIPTIONS=[stopper]), pytest.raises(SystemExit):
        run("events_retry", "--subscription", "shop-stopper")  # "dies" in the second handler

    rows = Delivery.objects.filter(subscription="shop-stopper")
    outcomes = {d.event_id: (d.status, d.attempts) for d in rows}
    # The one a dead process was running says so; the one after it is still a failure.
    assert [outcomes[e.id] for e in events] == [("succeeded", 2), ("running", 1), ("failed", 1)]
    with shop_wiring(queue, SUBSCRIPTIONS=[stopper]):
        assert "1 ran and succeeded" in run("events_retry", "--subscription", "shop-stopper")
    assert rows.get(event_id=events[2].id).status == "succeeded"


@pytest.mark.django_db
def test_two_sync_retries_at_once_count_every_run(publish_now, queue) -> None:
    first = publish_now("shop.paid", {"order_id": 1, "note": "retry"})
    second = publish_now("shop.paid", {"order_id": 2, "note": "fail"})
    for event in (first, second):
        save_deliveries("default", [delivery(event.id, "shop-racer", "sync", "failed", 1, "Boom")])
    racer = {
        "name": "shop-racer",
        "event": "shop.paid",
        "handler": "tests.app.handlers.retries_the_rest",
    }

    # The first handler runs a second retry, which runs (and fails) the second delivery
    # before this retry reaches it: this one then runs it a third time.
    with shop_wiring(queue, SUBSCRIPTIONS=[racer]):
        run("events_retry", "--subscription", "shop-racer")

    rows = Delivery.objects.filter(subscription="shop-racer")
    runs = HandlerRun.objects.filter(handler="retries_the_rest", event_id=second.id).count()
    assert runs == 2
    assert rows.get(event_id=second.id).attempts == 1 + runs  # not 2: each run counted
    assert rows.get(event_id=first.id).attempts == 2


@pytest.mark.django_db
def test_the_relay_records_a_sync_run_its_dead_process_left_running_as_failed(
    publish_now, queue
) -> None:
    event = publish_now("shop.paid", {"order_id": 1, "note": "stop"})
    save_deliveries("default", [delivery(event.id, "shop-stopper", "sync", "failed", 1, "Boom")])
    stopper = {
        "name": "shop-stopper",
        "event": "shop.paid",
        "handler": "tests.app.handlers.stops_on_note",
    }
    with shop_wiring(queue, SUBSCRIPTIONS=[stopper]), pytest.raises(SystemExit):
        run("events_retry", "--subscription", "shop-stopper")  # "dies" in the handler
    row = Delivery.objects.get(event_id=event.id, subscription="shop-stopper")
    assert (row.status, row.attempts) == ("running", 1)
    failures: list[dict[str, object]] = []

    def note(**kwargs: object) -> None:
        failures.append(kwargs)

    delivery_failed.connect(note)
    try:
        # Running for less than --requeue-running-after (an hour): it may still be going.
        assert "left running" not in run("events_relay")
        row.refresh_from_db()
        assert row.status == "running"

        began = timezone.now() - timedelta(hours=2)
        Delivery.objects.filter(pk=row.pk).update(updated_at=began)
        out = run("events_relay")
        assert "Recorded 1 sync delivery(ies) left running by a process that is gone" in out
        assert "left running" not in run("events_relay")  # once
    finally:
        delivery_failed.disconnect(note)
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("failed", 2)  # the interrupted run counts
    assert row.last_error.startswith(
        f"Interrupted: its run began at {began.isoformat(timespec='seconds')}"
    )
    [failure] = failures
    assert (failure["event_id"], failure["subscription"], failure["attempts"]) == (
        event.id,
        "shop-stopper",
        2,
    )
    # A failure like any other: a retry runs it (here, of a handler that no longer stops).
    with shop_wiring(queue, SUBSCRIPTIONS=[{**stopper, "handler": RECORD}]):
        assert "1 ran and succeeded" in run("events_retry", "--subscription", "shop-stopper")
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("succeeded", 3)


@pytest.mark.django_db
def test_a_one_shot_relay_accounts_for_every_record_it_leaves_pending() -> None:
    # Dated after the run starts (a publisher's clock ahead of this host's): not sent.
    ahead = EventRecord.objects.create(
        id=uuid.uuid4(),
        name="shop.paid",
        payload={"order_id": 1},
        correlation_id=uuid.uuid4(),
        occurred_at=timezone.now() + timedelta(minutes=5),
    )

    out = run("events_relay")

    assert "Relayed 0 event(s); 1 still pending." in out
    assert "1 dated after this run started" in out
    assert EventRecord.objects.get(pk=ahead.pk).status == "pending"


def pending(name: str, payload: dict[str, object], **fields: object) -> EventRecord:
    """A record its publisher could not hand to the broker, a minute ago."""
    return EventRecord.objects.create(
        id=uuid.uuid4(),
        name=name,
        payload=payload,
        correlation_id=uuid.uuid4(),
        occurred_at=timezone.now() - timedelta(minutes=1),
        **fields,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Each names the option and the value (all three used to get one message for all).
        (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
        (("--interval", "0", "--loop"), "--interval must be a positive number of seconds, got 0"),
        (("--interval", "nan"), "--interval must be a positive number of seconds, got nan"),
        (("--min-age", "-1"), "--min-age must be a number of seconds >= 0, got -1"),
        (("--min-age", "inf"), "--min-age must be a number of seconds >= 0, got inf"),
        (
            ("--requeue-running-after", "0"),
            "--requeue-running-after must be a positive number of seconds, got 0",
        ),
        (
            ("--resend-unfinished-after", "-2.5"),
            "--resend-unfinished-after must be a positive number of seconds, got -2.5",
        ),
        (("--database", "nope"), "invalid choice: 'nope'"),
    ],
)
def test_events_relay_bad_arguments(args, message) -> None:
    assert message in fails("events_relay", *args)


@pytest.mark.django_db
def test_events_relay_sends_what_is_wired_now_and_fails_the_undeclared(queue, caplog) -> None:
    small = pending("shop.paid", {"order_id": 1, "total": 10})
    big = pending("shop.paid", {"order_id": 2, "total": 5000})
    sync_only = pending("shop.refunded", {"order_id": 3})  # its handlers ran at commit
    gone = pending("shop.closed", {"order_id": 4})  # declared no more

    with caplog.at_level("ERROR", logger="django_events.relay"):
        out = run("events_relay")

    assert out == "Relayed 3 event(s); 0 still pending.\n"
    assert sorted((m["subscription"], m["event"]["id"]) for m in drain(queue)) == sorted(
        [("shop-receipt", str(small.id)), ("shop-receipt", str(big.id))]
    )
    assert [(m["subscription"], m["event"]["id"]) for m in drain("big-orders")] == [
        ("shop-big", str(big.id))
    ]
    status = dict(EventRecord.objects.values_list("pk", "status"))
    assert [status[r.pk] for r in (small, big, sync_only, gone)] == [
        "dispatched",
        "dispatched",
        "dispatched",
        "failed",
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "1 pending event(s) are no longer declared; marked failed"
    ]
    assert HandlerRun.objects.count() == 0  # the relay runs no handler itself


@pytest.mark.django_db
def test_events_relay_fails_while_the_broker_is_down_and_keeps_the_records(queue) -> None:
    record = pending("shop.paid", {"order_id": 1})

    with shop_wiring(queue, CELERY_APP="tests.brokers.unreachable"):
        message = fails("events_relay")

    assert message == (
        "The broker did not take every pending event: 1 record(s) from before this run are "
        "still pending; run events_relay again once it takes them."
    )
    assert EventRecord.objects.get(pk=record.pk).status == "pending"
    assert "Relayed 1 event(s); 0 still pending." in run("events_relay")  # once it is back
    assert len(drain(queue)) == 1


@pytest.mark.django_db
def test_events_relay_leaves_a_newer_version_to_the_newer_release_and_says_so(
    queue, caplog
) -> None:
    """A rolling deploy: this release declares shop.paid v1; a newer one published v2."""
    newer = pending("shop.paid", {"order_id": 1}, version=2)
    current = pending("shop.paid", {"order_id": 2})

    with caplog.at_level("WARNING", logger="django_events.relay"):
        out = run("events_relay")

    # It used to wait for it as "younger than --min-age" and count it "locked by another relay".
    assert out.splitlines() == [
        "Relayed 1 event(s); 1 still pending.",
        "  1 of a version newer than this release declares: a relay of the newer release "
        "sends them.",
    ]
    assert [m["event"]["id"] for m in drain(queue)] == [str(current.id)]
    assert EventRecord.objects.get(pk=newer.pk).status == "pending"
    assert (
        "Left pending: Event 'shop.paid' is version 2; this process knows up to version 1"
    ) in caplog.messages


@pytest.mark.django_db
def test_events_relay_sends_a_whole_backlog_behind_records_of_a_newer_version(queue) -> None:
    newer = pending("shop.paid", {"order_id": 0}, version=2)
    backlog = [pending("shop.paid", {"order_id": n}) for n in range(1, 6)]
    for position, record in enumerate([newer, *backlog]):  # the newer one first
        EventRecord.objects.filter(pk=record.pk).update(
            occurred_at=timezone.now() - timedelta(minutes=10 - position)
        )

    out = run("events_relay", "--batch-size", "2")

    # Each pass read the newer one and one more; it used to stop after the first pass.
    assert out.splitlines()[0] == "Relayed 5 event(s); 1 still pending."
    assert sorted(m["event"]["id"] for m in drain(queue)) == sorted(str(r.pk) for r in backlog)
    assert list(EventRecord.objects.filter(status="pending").values_list("pk", flat=True)) == [
        newer.pk
    ]


@pytest.mark.django_db
def test_events_relay_sends_an_event_its_upcaster_fails_on_as_stored(queue, caplog) -> None:
    """The workers record the failure against each subscription (shown in the admin)."""
    upcast = {"version": 2, "upcast": {1: "tests.app.upcasters.explode"}}
    subscription = {"event": "o.placed", "handler": RECORD, "mode": "async", "name": "o-sub"}
    with shop_wiring(queue, EVENTS={"o.placed": upcast}, SUBSCRIPTIONS=[subscription]):
        record = pending("o.placed", {"order_id": 1})

        with caplog.at_level("ERROR", logger="django_events.relay"):
            out = run("events_relay")
        outcomes = [process_message(m, 0, manage_connections=False) for m in drain(queue)]

    assert out == "Relayed 1 event(s); 0 still pending.\n"
    assert [r.getMessage() for r in caplog.records if r.name == "django_events.relay"] == [
        "Upcaster v1 -> v2 of event 'o.placed' (tests.app.upcasters.explode) raised "
        f"RuntimeError: upcaster exploded on purpose (event {record.pk})"
    ]
    assert [o.status for o in outcomes] == ["failed"]
    failure = Delivery.objects.get(event_id=record.pk, subscription="o-sub")
    assert failure.status == "failed"
    assert "upcaster exploded on purpose" in failure.last_error
    assert not HandlerRun.objects.exists()


@pytest.mark.django_db
def test_events_relay_sends_due_retries_and_fails_those_whose_subscription_is_gone(
    queue, publish_now, caplog
) -> None:
    event = publish_now("shop.paid", {"order_id": 1})
    drain(queue)
    save_deliveries(
        "default",
        [  # retries a worker could not hand to the broker
            delivery(event.id, "shop-receipt", "async", "pending", 1, "Boom"),
            delivery(event.id, "gone", "async", "pending", 2, "Boom"),
        ],
    )
    due = timezone.now() - timedelta(seconds=1)
    Delivery.objects.filter(subscription__in=["gone", "shop-receipt"]).update(retry_at=due)

    with caplog.at_level("ERROR", logger="django_events.relay"):
        before = timezone.now()
        out = run("events_relay")

    assert (
        out == "Relayed 0 event(s) and 1 due delivery(ies) (retries, hand-ons); 0 still pending.\n"
    )
    [message] = drain(queue)
    assert (message["subscription"], message["prior_attempts"]) == ("shop-receipt", 1)
    sent = Delivery.objects.get(event_id=event.id, subscription="shop-receipt")
    # No due time, touched as it was sent: the relay's check of lost pending deliveries
    # starts from the send, should this message be lost too.
    assert (sent.status, sent.retry_at) == ("pending", None) and sent.updated_at >= before
    gone = Delivery.objects.get(event_id=event.id, subscription="gone")
    assert (gone.status, gone.retry_at, gone.attempts, gone.last_error) == (
        "failed",
        None,
        2,
        "Not retried: the event no longer reaches this subscription.",
    )
    assert [r.getMessage() for r in caplog.records if r.name == "django_events.relay"] == [
        "1 due retr(y/ies) no longer reach their subscription; marked failed"
    ]


@pytest.mark.django_db
def test_events_replay_gives_a_sync_handler_the_declared_version(queue) -> None:
    declared = {"version": 2, "upcast": {1: "tests.app.upcasters.split_total"}}
    subscription = {"event": "o.placed", "handler": RECORD, "mode": "sync", "name": "o-sync"}
    with shop_wiring(queue, EVENTS={"o.placed": declared}, SUBSCRIPTIONS=[subscription]):
        old = pending("o.placed", {"order_id": 1, "total": 9.5}, status="dispatched")
        newer = pending("o.placed", {"order_id": 2}, version=3, status="dispatched")

        out = run("events_replay", "o-sync")

    assert out == (
        "Replayed 2 stored event(s) to o-sync: 0 re-enqueued for a worker; "
        "1 ran and succeeded; 0 ran and failed; 1 not run (recorded failed with the reason).\n"
    )
    [handled] = HandlerRun.objects.filter(handler="record")
    assert (handled.event_id, handled.payload) == (
        old.pk,
        {"order_id": 1, "amount": 950, "currency": "EUR"},
    )
    waiting = Delivery.objects.get(event_id=newer.pk, subscription="o-sync")
    assert (waiting.status, waiting.last_error) == (
        "failed",  # for a retry from the newer release: no worker takes it later
        "Not run: event 'o.placed' is version 3; this process knows up to version 2. "
        "Retry it from a process that declares version 3.",
    )
    assert EventRecord.objects.get(pk=old.pk).payload == {"order_id": 1, "total": 9.5}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("upcaster", "error"),
    [
        ("explode", "raised RuntimeError: upcaster exploded on purpose"),
        ("drop_everything", "returned an invalid payload: $: 'order_id' is a required property"),
    ],
)
def test_events_replay_records_an_upcaster_failure_without_running_the_handler(
    queue, upcaster: str, error: str
) -> None:
    declared = {
        "version": 2,
        "upcast": {1: f"tests.app.upcasters.{upcaster}"},
        "schema": {"type": "object", "required": ["order_id"]},
    }
    subscription = {"event": "o.placed", "handler": RECORD, "mode": "sync", "name": "o-sync"}
    with shop_wiring(queue, EVENTS={"o.placed": declared}, SUBSCRIPTIONS=[subscription]):
        record = pending("o.placed", {"order_id": 1}, status="dispatched")

        out = run("events_replay", "o-sync")

    assert "0 ran and succeeded; 0 ran and failed; 1 not run (recorded failed with" in out
    failed = Delivery.objects.get(event_id=record.pk, subscription="o-sync")
    assert (failed.status, failed.attempts, failed.last_error) == (
        "failed",
        0,
        f"Upcaster v1 -> v2 of event 'o.placed' (tests.app.upcasters.{upcaster}) {error}",
    )
    assert not HandlerRun.objects.exists()


@pytest.mark.django_db
def test_a_sync_retry_of_a_newer_version_stays_a_failure_for_the_newer_release(queue) -> None:
    """A rolling deploy: this release declares o.placed v2, the event is v3."""
    subscription = {"event": "o.placed", "handler": RECORD, "mode": "sync", "name": "o-sync"}
    with shop_wiring(queue, EVENTS={"o.placed": {"version": 2}}, SUBSCRIPTIONS=[subscription]):
        newer = pending("o.placed", {"order_id": 2}, version=3, status="dispatched")
        save_deliveries("default", [delivery(newer.pk, "o-sync", "sync", "failed", 2, "Boom")])

        out = run("events_retry", "--subscription", "o-sync")
    # The handler did not run: not counted as a run that failed.
    assert "0 ran and failed; 1 not run (recorded failed with the reason)." in out

    # Still a failure (no worker takes a sync delivery later: pending, it stayed so for
    # good), its count of runs as it was (it used to lose a run).
    waiting = Delivery.objects.get(event_id=newer.pk, subscription="o-sync")
    assert (waiting.status, waiting.attempts) == ("failed", 2)
    assert waiting.last_error == (
        "Not run: event 'o.placed' is version 3; this process knows up to version 2. "
        "Retry it from a process that declares version 3."
    )
    assert not HandlerRun.objects.exists()

    # The newer release retries it.
    with shop_wiring(queue, EVENTS={"o.placed": {"version": 3}}, SUBSCRIPTIONS=[subscription]):
        assert "1 ran and succeeded" in run("events_retry", "--subscription", "o-sync")
    waiting.refresh_from_db()
    assert (waiting.status, waiting.attempts) == ("succeeded", 3)
    assert HandlerRun.objects.count() == 1


@pytest.mark.django_db(databases=["default", "other"])
def test_events_relay_enqueues_via_tasks_deliveries_kept_outside_the_event_log(queue) -> None:
    """The task table is on the default database, this event log on "other": a task row did
    not commit with the record, the relay enqueues it."""
    from django_tasks_db.models import DBTaskResult

    via_tasks = {"event": "shop.refunded", "handler": RECORD, "mode": "async", "via": "tasks"}
    via_tasks |= {"name": "refund-task", "queue": queue}
    with shop_wiring(queue, SUBSCRIPTIONS=[via_tasks]):
        record = EventRecord.objects.using("other").create(
            id=uuid.uuid4(),
            name="shop.refunded",
            payload={"order_id": 1},
            correlation_id=uuid.uuid4(),
            occurred_at=timezone.now() - timedelta(minutes=1),
        )

        out = run("events_relay", "--database", "other")

    assert out == "Relayed 1 event(s); 0 still pending.\n"
    assert EventRecord.objects.using("other").get(pk=record.pk).status == "dispatched"
    [task] = DBTaskResult.objects.filter(queue_name=queue)
    message = task.args_kwargs["args"][0]
    assert (message["subscription"], message["event"]["id"]) == ("refund-task", str(record.pk))
    assert (message["db"], task.status) == ("other", "READY")
    assert not HandlerRun.objects.exists()  # a db_worker runs it


@pytest.mark.django_db
@pytest.mark.parametrize(
    "command",
    [
        ("events_retry", "--all"),
        ("events_replay", "shop-audit", "--since", "1h"),
        ("events_pause", "shop-audit"),
        ("events_resume", "shop-audit"),
        ("events_prune", "--days", "1"),
        ("events_list", "--held"),
    ],
)
def test_a_database_that_does_not_answer_is_a_one_line_error(command: tuple[str, ...]) -> None:
    def refuse(*args: object) -> None:
        raise OperationalError("connection refused")

    refused = pytest.raises(
        CommandError, match="^The database 'default' failed: OperationalError: connection refused"
    )
    with shop_wiring(), connection.execute_wrapper(refuse), refused:
        call_command(*command, stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("command", "routed"),
    [
        (("events_retry", "--all"), "write the event log to 'other'"),
        (("events_replay", "shop-audit", "--since", "1h"), "write the event log to 'other'"),
        (("events_pause", "shop-audit"), "write the event log to 'other'"),
        (("events_resume", "shop-audit"), "write the event log to 'other'"),
        (("events_prune", "--days", "1"), "write the event log to 'other'"),
        (("events_list", "--held"), "read the event log from 'other'"),  # it only reads
    ],
)
def test_a_database_without_the_log_names_the_alias_the_routers_give_it(
    command: tuple[str, ...], routed: str
) -> None:
    """``--database`` names another alias than the routers' (without it: theirs)."""
    from django.db import ProgrammingError
    from django.test import override_settings

    from tests.routers import EventLogElsewhere

    def missing(*args: object) -> None:
        raise ProgrammingError('relation "django_events_delivery" does not exist')

    refused = pytest.raises(CommandError, match=f"^The database 'default' failed .*{routed}")
    with (
        override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]),
        shop_wiring(),
        connection.execute_wrapper(missing),
        refused as raised,
    ):
        call_command(*command, "--database", "default", stdout=StringIO(), stderr=StringIO())
    assert "--database other" in str(raised.value)


@pytest.mark.django_db
def test_events_list_state_names_the_alias_the_routers_give_the_log() -> None:
    from django.db import ProgrammingError
    from django.test import override_settings

    from tests.routers import EventLogElsewhere

    def missing(*args: object) -> None:
        raise ProgrammingError('relation "django_events_pausedsubscription" does not exist')

    listed, noted = StringIO(), StringIO()
    with (
        override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]),
        shop_wiring(),
        connection.execute_wrapper(missing),
    ):
        call_command(
            "events_list",
            "--state",
            "--no-endpoints",
            "--database",
            "default",
            stdout=listed,
            stderr=noted,
        )
    assert "shop-audit" in listed.getvalue()  # the wiring, all the same
    assert "Paused subscriptions unknown" in noted.getvalue()
    assert "(the routers read the event log from 'other': pass --database other)" in (
        noted.getvalue()
    )


# -- the event log on a database of its own (DATABASE_ROUTERS) -------------------------------


def _record(alias: str, *, status: str = "dispatched", days: float = 0.0) -> EventRecord:
    """A record of ``shop.refunded`` (sync subscriptions only) on ``alias``."""
    at = timezone.now() - timedelta(days=days, minutes=1)
    return EventRecord.objects.using(alias).create(
        id=uuid.uuid4(),
        name="shop.refunded",
        payload={"order_id": 1},
        correlation_id=uuid.uuid4(),
        occurred_at=at,
        status=status,
        dispatched_at=None if status == "pending" else at,
    )


def _audit_delivery(status: str) -> Callable[[str], object]:
    def write(alias: str) -> None:
        record = _record(alias)
        save_deliveries(alias, [delivery(record.pk, "shop-audit", "sync", status, 1, "Boom")])

    return write


def _audit_paused(alias: str) -> None:
    PausedSubscription.objects.using(alias).create(subscription="shop-audit")


def _event_log_rows(alias: str) -> int:
    return sum(
        model.objects.using(alias).count() for model in (EventRecord, Delivery, PausedSubscription)
    )


@pytest.mark.django_db(databases=["default", "other"])
@pytest.mark.parametrize(
    ("command", "prepare", "expected"),
    [
        (
            ("events_relay",),
            lambda alias: _record(alias, status="pending"),
            "Relayed 1 event(s); 0 still pending.",  # was "Relayed 0 event(s)": default's
        ),
        (("events_retry", "--all"), _audit_delivery("failed"), "1 ran and succeeded"),
        (("events_replay", "shop-audit"), _record, "Replayed 1 stored event(s) to shop-audit"),
        (("events_pause", "shop-audit"), lambda alias: None, "Paused 'shop-audit'"),
        (("events_resume", "shop-audit"), _audit_paused, "Resumed 'shop-audit'."),
        (
            ("events_prune", "--days", "1"),
            lambda alias: _record(alias, days=2),
            "Deleted 1 event record(s)",
        ),
        (("events_list", "--held"), _audit_delivery("held"), "1 held delivery(ies)"),
        (("events_list", "--state", "--no-endpoints"), _audit_paused, "shop-audit: paused"),
    ],
)
def test_the_event_log_commands_use_the_database_the_routers_give_it(
    command: tuple[str, ...], prepare: Callable[[str], object], expected: str
) -> None:
    """Without --database, the alias the routers give django_events (as publish() and the
    admin use), not default; here both databases have the tables (migrate ran on both)."""
    from django.test import override_settings

    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]), shop_wiring():
        prepare("other")

        assert expected in run(*command)

    assert _event_log_rows("default") == 0  # nothing written there


@pytest.mark.django_db(databases=["default", "other"])
def test_events_list_reads_where_the_routers_read_the_event_log() -> None:
    """A replica router: the listing reads where the routers read, the others write."""
    from django.test import override_settings

    class ReadsElsewhere:
        def db_for_read(self, model: type, **hints: object) -> str | None:
            return "other" if model._meta.app_label == "django_events" else None

    with override_settings(DATABASE_ROUTERS=[ReadsElsewhere()]), shop_wiring():
        _audit_delivery("held")("other")

        assert "1 held delivery(ies)" in run("events_list", "--held")
        assert "Paused 'shop-audit'" in run("events_pause", "shop-audit")

    assert PausedSubscription.objects.using("default").exists()  # written where it writes
    assert not PausedSubscription.objects.using("other").exists()


@pytest.mark.django_db(databases=["default", "other"])
def test_an_explicit_database_wins_over_the_routers() -> None:
    from django.test import override_settings

    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]), shop_wiring():
        on_default = _record("default", status="pending")
        elsewhere = _record("other", status="pending")

        out = run("events_relay", "--database", "default")

    assert out == "Relayed 1 event(s); 0 still pending.\n"
    assert EventRecord.objects.using("default").get(pk=on_default.pk).status == "dispatched"
    assert EventRecord.objects.using("other").get(pk=elsewhere.pk).status == "pending"


@pytest.mark.django_db(databases=["default", "other"])
def test_the_beat_tasks_use_the_database_the_routers_give_the_event_log() -> None:
    """``django_events.relay`` and ``django_events.prune`` (Celery beat) follow the routers;
    their ``database`` argument, as ``--database``, wins."""
    from django.test import override_settings

    from django_events.tasks import prune, relay
    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]), shop_wiring():
        pending = _record("other", status="pending")
        old = _record("other", days=40)  # RETENTION: 30 days
        on_default = _record("default", status="pending")

        assert relay() == 1
        assert EventRecord.objects.using("other").get(pk=pending.pk).status == "dispatched"
        assert EventRecord.objects.using("default").get(pk=on_default.pk).status == "pending"
        assert prune() == 1
        assert not EventRecord.objects.using("other").filter(pk=old.pk).exists()

        assert relay(database="default") == 1
        assert prune(database="default") == 0
    assert EventRecord.objects.using("default").get(pk=on_default.pk).status == "dispatched"


@pytest.mark.django_db(databases=["default", "other"])
def test_the_relay_and_pruning_functions_use_the_routers_database_by_default() -> None:
    """What the docs offer to call (wrapping ``prune_retained()`` in a task of Django's Tasks
    framework; ``relay_pending()``): without ``using``, the routers' alias too."""
    from django.test import override_settings

    from django_events.operations.pruning import prune_events, prune_retained
    from django_events.operations.relay import recover_dead_runs, relay_backlog, relay_pending
    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]), shop_wiring():
        _record("other", status="pending")
        _record("other", status="pending")
        _record("other", days=40)
        _record("other", days=2)
        _audit_delivery("running")("other")
        Delivery.objects.using("other").update(updated_at=timezone.now() - timedelta(hours=2))

        assert recover_dead_runs(older_than=3600).interrupted == 1
        assert relay_pending(batch_size=1).sent == 1
        assert relay_backlog().sent == 1
        assert prune_retained().events == 1
        assert prune_events(timedelta(days=1)).events == 1
    assert Delivery.objects.using("other").get().status == "failed"
    assert _event_log_rows("default") == 0


@pytest.mark.django_db(databases=["default", "other"])
def test_the_pausing_functions_use_the_routers_database_by_default() -> None:
    """Without ``using``, pausing and resuming work where the routers put the event log (as
    the relay and pruning functions do); ``is_paused`` and ``pause_state``, which only read,
    where the routers read it."""
    from django.test import override_settings

    from django_events.operations.pausing import (
        deliver_orphaned_held,
        endpoint_deleted,
        held,
        is_paused,
        pause,
        pause_state,
        resume,
    )
    from tests.routers import EventLogElsewhere

    endpoint_id = uuid.uuid4()
    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]), shop_wiring():
        _audit_delivery("held")("other")
        record = _record("other")
        endpoint_row = delivery(record.pk, f"endpoint:{endpoint_id}", "webhook", "held", 0)
        save_deliveries("other", [endpoint_row])

        assert pause("shop-audit") is True
        assert is_paused("shop-audit")
        assert pause_state()["shop-audit"] == {"paused": True, "held": 1}
        assert held("shop-audit").count() == 1
        assert resume("shop-audit").succeeded == 1
        assert endpoint_deleted(endpoint_id) == 1

        _audit_delivery("held")("other")  # held as a resume ran: the relay delivers it
        Delivery.objects.using("other").filter(status="held").update(
            updated_at=timezone.now() - timedelta(hours=1)
        )
        assert deliver_orphaned_held().succeeded == 1
    rows = Delivery.objects.using("other").values_list("subscription", "status")
    assert sorted(rows) == [
        (f"endpoint:{endpoint_id}", "failed"),
        ("shop-audit", "succeeded"),
        ("shop-audit", "succeeded"),
    ]
    assert _event_log_rows("default") == 0


@pytest.mark.django_db(databases=["default", "other"])
def test_retry_replay_and_their_reads_use_the_routers_database_by_default() -> None:
    """``select_failures`` (what ``retry_failures`` retries), ``replay_events``,
    ``record_interrupted``, ``held_deliveries`` and ``pending_of_newer_versions`` without
    ``using``: the routers' alias."""
    from django.test import override_settings

    from django_events.operations.interrupted import record_interrupted
    from django_events.operations.relay import pending_of_newer_versions
    from django_events.operations.replay import replay_events
    from django_events.operations.retrying import (
        held_deliveries,
        retry_failures,
        select_failures,
    )
    from tests.routers import EventLogElsewhere

    with override_settings(DATABASE_ROUTERS=[EventLogElsewhere()]), shop_wiring():
        _audit_delivery("failed")("other")
        _audit_delivery("running")("other")
        _audit_delivery("held")("other")
        Delivery.objects.using("other").update(updated_at=timezone.now() - timedelta(hours=2))

        failures = select_failures()
        assert failures.db == "other" and failures.count() == 1
        assert retry_failures(failures).succeeded == 1
        assert record_interrupted(older_than=3600) == 1
        assert [row["held"] for row in held_deliveries()] == [1]
        matched, replayed = replay_events("shop-audit", events=["shop.refunded"])
        assert (matched, replayed.succeeded) == (3, 3)

        newer = _record("other", status="pending")
        EventRecord.objects.using("other").filter(pk=newer.pk).update(version=2)
        assert pending_of_newer_versions(timezone.now()) == 1
    assert _event_log_rows("default") == 0


def test_events_relay_loop_stops_on_a_database_without_the_event_log(tmp_path) -> None:
    """Not migrated (or the log is on another alias): no outage to wait out, for good."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # SQLite
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DJANGO_EVENTS_WORKER_DB_NAME=str(tmp_path / "empty.sqlite3"),
    )
    relay = subprocess.run(
        [sys.executable, "-m", "django", "events_relay", "--loop", "--interval", "0.2"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert relay.returncode == 1, relay.stderr
    assert "The database 'default' has no django_events tables" in relay.stderr
    assert "migrate --database default" in relay.stderr


def _sigint_as_at_a_terminal() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then installs its Ctrl+C handler


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_events_relay_loop_stops_on_ctrl_c_or_sigterm_with_a_line_and_status_0(stop: str) -> None:
    """Ctrl+C is how a loop is stopped by hand: no KeyboardInterrupt traceback, and status 0
    as Django's runserver and a Celery worker's warm shutdown exit. SIGTERM is how systemd,
    Docker and Kubernetes stop it: it exited 143 (killed by the signal) without the line."""
    import os
    import select
    import signal
    import subprocess
    import sys
    from pathlib import Path

    record = pending("orders.placed", {"order_id": 1, "total": 1.0})
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_EVENTS_WORKER_DB_NAME": connection.settings_dict["NAME"],
    }
    command = [sys.executable, "-m", "django", "events_relay", "--loop", "--interval", "0.2"]
    relay = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As at a terminal. A test run in the background (run_tests.sh runs passes beside each
        # other) inherits SIGINT ignored, as a shell sets for its background commands; the
        # relay would inherit that, and Ctrl+C would not reach it.
        preexec_fn=_sigint_as_at_a_terminal,
    )
    try:
        assert relay.stdout is not None
        ready, _, _ = select.select([relay.stdout], [], [], 30)
        assert ready, "the loop printed nothing in 30 s"
        first = relay.stdout.readline()  # a pass ran: the loop is going
        # The broker refused nothing: no "0 not taken by the broker (left pending)".
        assert first == "Relayed 1 event(s).\n", first
        relay.send_signal(getattr(signal, stop))
        out, err = relay.communicate(timeout=30)
    finally:
        relay.kill()
        relay.wait()

    assert (relay.returncode, out, err) == (0, "Stopped.\n", "")
    assert EventRecord.objects.get(pk=record.pk).status == "dispatched"


@pytest.mark.django_db(transaction=True)
def test_a_relay_asked_to_stop_ends_after_the_batch_under_way() -> None:
    """What SIGTERM asks of a loop's pass: the batch under way is sent and marked, the rest
    is left pending for the next run (nothing half-done)."""
    from django_events.operations.relay import relay_backlog

    records = [pending("orders.placed", {"order_id": n, "total": 1.0}) for n in range(3)]
    asked: list[bool] = []

    def stop() -> bool:
        asked.append(True)
        return True

    result = relay_backlog(batch_size=1, stop=stop)

    assert (result.sent, len(asked)) == (1, 1)
    statuses = [EventRecord.objects.get(pk=r.pk).status for r in records]
    assert statuses == ["dispatched", "pending", "pending"]
