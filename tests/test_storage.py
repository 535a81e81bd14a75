"""django_events.delivery.postgresql: each hand-written statement writes what the ORM writes.

For each statement: the same rows written once by it and once by the ORM call it stands
for, then every column compared (the delivery ids aside: a sequence gives those).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from django.db import DataError, connection
from django.test.utils import CaptureQueriesContext

from django_events.delivery import postgresql, recording
from django_events.delivery.recording import delivery, record_for
from django_events.events import Event
from django_events.models import Delivery, EventRecord

pytestmark = [pytest.mark.postgresql, pytest.mark.django_db(transaction=True)]


def events() -> list[Event[Any]]:
    first = uuid.uuid4()
    data = {"quote": 'it\'s "quoted" \\ back', "unicode": "é 中 🎉", "n": 1.5, "deep": {"a": [1]}}
    return [
        Event(
            first,
            "shop.placed",
            data,
            {"tenant": "t'1"},
            datetime(
                2026, 12, 3, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))
            ),
            first,
            None,
            data,
            2,
        ),
        Event(
            uuid.uuid4(),
            "shop.paid",
            {},
            {},
            datetime.now(UTC),
            first,
            first,
            {},
            1,
        ),
    ]


def rows(model: type[Any], *exclude: str) -> list[dict[str, Any]]:
    return (
        [
            {k: v for k, v in row.items() if k not in exclude}
            for row in model.objects.order_by("created_at", "subscription", "pk").values()
        ]
        if model is Delivery
        else [
            {k: v for k, v in row.items() if k not in exclude}
            for row in model.objects.order_by("pk").values()
        ]
    )


def test_insert_records_writes_what_bulk_create_writes() -> None:
    batch = [
        (event, status) for event, status in zip(events(), ["pending", "dispatched"], strict=True)
    ]

    postgresql.insert_records(connection, batch)
    ours = rows(EventRecord, "created_at")
    EventRecord.objects.all().delete()
    EventRecord.objects.bulk_create([record_for(e, s) for e, s in batch])

    assert ours == rows(EventRecord, "created_at")
    assert ours[0]["payload"] == batch[0][0].data or ours[1]["payload"] == batch[0][0].data


@pytest.mark.parametrize("binding", ["client", "server"])
@pytest.mark.parametrize("index", [0, 1])
def test_one_record_is_inserted_as_bulk_create_writes_it(index: int, binding: str) -> None:
    """One record (a publish()) goes in as plain VALUES, not the batch's JSON document; with
    Django's server-side binding (``OPTIONS["server_side_binding"]``) as with client-side."""
    event, status = events()[index], ["pending", "dispatched"][index]
    writer = connection.copy()
    writer.settings_dict["OPTIONS"] = {
        **writer.settings_dict.get("OPTIONS", {}),
        "server_side_binding": binding == "server",
    }
    try:
        with CaptureQueriesContext(writer) as queries:
            postgresql.insert_records(writer, [(event, status)])
    finally:
        writer.close()
    ours = rows(EventRecord, "created_at")
    EventRecord.objects.all().delete()
    EventRecord.objects.bulk_create([record_for(event, status)])

    assert ours == rows(EventRecord, "created_at")
    assert ours[0]["payload"] == event.data
    assert "VALUES" in queries[0]["sql"]
    assert "jsonb_to_recordset" not in queries[0]["sql"]


def test_one_record_with_a_name_too_long_for_its_column_is_refused_not_cut() -> None:
    event = events()[0]
    long = Event(event.id, "n" * 300, {}, {}, event.occurred_at, event.id, None, {})

    with pytest.raises(DataError, match="too long"):
        postgresql.insert_records(connection, [(long, "pending")])
    assert not EventRecord.objects.exists()


def test_mark_dispatched_writes_what_queryset_update_writes() -> None:
    batch = events()
    EventRecord.objects.bulk_create([record_for(e, "pending") for e in batch])
    now = datetime.now(UTC)

    postgresql.mark_dispatched(connection, [batch[0].id], now)
    ours = rows(EventRecord)
    EventRecord.objects.update(status="pending", dispatched_at=None)
    EventRecord.objects.filter(pk__in=[batch[0].id]).update(status="dispatched", dispatched_at=now)

    assert ours == rows(EventRecord)
    assert sorted(r["status"] for r in ours) == ["dispatched", "pending"]


