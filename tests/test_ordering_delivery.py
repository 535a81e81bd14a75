"""Ordered delivery per key, end to end: two real `celery worker` processes (prefork, 2 each)
on each broker, events published from concurrent transactions (docs/ordering.md)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import StringIO
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.core.management import call_command
from django.db import DatabaseError, connection, connections, transaction
from django.utils import timezone

from django_events import publish, publish_many
from django_events.delivery.broker import send_deliveries
from django_events.events import Event
from django_events.models import Delivery
from django_events.operations.relay import relay_backlog
from django_events.operations.replay import replay_events
from django_events.operations.retrying import held_deliveries, mark_resolved, retry_failures
from django_events.wiring.registry import get_registry
from tests import brokers
from tests.app.models import HandlerRun
from tests.worker import WorkerProcess, wait_for

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

EVENTS = int(os.environ.get("DJANGO_EVENTS_ORDERING_EVENTS", "200"))
KEYS = int(os.environ.get("DJANGO_EVENTS_ORDERING_KEYS", "10"))
# Pool processes SIGKILLed, 0.4 s apart, while deliveries run (scripts/ordering_soak.sh: more).
KILLS = int(os.environ.get("DJANGO_EVENTS_ORDERING_KILLS", "4"))
PUBLISHERS = 4
# A Redis database of its own: the messages a SIGKILLed worker took come back after a short
# visibility_timeout, and kombu keeps its unacknowledged messages per database: a short
# timeout must not hand out anyone else's (as scripts/soak.py does).
REDIS_URL = os.environ.get("DJANGO_EVENTS_ORDERING_REDIS_URL", "redis://127.0.0.1:6379/11")
VISIBILITY_TIMEOUT = "10"
redis_publisher = brokers.make_app("redis", REDIS_URL)  # CELERY_APP of the Redis rig
# The relay's too: it waits that long (and 30 s) after the queue drained before it sends a
# message again that a killed worker may still hold.
redis_publisher.conf.broker_transport_options["visibility_timeout"] = float(VISIBILITY_TIMEOUT)
# Seconds after which the relay beside the workers sends again a key's first delivery that no
# worker touched (its message lost with a killed worker); an hour by default.
RESEND_AFTER = 20.0


@dataclass
class Rig:
    kind: str
    queue: str
    workers: list[WorkerProcess]
    fixed: Path  # DJANGO_EVENTS_ORDERING_FIXED: a file per key whose `fail` is fixed
    faults: Path  # DJANGO_EVENTS_FAULT_DIR: hang_once's marker of each first run

    @property
    def app(self) -> Celery:
        return redis_publisher if self.kind == "redis" else getattr(brokers, self.kind)


def worker_env(kind: str, faults: Path) -> dict[str, str]:
    """The environment of a worker of the ordering tests on broker ``kind``; ``faults``:
    where `hang_once` leaves its markers."""
    return {
        "DJANGO_EVENTS_TEST_MANIFEST": "ordering.yaml",
        # What a worker sends itself (a hand-on) goes to the broker the test publishes to.
        "DJANGO_EVENTS_TEST_CELERY_APP": f"tests.brokers.{kind}",
        "DJANGO_EVENTS_FS_BROKER": str(brokers.FS_FOLDER),
        "DJANGO_EVENTS_FAULT_DIR": str(faults),
    }


@pytest.fixture(scope="module", params=brokers.worker_kinds("filesystem", "amqp", "redis"))
def rig(request, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Rig]:
    kind = request.param
    brokers.require_server(brokers.URLS[kind], kind)
    queue = f"ord-{kind}-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp(f"ordering-{kind}")
    fixed = folder / "fixed"
    fixed.mkdir()
    faults = folder / "faults"
    faults.mkdir()
    env = {**worker_env(kind, faults), "DJANGO_EVENTS_ORDERING_FIXED": str(fixed)}
    if kind == "redis":
        env |= {
            "DJANGO_EVENTS_REDIS_URL": REDIS_URL,
            "DJANGO_EVENTS_REDIS_VISIBILITY_TIMEOUT": VISIBILITY_TIMEOUT,
        }
    workers = [
        WorkerProcess(
            kind,
            queue,
            connection.settings_dict["NAME"],
            folder / f"worker{i}.log",
            extra_env=env,
            node=f"{queue}-{i}",
        )
        for i in range(2)
    ]
    rig = Rig(kind, queue, workers, fixed, faults)
    for worker in workers:
        worker.launch()
    try:
        for worker in workers:
            worker.wait_ready()
        yield rig
    finally:
        for worker in workers:
            worker.stop()
        if kind != "filesystem":
            with rig.app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)


@pytest.fixture
def wired(rig: Rig) -> Iterator[Rig]:
    app = {"CELERY_APP": f"{__name__}.redis_publisher"} if rig.kind == "redis" else {}
    with brokers.delivery_wiring(rig.kind, rig.queue, "ordering.yaml", **app):
        yield rig


def publish_concurrently(event: str, count: int, keys: list[str]) -> list[uuid.UUID]:
    """``count`` events over ``keys`` from `PUBLISHERS` threads, 1-5 events a transaction:
    half the threads call publish() for each, the others publish_many() once (a key's
    events of one batch numbered together, in the batch's order).

    The events of one transaction are in key order: a transaction locks the gates of the
    keys it publishes to as it goes, so two taking them in opposite orders would deadlock
    (docs/ordering.md).
    """
    ids: list[uuid.UUID] = []
    lock = threading.Lock()
    plan = [(random.choice(keys), n) for n in range(count)]
    chunks = [plan[i::PUBLISHERS] for i in range(PUBLISHERS)]
    errors: list[BaseException] = []

    def publisher(chunk: list[tuple[str, int]], batched: bool) -> None:
        try:
            while chunk:
                size = random.randint(1, 5)
                batch, chunk[:] = sorted(chunk[:size]), chunk[size:]
                payloads = [{"account": k, "n": n} for k, n in batch]
                with transaction.atomic():
                    if batched:
                        sent = [e.id for e in publish_many([(event, p) for p in payloads])]
                    else:
                        sent = [publish(event, payload).id for payload in payloads]
                    time.sleep(random.uniform(0, 0.005))  # overlap the transactions
                with lock:
                    ids.extend(sent)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=publisher, args=(chunk, index % 2 == 1))
        for index, chunk in enumerate(chunks)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return ids


def check_order(
    ids: list[uuid.UUID], subscription: str = "ord-steps", *, since: float = 0.0
) -> dict[str, int]:
    """Assert every event ran once (runs started after ``since``), per key in sequence
    order, never two at once; print the counts (the soak run reports them)."""
    rows = Delivery.objects.filter(subscription=subscription, event_id__in=ids)
    sequence = {r.event_id: (r.ordering_key, r.sequence) for r in rows}
    assert len(sequence) == len(ids)
    runs = [
        run
        for run in HandlerRun.objects.filter(handler="ordered_step", event_id__in=ids)
        if run.payload["start"] >= since
    ]
    counts: dict[uuid.UUID, int] = {}
    for run in runs:
        counts[run.event_id] = counts.get(run.event_id, 0) + 1
    lost = [i for i in ids if i not in counts]
    twice = [i for i, c in counts.items() if c > 1]
    by_key: dict[str, list[tuple[int, float, float]]] = {}
    for run in runs:
        key, number = sequence[run.event_id]
        assert key == run.payload["account"]
        by_key.setdefault(key, []).append((number, run.payload["start"], run.payload["end"]))
    out_of_order = 0
    for line in by_key.values():
        line.sort()
        numbers = [n for n, _, _ in line]
        assert numbers == sorted(set(numbers))  # one number per delivery of the key
        out_of_order += sum(1 for a, b in pairwise(line) if b[1] < a[2])
    figures = {"lost": len(lost), "twice": len(twice), "out_of_order": out_of_order}
    print(f"\n{len(ids)} deliveries over {len(by_key)} keys: {figures}")
    assert figures == {"lost": 0, "twice": 0, "out_of_order": 0}
    return figures


def settle(ids: list[uuid.UUID], stall: float = 90, *, relay: bool = True) -> None:
    """Wait until every delivery of ``ids`` succeeded, the relay running beside the workers
    (as in a deployment, with a short `RESEND_AFTER`). Fail once none has succeeded for
    ``stall`` seconds (a stuck key, not a slow host: the relay sends a lost hand-on after
    30 s, a lost first delivery of a key after `RESEND_AFTER`, and on Redis 40 s after the
    queue drained), saying where they are."""
    last, since = -1, time.monotonic()
    while True:
        if relay:
            relay_backlog(min_age=10, resend_after=RESEND_AFTER)
        done = Delivery.objects.filter(
            subscription="ord-steps", event_id__in=ids, status="succeeded"
        ).count()
        if done == len(ids):
            return
        if done != last:
            last, since = done, time.monotonic()
        elif time.monotonic() - since > stall:
            break
        time.sleep(0.1)
    unfinished = Delivery.objects.filter(event_id__in=ids).exclude(status="succeeded")
    print(f"\n{unfinished.count()} unfinished, now {timezone.now()}:")
    for row in unfinished.order_by("ordering_key", "sequence")[:60]:
        print(
            row.ordering_key,
            row.sequence,
            row.status,
            row.attempts,
            row.retry_at,
            row.updated_at,
            row.last_error[:80],
        )
    raise AssertionError(f"no delivery succeeded for {stall}s: {done} of {len(ids)}")


@contextmanager
def relay_beside() -> Iterator[None]:
    """The relay running beside the workers in a thread, as `events_relay --loop` would (a
    pass every half second, with a short `RESEND_AFTER`; a database error waits a pass)."""
    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.wait(0.5):
                try:
                    relay_backlog(min_age=10, resend_after=RESEND_AFTER)
                except DatabaseError as exc:  # SQLite's "database is locked", say
                    print(f"relay pass failed: {exc}")
                    connections.close_all()
        finally:
            connections.close_all()

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def all_succeeded(ids: list[uuid.UUID], subscription: str = "ord-steps") -> bool:
    done = Delivery.objects.filter(
        subscription=subscription, event_id__in=ids, status="succeeded"
    ).count()
    return done == len(ids)


def test_per_key_order_with_two_workers_and_concurrent_publishers(wired: Rig) -> None:
    keys = [f"acct-{uuid.uuid4().hex[:6]}" for _ in range(KEYS)]
    ids = publish_concurrently("ord.changed", EVENTS, keys)

    settle(ids, relay=False)  # no faults: nothing for the relay

    check_order(ids)
    # Both workers took part: the keys ran concurrently, not through one process.
    pids = set(HandlerRun.objects.filter(event_id__in=ids).values_list("pid", flat=True))
    assert len(pids) >= 3
    assert not Delivery.objects.filter(event_id__in=ids).exclude(status="succeeded").exists()


def test_sigkilled_worker_processes_keep_order_and_lose_nothing(wired: Rig) -> None:
    keys = [f"kill-{uuid.uuid4().hex[:6]}" for _ in range(KEYS)]
    done = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        # SIGKILL a pool child of the first worker every 0.4 s while deliveries run: its
        # message goes back to the queue (acks_late + reject_on_worker_lost), Celery starts
        # a new child, and the rolled-back run is run again.
        while not done.wait(0.4) and len(killed) < KILLS:
            children = wired.workers[0].pool_children()
            if children:
                pid = random.choice(children)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        ids = publish_concurrently("ord.changed", EVENTS, keys)
        # A hand-on whose send died with its pool process is due for the relay after 30 s.
        settle(ids)
    finally:
        done.set()
        thread.join()

    assert killed
    print(f"\n{len(killed)} pool processes SIGKILLed")
    check_order(ids)


def test_failing_head_holds_its_key_while_other_keys_proceed(wired: Rig) -> None:
    stuck, free = f"stuck-{uuid.uuid4().hex[:6]}", f"free-{uuid.uuid4().hex[:6]}"
    head = publish("ord.flaky", {"account": stuck, "n": 0, "fail": True}).id
    behind = [publish("ord.flaky", {"account": stuck, "n": n}).id for n in (1, 2, 3)]
    others = [publish("ord.flaky", {"account": free, "n": n}).id for n in range(4)]

    wait_for(lambda: all_succeeded(others, "ord-flaky"), what="the other key's deliveries")
    wait_for(
        lambda: Delivery.objects.get(event_id=head, subscription="ord-flaky").status == "failed",
        what="the head to fail for good",
    )
    wait_for(
        lambda: Delivery.objects.filter(event_id__in=behind, status="held").count() == 3,
        what="the key's later deliveries to be held",
    )
    assert not HandlerRun.objects.filter(event_id__in=behind).exists()
    held: list[dict[str, Any]] = held_deliveries()
    mine = [h for h in held if h["ordering_key"] == stuck]
    assert mine[0]["held"] == 3 and mine[0]["head"]["event_id"] == head
    # What an operator sees (DESIGN 3.17: held deliveries are visible).
    listed = StringIO()
    call_command("events_list", "--held", stdout=listed)
    assert f"ord-flaky [{stuck}]: 3 held, behind {head} (failed, " in listed.getvalue()

    assert mark_resolved(Delivery.objects.filter(event_id=head, subscription="ord-flaky")) == 1

    wait_for(lambda: all_succeeded(behind, "ord-flaky"), what="the held deliveries")
    check_order(behind, "ord-flaky")
    assert Delivery.objects.get(event_id=head, subscription="ord-flaky").status == "resolved"


def _succeeded_of(keys: list[str]) -> int:
    return Delivery.objects.filter(
        subscription="ord-steps", ordering_key__in=keys, status="succeeded"
    ).count()


def test_sigkilled_whole_worker_keeps_order_and_loses_nothing(wired: Rig) -> None:
    # The messages a killed worker took are gone on the filesystem transport (it deletes a
    # message's file when it takes it), and can be on Redis (kombu's BRPOP takes one off its
    # list before the worker notes it unacknowledged): the relay sends a key's first delivery
    # again once no worker touched it for RESEND_AFTER (docs/reliability.md).
    keys = [f"host-{uuid.uuid4().hex[:6]}" for _ in range(KEYS)]
    victim = wired.workers[0]
    kills: list[int] = []
    errors: list[BaseException] = []

    def killer() -> None:
        # SIGKILL the first worker as a whole (main process and pool: a host going down) once
        # a tenth and once half of the deliveries ran, and start it again. Its unacknowledged
        # messages go back to the queue (RabbitMQ at once, Redis after its visibility timeout)
        # or are lost (filesystem; Redis at times): the relay sends them again; the hand-ons
        # its processes committed and never sent are due for the relay.
        try:
            for share in (10, 2):
                wait_for(
                    lambda s=share: _succeeded_of(keys) >= EVENTS // s,
                    timeout=60 + EVENTS / 10,
                    what=f"1/{share} of the deliveries",
                )
                assert victim.process is not None
                kills.append(victim.process.pid)
                victim.kill()
                time.sleep(1)
                victim.start()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=killer)
    with relay_beside():  # a key stuck behind a lost message resumes meanwhile
        thread.start()
        try:
            ids = publish_concurrently("ord.changed", EVENTS, keys)
        finally:
            thread.join()
        assert not errors, errors
        assert len(kills) == 2

        settle(ids, relay=False)
    check_order(ids)


@pytest.mark.postgresql  # the run lock: elsewhere a hand-on is sent its message
def test_a_busy_keys_held_deliveries_run_in_the_task_that_hands_it_on(wired: Rig) -> None:
    """Held while the key's head runs, each is run by the process that finished the one
    before it, in order, not sent to the back of the queue (docs/ordering.md)."""
    key = f"busy-{uuid.uuid4().hex[:6]}"
    head = publish("ord.slow", {"account": key, "n": 0, "hang": 3}).id
    wait_for(lambda: (wired.faults / f"{head}-hang_once").exists(), what="the head to start")
    behind = [publish("ord.slow", {"account": key, "n": n}).id for n in range(1, 5)]
    ids = [head, *behind]
    wait_for(lambda: all_succeeded(ids, "ord-slow"), what="the key's deliveries")
    runs = list(HandlerRun.objects.filter(handler="hang_once", event_id__in=ids).order_by("pk"))
    assert [run.event_id for run in runs] == ids
    assert {run.pid for run in runs} == {runs[0].pid}  # the head's process ran them all
    rows = Delivery.objects.filter(event_id__in=ids, subscription="ord-slow")
    assert {(r.status, r.attempts, r.retry_at) for r in rows} == {("succeeded", 1, None)}


@pytest.mark.postgresql  # elsewhere (no run lock) a task with no limit sends them too
def test_a_worker_with_a_time_limit_sends_a_busy_keys_held_deliveries_their_messages(
    tmp_path: Path,
) -> None:
    """`celery worker --soft-time-limit` is the worker's own, not in the app's settings: a
    task there sends the held delivery it hands its key on to its message rather than run it
    (the limit, its own delivery's, would cut that handler short). One broker: it is the
    worker that is tested."""
    kind = "filesystem"
    queue = f"ord-limit-{uuid.uuid4().hex[:8]}"
    faults = tmp_path / "faults"
    faults.mkdir()
    worker = WorkerProcess(
        kind,
        queue,
        connection.settings_dict["NAME"],
        tmp_path / "worker.log",
        extra_env=worker_env(kind, faults),
        extra_args=("--soft-time-limit", "600"),
    )
    key = f"limit-{uuid.uuid4().hex[:6]}"
    with brokers.delivery_wiring(kind, queue, "ordering.yaml"), worker:
        head = publish("ord.slow", {"account": key, "n": 0, "hang": 3}).id
        wait_for(lambda: (faults / f"{head}-hang_once").exists(), what="the head to start")
        behind = [publish("ord.slow", {"account": key, "n": n}).id for n in range(1, 4)]
        ids = [head, *behind]
        wait_for(lambda: all_succeeded(ids, "ord-slow"), what="the key's deliveries")
        runs = HandlerRun.objects.filter(handler="hang_once", event_id__in=ids).order_by("pk")
        assert [run.event_id for run in runs] == ids
        # The head's message and the three others' (held), then one for each held one it
        # handed on: a task without a limit runs those itself, and receives 4 in all.
        wait_for(lambda: worker.log().count("] received") >= 5, what="a hand-on's message")


def test_replay_runs_a_key_again_in_order(wired: Rig) -> None:
    key = f"replay-{uuid.uuid4().hex[:6]}"
    since = timezone.now()
    ids = [publish("ord.flaky", {"account": key, "n": n}).id for n in range(6)]
    wait_for(lambda: all_succeeded(ids, "ord-flaky"), what="the first runs")
    replayed_at = time.time()

    with transaction.atomic():  # a replay whose commit comes late (or ATOMIC_REQUESTS)
        matched, result = replay_events("ord-flaky", since=since)
        time.sleep(1)  # a worker given a replayed message now still reads it succeeded

    # Read before the commit that sends them: counted as such, not as sent.
    assert (matched, result.at_commit, result.sent, result.unsent) == (6, 6, 0, 0)
    assert "6 to be sent when the current transaction commits" in result.summary()
    wait_for(
        lambda: (
            HandlerRun.objects.filter(event_id__in=ids).count() == 12
            and all_succeeded(ids, "ord-flaky")
        ),
        what="the replayed runs",
    )
    # Each event ran once more, the key's events again one at a time in their order.
    check_order(ids, "ord-flaky", since=replayed_at)
    rows = Delivery.objects.filter(event_id__in=ids, subscription="ord-flaky")
    assert {(r.status, r.attempts, r.retry_at) for r in rows} == {("succeeded", 2, None)}


def test_retried_failed_head_runs_then_its_key_follows_in_order(wired: Rig) -> None:
    stuck = f"fix-{uuid.uuid4().hex[:6]}"
    head = publish("ord.flaky", {"account": stuck, "n": 0, "fail": True}).id
    behind = [publish("ord.flaky", {"account": stuck, "n": n}).id for n in (1, 2, 3)]
    wait_for(
        lambda: Delivery.objects.get(event_id=head, subscription="ord-flaky").status == "failed",
        what="the head to fail for good",
    )
    wait_for(
        lambda: Delivery.objects.filter(event_id__in=behind, status="held").count() == 3,
        what="the key's later deliveries to be held",
    )
    (wired.fixed / stuck).touch()  # the fix is deployed

    result = retry_failures(Delivery.objects.filter(event_id=head, subscription="ord-flaky"))

    assert (result.sent, result.unsent) == (1, 0)
    wait_for(lambda: all_succeeded([head, *behind], "ord-flaky"), what="the key's deliveries")
    check_order([head, *behind], "ord-flaky")
    assert Delivery.objects.get(event_id=head, subscription="ord-flaky").attempts == 3


@pytest.mark.postgresql  # no run lock elsewhere: the copy runs beside it (docs/ordering.md)
def test_a_copy_of_a_running_delivery_comes_back_then_is_skipped(wired: Rig) -> None:
    # A copy of the message of a delivery whose handler runs (the relay's resend of a key's
    # first delivery, a broker's redelivery) reaches another worker process meanwhile.
    key = f"acct-{uuid.uuid4().hex[:6]}"
    event = publish("ord.slow", {"account": key, "n": 1, "hang": 6})
    wait_for((wired.faults / f"{event.id}-hang_once").exists, 60, "the first run to start")

    def logs() -> str:
        return "".join(worker.log() for worker in wired.workers)

    def runs() -> int:
        return HandlerRun.objects.filter(handler="hang_once", event_id=event.id).count()

    def row() -> str:
        return Delivery.objects.get(event_id=event.id, subscription="ord-slow").status

    copy = f"(subscription 'ord-slow', event ord.slow {event.id})"
    send_copy(event, "ord-slow")
    wait_for(
        lambda: ("runs nothing and comes back in" in logs() and copy in logs()) or runs() > 1,
        30,
        "a worker to take the copy",
    )
    assert (runs(), row()) == (1, "pending")  # the first run still hangs, alone
    wait_for(lambda: row() == "succeeded", 60, "the first run to succeed")
    # The copy comes back (a retry that counts no attempt) and finds it finished.
    wait_for(
        lambda: "Already succeeded or resolved; skipped" in logs() or runs() > 1,
        60,
        "the copy to come back",
    )
    assert runs() == 1
    # A copy now is a duplicate of a finished delivery.
    done = logs().count("Already succeeded or resolved; skipped")
    send_copy(event, "ord-slow")
    wait_for(
        lambda: logs().count("Already succeeded or resolved; skipped") > done or runs() > 1,
        30,
        "a worker to take the second copy",
    )
    assert runs() == 1


def send_copy(event: Event, subscription: str) -> None:
    """Send the message of ``event``'s delivery to ``subscription`` again, as the relay does."""
    registry = get_registry()
    durable = registry.events[event.name].declaration.durable
    unsent = send_deliveries([(event, durable, [registry.subscriptions[subscription]])], "default")
    assert not unsent.ids
