"""Publishing in the caller's process: figures 1, 2, 3 and 5."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone
from jsonschema import Draft202012Validator

from django_events import publish, publish_many
from django_events.delivery import marking
from django_events.delivery.broker import send_deliveries
from django_events.delivery.messages import event_body
from django_events.delivery.sealing import open_event, seal_event
from django_events.events import Event
from django_events.wiring.registry import get_registry

from . import celery_app
from .harness import Baseline, Comparison, Target, compare, per_op, single
from .models import HandOutbox, Order


@dataclass(frozen=True)
class Context:
    """What every benchmark module gets from the runner."""

    smoke: bool
    repeat: int
    run_id: str
    relay_records: int = 100_000
    deliveries: int = 100_000

    def count(self, full: int) -> int:
        return 2 if self.smoke else full

    def payload(self, i: int = 1, note: str | None = None) -> dict[str, Any]:
        # "note" names the Redis counter the handlers bump (figures 4 and 7 wait on it).
        return {
            "order_id": i,
            "total": 12.5,
            "email": "a@example.com",
            "note": note or self.counter,
        }

    @property
    def counter(self) -> str:
        return f"bench:{self.run_id}:count"

    @property
    def sink(self) -> str:
        """The queue of the baselines' messages (nobody consumes it during these figures)."""
        return f"bench-sink-{self.run_id}"


def _noop_receiver(sender: Any, **kwargs: Any) -> None:
    pass


def _noop(payload: dict[str, Any]) -> None:
    pass


def figure_1_loops(payload: dict[str, Any]) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """Figure 1's two loops: ``publish()`` with one sync subscription, no record, outside a
    transaction; ``Signal.send`` + ``on_commit`` (also counted by benchmarks/instructions.py)."""
    signal = Signal()
    signal.connect(_noop_receiver, weak=False)

    def ours(count: int) -> None:
        for _ in range(count):
            publish("bench.sync", payload)

    def baseline(count: int) -> None:
        for _ in range(count):
            signal.send(sender=None, payload=payload)
            transaction.on_commit(partial(_noop, payload))

    return ours, baseline


def figure_1(ctx: Context) -> Comparison:
    """publish() with one sync subscription, no record, outside a transaction."""
    n = ctx.count(2000)
    ours, baseline = figure_1_loops(ctx.payload())
    return compare(
        "1",
        "publish(), 1 sync subscription, no record",
        "us",
        partial(per_op, ours, n),
        [Baseline("Signal.send + on_commit", partial(per_op, baseline, n), Target(3))],
        ctx.repeat,
    )


def _send_and_mark(row_id: uuid.UUID, payload: dict[str, Any], queue: str) -> None:
    celery_app.amqp.send_task(celery_app.RAW_TASK, args=(payload,), queue=queue)
    HandOutbox.objects.filter(pk=row_id).update(sent=True)