def test_upsert_delivery_inserts_and_replaces_an_outcome_as_bulk_create_does() -> None:
    event = events()[0]
    EventRecord.objects.create(
        **{
            f: getattr(record_for(event, "pending"), f)
            for f in ("id", "name", "payload", "headers", "occurred_at", "correlation_id", "status")
        }
    )
    first = delivery(event.id, "sub'1", "async", "pending", 1, "Boom: it's ¡bad!", "tb")
    then = delivery(event.id, "sub'1", "async", "succeeded", 2)
    then.retry_at = None

    def orm(row: Delivery) -> None:
        Delivery.objects.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["event", "subscription"],
            update_fields=list(postgresql.OUTCOME_FIELDS),
        )

    written = []
    for write in (lambda row: postgresql.upsert_delivery(connection, row), orm):
        Delivery.objects.all().delete()
        first.pk = then.pk = None
        first.retry_at = datetime.now(UTC)
        write(first)
        # The times are the writes' own (auto_now): compared below, not across writes.
        after_insert = rows(Delivery, "id", "created_at", "updated_at", "retry_at")
        inserted_at = Delivery.objects.get().updated_at
        write(then)
        written.append((after_insert, rows(Delivery, "id", "created_at", "updated_at")))
        assert Delivery.objects.get().updated_at > inserted_at

    assert written[0] == written[1]
    assert [r["status"] for r in written[0][1]] == ["succeeded"]
    assert written[0][1][0]["retry_at"] is None  # a new outcome clears a pending retry


def test_insert_successes_writes_what_bulk_create_writes_and_keeps_existing_rows() -> None:
    batch = events()
    EventRecord.objects.bulk_create([record_for(e, "dispatched") for e in batch])
    at = time.time()
    # An async delivery's success, a webhook's (with its answer), and one already recorded.
    successes = [
        (batch[0].id, "a-sub", at, None, 1.25),
        (batch[0].id, "hook-sub", at, (204, 17, 'it\'s "ok" é'), None),
        (batch[1].id, "it's-sub", at, None, 0.5),
    ]
    kept = delivery(batch[1].id, "it's-sub", "async", "failed", 3, "later run")

    written = []
    for write in ("ours", "orm"):
        Delivery.objects.all().delete()
        Delivery.objects.bulk_create(
            [delivery(batch[1].id, "it's-sub", "async", "failed", 3, "later run")]
        )
        if write == "ours":
            postgresql.insert_successes(connection, successes)
        else:
            when = datetime.fromtimestamp(at, UTC)
            Delivery.objects.bulk_create(
                [
                    Delivery(
                        event_id=e,
                        subscription=s,
                        created_at=when,
                        updated_at=when,
                        duration_ms=took,
                        **dict(postgresql.SUCCESS_LITERALS),
                        **postgresql.answer_fields(answer),
                    )
                    for e, s, _, answer, took in successes
                ],
                ignore_conflicts=True,
            )
        written.append(
            sorted(
                (
                    tuple(r[k] for k in sorted(r) if k not in ("id", "created_at", "updated_at"))
                    for r in Delivery.objects.values()
                ),
                key=repr,  # None and numbers side by side (duration_ms)
            )
        )
        times = list(
            Delivery.objects.filter(subscription="a-sub").values_list("created_at", "updated_at")
        )
        assert abs(times[0][0].timestamp() - at) < 1e-5 and times[0][0] == times[0][1]

    assert written[0] == written[1]
    stored = {r.subscription: r for r in Delivery.objects.all()}
    assert (stored["it's-sub"].status, stored["it's-sub"].last_error) == ("failed", kept.last_error)
    hook = stored["hook-sub"]
    assert (hook.mode, hook.response_status, hook.response_ms) == ("webhook", 204, 17)
    assert hook.response_body == 'it\'s "ok" é' and hook.status == "succeeded"
    assert (stored["a-sub"].mode, stored["a-sub"].response_status) == ("async", None)
    assert (stored["a-sub"].duration_ms, hook.duration_ms) == (1.25, None)


@pytest.mark.parametrize("read", ["statement", "function"])
def test_turn_and_first_unfinished_read_what_the_orm_reads(read: str) -> None:
    """The turn as a statement (in a transaction, before migration 0013) and through that
    migration's function (a worker), whose finished statuses are written out."""
    from django.db.models import Exists

    from django_events.delivery import ordering

    records = []
    for _ in range(8):
        event_id = uuid.uuid4()
        event = Event(event_id, "shop.paid", {}, {}, datetime.now(UTC), event_id, None, {}, 1)
        records.append(record_for(event, "dispatched"))
    EventRecord.objects.bulk_create(records)
    statuses = ["succeeded", "failed", "resolved", "held", "pending", "pending"]
    layout = [  # (subscription, key, number, status) of each event's delivery
        *[("ordered", "k", n, status) for n, status in enumerate(statuses, start=1)],
        ("ordered", "other", 1, "held"),
        ("plain", None, None, "pending"),
    ]
    for record, (name, key, number, status) in zip(records, layout, strict=True):
        row = delivery(record.pk, name, "async", status, 1)
        row.ordering_key, row.sequence = key, number
        row.save()
    finished = recording.FINISHED

    def turn(event_id: uuid.UUID, name: str, lock: int | None = None) -> Any:
        if read == "function":
            return postgresql.ordered_turn(connection, event_id, name, lock)
        return postgresql.turn(connection, event_id, name, finished, lock)

    for record, (name, _, _, _) in zip(records, layout, strict=True):
        by_orm = (
            Delivery.objects.filter(event_id=record.pk, subscription=name)
            .annotate(waits=Exists(ordering._unfinished_before("default", name)))
            .values_list("ordering_key", "sequence", "status", "waits")
            .first()
        )
        assert turn(record.pk, name) == (*by_orm, None)
    assert turn(uuid.uuid4(), "ordered") is None
    # With a run's lock: tried (and taken) only for a numbered delivery that runs now,
    # unfinished with nothing unfinished before it.
    locked = []
    for n, (record, (name, key, number, _)) in enumerate(zip(records, layout, strict=True)):
        took = turn(record.pk, name, 1000 + n)
        assert took is not None
        if took[4] is not None:
            locked.append((key, number, took[4]))
    assert locked == [("k", 2, True), ("other", 1, True)]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock_all()")
    for key in ("k", "other", "none"):
        by_orm = (
            Delivery.objects.filter(
                subscription="ordered", ordering_key=key, sequence__isnull=False
            )
            .exclude(status__in=finished)
            .order_by("sequence")
            .values_list("pk", "status")
            .first()
        )
        assert postgresql.first_unfinished(connection, "ordered", key, finished) == by_orm
    assert postgresql.first_unfinished(connection, "ordered", "k", finished) == (
        Delivery.objects.get(subscription="ordered", ordering_key="k", sequence=2).pk,
        "failed",
    )


def test_hand_on_changes_what_the_orm_changes() -> None:
    from django_events.delivery import ordering

    finished = recording.FINISHED
    layouts = {  # key -> statuses of its deliveries, numbered from 1
        "held-head": ["succeeded", "held", "held"],
        "pending-head": ["resolved", "pending", "held"],
        "failed-head": ["failed", "held"],
        "all-done": ["succeeded", "resolved"],
    }
    now = datetime(2026, 12, 4, 5, 0, tzinfo=UTC)
    due = now + timedelta(seconds=ordering.HAND_ON_GRACE)

    def lay_out() -> None:
        Delivery.objects.all().delete()
        EventRecord.objects.all().delete()
        for key, statuses in layouts.items():
            for number, status in enumerate(statuses, start=1):
                event_id = uuid.uuid4()
                event = Event(event_id, "shop.paid", {}, {}, now, event_id, None, {}, 1)
                record_for(event, "dispatched").save()
                row = delivery(event_id, "ordered", "async", status, 1)
                row.ordering_key, row.sequence = key, number
                row.save()
        Delivery.objects.update(updated_at=now - timedelta(hours=1))

    def state() -> list[tuple[Any, ...]]:
        return list(
            Delivery.objects.order_by("ordering_key", "sequence").values_list(
                "ordering_key", "sequence", "status", "retry_at", "updated_at"
            )
        )

    written: list[tuple[list[Any], list[tuple[Any, ...]]]] = []
    for by_hand in (True, False):
        lay_out()
        handed = []
        for key in [*layouts, "no-such-key"]:
            if by_hand:
                handed.append(postgresql.hand_on(connection, "ordered", key, finished, due, now))
            else:
                handed.append(ordering._held_to_pending("default", "ordered", key, due, now))
        numbers = [
            None if pk is None else Delivery.objects.values_list("sequence", flat=True).get(pk=pk)
            for pk in handed
        ]
        written.append((numbers, state()))

    assert written[0] == written[1]
    numbers, rows = written[0]
    assert numbers == [2, None, None, None, None]  # only a held head is handed on
    held_head = [row[1:] for row in rows if row[0] == "held-head"]
    assert [row[:2] for row in held_head] == [(1, "succeeded"), (2, "pending"), (3, "held")]
    assert held_head[1][2:] == (due, now)  # due for the relay, in case its send never happens