def figure_2(ctx: Context) -> Comparison:
    """One async event in atomic() on PostgreSQL until the message is on RabbitMQ."""
    n = ctx.count(100)
    payload = ctx.payload()
    from django_celery_outbox.relay import Relay, RelayConfig

    relay = Relay(app=celery_app.peer, config=RelayConfig.init(batch_size=100, idle_time=0))
    peer_task = celery_app.peer.tasks[celery_app.RAW_TASK]
    raw_task = celery_app.amqp.tasks[celery_app.RAW_TASK]

    def ours_with_order(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                Order.objects.create(total=12.5, created_at=timezone.now())
                publish("bench.async", payload)
        marking.flush()

    def bare(count: int) -> None:
        # What most code does by hand; it loses the event if the broker is down at commit.
        for _ in range(count):
            with transaction.atomic():
                Order.objects.create(total=12.5, created_at=timezone.now())
                transaction.on_commit(lambda: raw_task.apply_async((payload,), queue=ctx.sink))

    # Timed until the background marker wrote its last mark too (its confirms and UPDATEs).
    def ours(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                publish("bench.async", payload)
        marking.flush()

    def outbox(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                row = HandOutbox.objects.create(
                    task=celery_app.RAW_TASK, payload=payload, created_at=timezone.now()
                )
                transaction.on_commit(partial(_send_and_mark, row.pk, payload, ctx.sink))

    def peer(count: int) -> None:
        for _ in range(count):
            with transaction.atomic():
                peer_task.apply_async((payload,), queue=ctx.sink)
            relay._processing()  # one relay pass: select, publish, delete (its handoff)

    # The caller's transaction writes its own row on both sides: an empty atomic() never
    # reaches the database, and what publish() costs a transaction is the question.
    against_bare = compare(
        "2",
        "an order row + publish() in atomic(), PostgreSQL + RabbitMQ, until sent",
        "us",
        partial(per_op, ours_with_order, n),
        [
            Baseline(
                "an order row + on_commit(apply_async), no outbox (loses events)",
                partial(per_op, bare, n),
                Target(1.3),
            )
        ],
        ctx.repeat,
    )
    against_outboxes = compare(
        "2",
        "publish() in atomic(), PostgreSQL + RabbitMQ, until handed to the broker",
        "us",
        partial(per_op, ours, n),
        [
            Baseline("hand-written outbox", partial(per_op, outbox, n), Target(1.2)),
            Baseline("django-celery-outbox", partial(per_op, peer, n), Target(1.0)),
        ],
        ctx.repeat,
    )
    return Comparison(
        against_bare.met and against_outboxes.met,
        against_outboxes.ours,
        against_bare.baselines + against_outboxes.baselines,
    )


def figure_3(ctx: Context) -> Comparison:
    """100 events in one transaction: publish_many() against 100 publish() calls."""
    batches = ctx.count(10)
    items = [("bench.async", ctx.payload(i)) for i in range(100)]

    def many(count: int) -> None:
        for _ in range(count // 100):
            with transaction.atomic():
                publish_many(items)

    def calls(count: int) -> None:
        for _ in range(count // 100):
            with transaction.atomic():
                for name, payload in items:
                    publish(name, payload)

    result = compare(
        "3",
        "100 events in one atomic() (per event), publish_many() vs publish() x100",
        "us",
        partial(per_op, many, batches * 100),
        [Baseline("100 publish() calls", partial(per_op, calls, batches * 100), Target(0.3))],
        ctx.repeat,
    )
    # The floor: one Celery task message per (event, subscription) is the contract, and both
    # sides send the same 100; what the batch saves is the database round trips around them.
    compiled = get_registry().event("bench.async")
    now = timezone.now()
    events = [
        Event(i, "bench.async", p, {}, now, i, None, p)
        for i, p in ((uuid.uuid4(), payload) for _, payload in items)
    ]
    outgoing = [(e, True, compiled.async_) for e in events]

    def send_alone(count: int) -> None:
        # As the commit path sends: the confirms and the (here empty) UPDATE left to the
        # background marker, not waited for.
        for _ in range(count // 100):
            send_deliveries(outgoing, "default", marker=marking.marker())

    sends = sorted(per_op(send_alone, 100 * batches) for _ in range(ctx.repeat))
    marking.flush()
    send_us = sends[len(sends) // 2]
    print(
        f" 3. floor: the 100 messages alone (send_deliveries, no database) {send_us:.0f} us per "
        f"event = {send_us / result.baselines[0]:.2f} of the baseline, "
        f"{send_us / result.ours:.0%} of ours",
        flush=True,
    )
    return result


def figure_5(ctx: Context) -> bool:
    """Validation of a 4-field payload on the hot path, against the reference validator."""
    n = ctx.count(20000)
    payload = ctx.payload()
    validator = get_registry().event("bench.async").validator
    reference = Draft202012Validator(settings.SCHEMA)
    ours_us: list[float] = []
    ref_us: list[float] = []
    for _ in range(ctx.repeat):
        ours_us.append(per_op(lambda c: [validator.problems(payload) for _ in range(c)], n))
        ref_us.append(per_op(lambda c: [reference.is_valid(payload) for _ in range(c)], n))
    ours_us.sort()
    ref_us.sort()
    median = ours_us[len(ours_us) // 2]
    return single(
        "5",
        "payload validation, 4-field schema",
        f"ours {median:.2f} us [{ours_us[0]:.2f}-{ours_us[-1]:.2f}] | jsonschema "
        f"Draft202012Validator.is_valid {ref_us[len(ref_us) // 2]:.1f} us | target <= 3 us",
        median <= 3,
    )


def figure_9(ctx: Context) -> Comparison:
    """Sending 100 messages whose event has a redacted field (sealed), against the same
    messages of an event without one."""
    batches = ctx.count(10)
    subscriptions = get_registry().event("bench.async").async_
    now = timezone.now()

    def outgoing(name: str) -> list[tuple[Event, bool, Any]]:
        events = [Event(i, name, p, {}, now, i, None, p) for i, p in _payloads(ctx)]
        return [(e, True, subscriptions) for e in events]

    sealed, plain = outgoing("bench.redacted"), outgoing("bench.async")
    result = compare(
        "9",
        "100 messages of an event with redact (sealed) vs without (per message)",
        "us",
        partial(
            per_op,
            lambda c: [send_deliveries(sealed, "default") for _ in range(c // 100)],
            100 * batches,
        ),
        [
            Baseline(
                "the same without redact",
                partial(
                    per_op,
                    lambda c: [send_deliveries(plain, "default") for _ in range(c // 100)],
                    100 * batches,
                ),
                Target(1.25),
            )
        ],
        ctx.repeat,
    )
    # The worker's side: opening one sealed payload.
    message = seal_event(event_body(sealed[0][0]), ("email",))
    opens = sorted(
        per_op(lambda c: [open_event(message) for _ in range(c)], ctx.count(20000))
        for _ in range(ctx.repeat)
    )
    print(f" 9. a worker opens a sealed payload in {opens[len(opens) // 2]:.1f} us", flush=True)
    return result


def _payloads(ctx: Context) -> list[tuple[uuid.UUID, dict[str, Any]]]:
    return [(uuid.uuid4(), ctx.payload(i)) for i in range(100)]