def test_hold_changes_what_the_orm_changes() -> None:
    from django_events.delivery import ordering

    finished = recording.FINISHED
    statuses = ["succeeded", "failed", "pending", "resolved", "pending"]  # numbered from 1
    now = datetime(2026, 12, 5, 22, 0, tzinfo=UTC)

    def lay_out() -> list[uuid.UUID]:
        Delivery.objects.all().delete()
        EventRecord.objects.all().delete()
        ids = []
        for number, status in enumerate(statuses, start=1):
            event_id = uuid.uuid4()
            event = Event(event_id, "shop.paid", {}, {}, now, event_id, None, {}, 1)
            record_for(event, "dispatched").save()
            row = delivery(event_id, "ordered", "async", status, 1)
            row.ordering_key, row.sequence, row.retry_at = "k", number, now
            row.save()
            ids.append(event_id)
        Delivery.objects.update(updated_at=now - timedelta(hours=1))
        return ids

    def state() -> list[tuple[Any, ...]]:
        return list(
            Delivery.objects.order_by("sequence").values_list(
                "sequence", "status", "retry_at", "updated_at"
            )
        )

    written: list[tuple[list[bool], list[tuple[Any, ...]]]] = []
    for by_hand in (True, False):
        ids = lay_out()
        held = []
        # From the last: each hold is decided on the statuses laid out, none held before it.
        for number, event_id in reversed(list(enumerate(ids, start=1))):
            if by_hand:
                held.append(
                    postgresql.hold(connection, event_id, "ordered", "k", number, finished, now)
                )
            else:
                held.append(
                    ordering._held_if_waiting("default", event_id, "ordered", "k", number, now)
                )
        written.append((held, state()))

    assert written[0] == written[1]
    held, rows = written[0]
    assert held == [True, True, True, False, False]  # 5, 4 and 3 wait (2 failed); 2 and 1 not
    assert [row[1:] for row in rows[:2]] == [
        ("succeeded", now, now - timedelta(hours=1)),
        ("failed", now, now - timedelta(hours=1)),
    ]
    assert [row[1:] for row in rows[2:]] == [("held", None, now)] * 3


def test_take_numbers_and_insert_numbered_write_what_the_orm_writes() -> None:
    from django_events.delivery import ordering
    from django_events.models import OrderingGate

    now = datetime(2026, 12, 4, 5, 0, tzinfo=UTC)
    ids = []
    for _ in range(4):
        event_id = uuid.uuid4()
        record_for(Event(event_id, "shop.paid", {}, {}, now, event_id, None, {}, 1), "x").save()
        ids.append(event_id)
    # Three transactions' worth: the later add to the gates the first created; the last takes
    # two numbers of one gate (publish_many() of one key: its gate's statement for one row).
    batches = [
        [("sub", "b", 2), ("sub", "a", 1)],
        [("sub", "a", 3), ("hook", "it's", 1)],
        [("sub", "b", 2)],
    ]
    rows = [(ids[0], "sub", "async", "a", 1), (ids[1], "hook", "webhook", "it's", 1)]

    written = []
    for by_hand in (True, False):
        OrderingGate.objects.all().delete()
        Delivery.objects.all().delete()
        taken = []
        for batch in batches:
            if by_hand:
                taken.append(postgresql.take_numbers(connection, batch))
            else:
                taken.append({(s, k): ordering._take("default", s, k, n) for s, k, n in batch})
        if by_hand:
            postgresql.insert_numbered(connection, rows, now)
        else:
            made = []
            for event_id, name, mode, key, number in rows:
                row = delivery(event_id, name, mode, Delivery.Status.PENDING, 0)
                row.ordering_key, row.sequence, row.created_at, row.updated_at = (
                    key,
                    number,
                    now,
                    now,
                )
                made.append(row)
            Delivery.objects.bulk_create(made)
        gates = list(
            OrderingGate.objects.order_by("subscription", "key").values_list(
                "subscription", "key", "last_sequence"
            )
        )
        fields = [f.attname for f in Delivery._meta.concrete_fields if not f.primary_key]
        stored = list(Delivery.objects.order_by("subscription").values_list(*fields))
        written.append((taken, gates, stored))

    assert written[0] == written[1]
    taken, gates, _ = written[0]
    assert taken == [
        {("sub", "a"): 1, ("sub", "b"): 2},
        {("sub", "a"): 4, ("hook", "it's"): 1},
        {("sub", "b"): 4},
    ]
    assert gates == [("hook", "it's", 1), ("sub", "a", 4), ("sub", "b", 4)]


@pytest.mark.parametrize("binding", ["client", "server"])
def test_one_ordered_delivery_is_numbered_and_inserted_as_the_orm_writes_it(binding: str) -> None:
    """One gate and one row (a publish() of one ordered event) go in as plain VALUES, not the
    batch's JSON document; with Django's server-side binding as with client-side."""
    from django_events.delivery import ordering
    from django_events.models import OrderingGate

    now = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)
    event_id = uuid.uuid4()
    record_for(Event(event_id, "shop.paid", {}, {}, now, event_id, None, {}, 1), "x").save()
    writer = connection.copy()
    writer.settings_dict["OPTIONS"] = {
        **writer.settings_dict.get("OPTIONS", {}),
        "server_side_binding": binding == "server",
    }
    try:
        with CaptureQueriesContext(writer) as queries:
            taken = [postgresql.take_numbers(writer, [("sub", "it's", 2)]) for _ in range(2)]
            postgresql.insert_numbered(writer, [(event_id, "sub", "async", "it's", 4)], now)
    finally:
        writer.close()
    fields = [f.attname for f in Delivery._meta.concrete_fields if not f.primary_key]
    ours = (taken, list(OrderingGate.objects.values_list("subscription", "key", "last_sequence")))
    ours_rows = list(Delivery.objects.values_list(*fields))
    OrderingGate.objects.all().delete()
    Delivery.objects.all().delete()
    by_orm = [{("sub", "it's"): ordering._take("default", "sub", "it's", 2)} for _ in range(2)]
    row = delivery(event_id, "sub", "async", Delivery.Status.PENDING, 0)
    row.ordering_key, row.sequence, row.created_at, row.updated_at = "it's", 4, now, now
    row.save()

    assert ours == (by_orm, [("sub", "it's", 4)])
    assert by_orm == [{("sub", "it's"): 2}, {("sub", "it's"): 4}]
    assert ours_rows == list(Delivery.objects.values_list(*fields))
    assert [("VALUES" in q["sql"], "jsonb_to_recordset" in q["sql"]) for q in queries] == [
        (True, False)
    ] * 3


def test_finish_ordered_writes_what_the_orm_writes() -> None:
    from django.db import transaction

    from django_events.delivery import ordering

    now = datetime(2026, 12, 4, 5, 0, tzinfo=UTC)
    due = now + timedelta(seconds=ordering.HAND_ON_GRACE)
    layouts = {  # key -> statuses of its deliveries, numbered from 1; the first is finished
        "next-held": ["pending", "held", "held"],
        "next-pending": ["pending", "pending"],
        "retried": ["failed", "held"],
        "alone": ["pending"],
    }

    def lay_out() -> dict[str, uuid.UUID]:
        Delivery.objects.all().delete()
        EventRecord.objects.all().delete()
        firsts = {}
        for key, statuses in layouts.items():
            for number, status in enumerate(statuses, start=1):
                event_id = uuid.uuid4()
                event = Event(event_id, "shop.paid", {}, {}, now, event_id, None, {}, 1)
                record_for(event, "dispatched").save()
                row = delivery(event_id, "ordered", "async", status, 1, error="boom")
                row.ordering_key, row.sequence = key, number
                row.save()
                firsts.setdefault(key, event_id)
        Delivery.objects.update(created_at=now, updated_at=now - timedelta(hours=1))
        return firsts

    def success(event_id: uuid.UUID) -> Delivery:
        row = delivery(event_id, "ordered", "async", "succeeded", 3, duration_ms=1.5, uncounted=1)
        row.created_at = row.updated_at = now
        return row

    written = []
    for by_function in (True, False):
        firsts = lay_out()
        handed = []
        for key, event_id in firsts.items():
            if by_function:
                lock = ordering._lock_id("ordered", key)
                pk = postgresql.finish_ordered(connection, success(event_id), key, lock, due)
            else:
                with transaction.atomic():
                    ordering._lock("default", "ordered", key)
                    Delivery.objects.bulk_create(
                        [success(event_id)],
                        update_conflicts=True,
                        unique_fields=["event", "subscription"],
                        update_fields=list(postgresql.OUTCOME_FIELDS),
                    )
                    pk = ordering._held_to_pending("default", "ordered", key, due, now)
            handed.append(
                None
                if pk is None
                else Delivery.objects.values_list("sequence", flat=True).get(pk=pk)
            )
        fields = [
            f.attname for f in Delivery._meta.concrete_fields if f.attname not in ("id", "event_id")
        ]
        rows = list(Delivery.objects.order_by("ordering_key", "sequence").values_list(*fields))
        written.append((handed, rows))

    assert written[0] == written[1]
    handed, rows = written[0]
    assert handed == [2, None, 2, None]  # a held next only, after a pending or failed first
    by_key = {(r[fields.index("ordering_key")], r[fields.index("sequence")]): r for r in rows}
    first = by_key["next-held", 1]
    assert first[fields.index("status")] == "succeeded" and first[fields.index("last_error")] == ""
    assert by_key["next-held", 2][fields.index("status")] == "pending"
    assert by_key["next-held", 2][fields.index("retry_at")] == due
    assert by_key["next-held", 3][fields.index("status")] == "held"


def test_finish_ordered_from_a_worker_of_the_release_before_keeps_uncounted(monkeypatch) -> None:
    # A rolling deploy: an old worker's outcome has no "uncounted" (migration 0012's column).
    # A new row gets 0, an existing one keeps its count, as that worker's plain upsert does.
    import json

    from django_events.delivery import ordering

    now = datetime(2026, 12, 5, 5, 0, tzinfo=UTC)
    old_json = json.dumps
    monkeypatch.setattr(
        postgresql.json,
        "dumps",
        lambda values, **kw: old_json({k: v for k, v in values.items() if k != "uncounted"}, **kw),
    )
    kept, new = uuid.uuid4(), uuid.uuid4()
    for event_id in (kept, new):
        event = Event(event_id, "shop.paid", {}, {}, now, event_id, None, {}, 1)
        record_for(event, "dispatched").save()
    row = delivery(kept, "ordered", "async", "pending", 4, uncounted=3)
    row.ordering_key, row.sequence = "k", 1
    row.save()

    for event_id, number in ((kept, 1), (new, 2)):
        done = delivery(event_id, "ordered", "async", "succeeded", 5, uncounted=9)
        done.ordering_key, done.sequence = "k", number
        lock = ordering._lock_id("ordered", "k")
        postgresql.finish_ordered(connection, done, "k", lock, now)

    stored = dict(Delivery.objects.values_list("event_id", "uncounted"))
    assert stored == {kept: 3, new: 0}
    assert set(Delivery.objects.values_list("status", "attempts")) == {("succeeded", 5)}
