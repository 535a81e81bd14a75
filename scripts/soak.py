#!/usr/bin/env python
"""Soak run: N events through a broker cut, a database cut and workers SIGKILLed in a loop.

Not part of the test suite at full size (it runs for many minutes); tests/test_soak.py runs
it small. Needs PostgreSQL and the broker on loopback; it creates and drops its own database
and queue, and puts a fault proxy (tests/faultproxy.py) between every process and each
server. See docs/reliability.md.

    .venv/bin/python scripts/soak.py --broker amqp --events 20000
    .venv/bin/python scripts/soak.py --broker redis --events 20000

The package's settings are its defaults (only MANIFESTS, DEFAULT_QUEUE and CELERY_APP are
set, and RESEND_UNFINISHED_AFTER to --resend-unfinished-after). Every event goes to one
idempotent and one plain async subscription (tests/manifests/soak.yaml). Two workers
(prefork, 2 processes each) consume; one is SIGKILLed as a whole every few seconds and
restarted; `events_relay --loop` runs beside them
with its default options, except --resend-unfinished-after (the package's default, an hour
or more, is longer than a run). A third of the way through publishing the broker is cut (live
connections reset, new ones refused) for --cut seconds, two thirds of the way the database.
The publisher retries a transaction the database cut made fail.

Once everything settled (or nothing moved for --settle seconds, or --deadline passed) it
prints the figures and exits 1 if a committed event was lost, the idempotent handler ran
twice for an event, a record or a delivery row is missing, or the run did not settle.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from tests.faultproxy import FaultProxy
    from tests.worker import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
URLS = {
    "amqp": os.environ.get("DJANGO_EVENTS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    # A Redis database of its own: kombu's unacked hash is per database, and the soak's short
    # visibility_timeout must not hand out the unacknowledged messages of anyone else.
    "redis": os.environ.get("SOAK_REDIS_URL", "redis://127.0.0.1:6379/15"),
}
DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
SUBSCRIPTIONS = {"soak-once": "hang_once", "soak-plain": "hang_plain"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Run:
    """What the publisher and the fault threads saw."""

    committed: set[uuid.UUID] = field(default_factory=set)  # commit returned
    unsure: set[uuid.UUID] = field(default_factory=set)  # the transaction raised
    failed_transactions: int = 0
    kills: int = 0
    restarts_not_ready: int = 0
    cuts: list[str] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)  # time.time() of each kill
    unconfirmed_batches: int = 0  # left pending by a lost publisher connection


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=sorted(URLS), default="amqp")
    parser.add_argument("--events", type=int, default=20_000, help="events to publish")
    parser.add_argument("--batch", type=int, default=100, help="events per transaction")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--cut", type=float, default=10.0, help="seconds each cut lasts")
    parser.add_argument(
        "--settle", type=float, default=240.0, help="give up after this long without progress"
    )
    parser.add_argument("--deadline", type=float, default=3600.0, help="give up after this long")
    parser.add_argument(
        "--visibility-timeout",
        type=float,
        default=60.0,
        help="Redis only: seconds before the messages of a killed worker are handed out again "
        "(Celery's default is one hour)",
    )
    parser.add_argument(
        "--resend-unfinished-after",
        type=float,
        default=120.0,
        help="passed to events_relay --loop: seconds after which a delivery with no outcome "
        "is sent again (the package's default is one hour plus the broker's visibility timeout)",
    )
    parser.add_argument(
        "--success-records",
        choices=["immediate", "batched"],
        default=None,
        help="set SUCCESS_RECORDS (default: the package's default) to compare the two",
    )
    parser.add_argument(
        "--cuts",
        choices=["both", "broker", "db", "none"],
        default="both",
        help="which cuts to make (default both)",
    )
    args = parser.parse_args()
    if args.events < 3 or args.batch < 1 or args.cut <= 0 or args.kill_every <= 0:
        parser.error("--events >= 3, --batch >= 1, --cut and --kill-every > 0")
    for url in (URLS[args.broker], DATABASE_URL):
        if urlparse(url).hostname not in LOOPBACK:
            parser.error(f"{url} is not on loopback")

    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.path.insert(0, str(ROOT))
    from tests.faultproxy import FaultProxy

    queue = f"soak-{args.broker}-{uuid.uuid4().hex[:8]}"
    db_proxy = FaultProxy.for_url(DATABASE_URL)
    broker_proxy = FaultProxy.for_url(URLS[args.broker])
    # Every process (this one, the workers, the relay) reaches the servers through the proxies.
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=DATABASE_URL,
        DJANGO_EVENTS_TEST_MANIFEST="soak.yaml",
        DJANGO_EVENTS_TEST_QUEUE=queue,
        DJANGO_EVENTS_TEST_CELERY_APP=f"tests.brokers.{args.broker}",
        DJANGO_EVENTS_SOAK="1",  # the package's defaults (tests/settings.py)
        **{f"DJANGO_EVENTS_{args.broker.upper()}_URL": broker_proxy.url(URLS[args.broker])},
    )
    if args.success_records:
        os.environ["DJANGO_EVENTS_SOAK_SUCCESS_RECORDS"] = args.success_records
    # The workers' too: a retry's row falls due for the relay that long after the retry's time.
    os.environ["DJANGO_EVENTS_SOAK_RESEND_AFTER"] = str(args.resend_unfinished_after)
    if args.broker == "redis":
        os.environ["DJANGO_EVENTS_REDIS_VISIBILITY_TIMEOUT"] = str(args.visibility_timeout)
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    from tests.worker import WorkerProcess

    databases = setup_databases(verbosity=0, interactive=False)
    direct_port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = str(db_proxy.port)
    name = connection.settings_dict["NAME"]
    logs = Path(tempfile.mkdtemp(prefix="soak-"))
    env = {
        "DJANGO_EVENTS_TEST_MANIFEST": "soak.yaml",
        "DJANGO_EVENTS_WORKER_DB_PORT": str(db_proxy.port),
    }
    steady, victim = (
        WorkerProcess(
            args.broker, queue, name, logs / f"worker-{role}.log", env, node=f"{queue}-{role}"
        )
        for role in ("steady", "victim")
    )
    print(f"{args.broker}: queue {queue}, database {name}, logs in {logs}", flush=True)
    relay: subprocess.Popen[bytes] | None = None
    try:
        with steady, victim:
            relay = _start_relay(
                name, db_proxy.port, logs / "relay.log", args.resend_unfinished_after
            )
            return _soak(args, victim, broker_proxy, db_proxy, relay, logs / "relay.log")
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(30)
        broker_proxy.restore()
        db_proxy.restore()
        _drop_queue(args.broker, queue)
        from django_events.delivery import marking

        marking.stop()  # the publisher's background marker and its database connection
        connection.close()
        connection.settings_dict["PORT"] = direct_port
        teardown_databases(databases, verbosity=0)
        broker_proxy.close()
        db_proxy.close()


def _start_relay(
    db_name: str, db_port: int, log: Path, resend_after: float
) -> subprocess.Popen[bytes]:
    """`events_relay --loop` with its default options, as a deployment runs it, but a
    threshold for unfinished deliveries that fits a run of minutes."""
    env = {
        **os.environ,
        "DJANGO_EVENTS_WORKER_DB_NAME": db_name,
        "DJANGO_EVENTS_WORKER_DB_PORT": str(db_port),
        "PYTHONPATH": str(ROOT),
    }
    with log.open("ab") as output:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "django", "events_relay", "--loop"),
                *("--resend-unfinished-after", f"{resend_after:g}"),
            ],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _soak(
    args: argparse.Namespace,
    victim: WorkerProcess,
    broker_proxy: FaultProxy,
    db_proxy: FaultProxy,
    relay: subprocess.Popen[bytes],
    relay_log: Path,
) -> int:
    from django.db.models import Count

    from django_events.models import Delivery, EventRecord

    run = Run()
    logging.getLogger("django_events.broker").addHandler(_Unconfirmed(run))
    stop = threading.Event()
    started = time.monotonic()
    deadline = started + args.deadline
    killer = threading.Thread(target=_killer, args=(args, victim, run, stop), daemon=True)
    killer.start()

    _publish(args, run, broker_proxy, db_proxy, deadline)
    print(
        f"published {len(run.committed)} events ({len(run.unsure)} in transactions that "
        f"raised) in {time.monotonic() - started:.1f}s",
        flush=True,
    )

    # Settled: no record pending, and every committed event's deliveries finished.
    last_change, last_state = time.monotonic(), None
    settled = False
    while time.monotonic() < deadline and time.monotonic() - last_change < args.settle:
        try:
            pending = EventRecord.objects.filter(status="pending").count()
            total = EventRecord.objects.count()
            # Finished: succeeded, or failed for good (the figures say which).
            done = Delivery.objects.filter(status__in=["succeeded", "failed"]).count()
        except Exception as exc:  # noqa: BLE001 - a figure to print, then poll again
            print(f"settle poll failed: {exc!r}", flush=True)
            _reset_connection()
            time.sleep(2)
            continue
        state = (pending, done)
        if state != last_state:
            last_change, last_state = time.monotonic(), state
            print(f"  pending records {pending}, finished deliveries {done}", flush=True)
        if not pending and done >= len(SUBSCRIPTIONS) * total and relay.poll() is None:
            settled = True
            break
        time.sleep(2)
    stop.set()
    killer.join()
    if victim.process is None or victim.process.poll() is not None:
        victim.launch()
    time.sleep(10)  # redelivered duplicates still in flight show up now
    elapsed = time.monotonic() - started

    figures, failed = _count(run, relay_log)
    figures.update(
        {
            "settled": settled,
            "relay loop still running": relay.poll() is None,
            "wall time (s)": round(elapsed),
        }
    )
    statuses = dict(
        Delivery.objects.values_list("status").annotate(n=Count("pk")).values_list("status", "n")
    )
    figures["delivery rows by status"] = statuses
    for label, value in figures.items():
        print(f"{label + ':':<48}{value}")
    return 1 if failed or not settled or relay.poll() is not None else 0


def _publish(
    args: argparse.Namespace,
    run: Run,
    broker_proxy: FaultProxy,
    db_proxy: FaultProxy,
    deadline: float,
) -> None:
    """Publish in transactions of --batch; cut the broker at 1/3 and the database at 2/3.

    One cut at a time: publishing waits at two thirds for the broker to be back (it runs
    faster while the broker is out), so that the database cut always hits it.
    """
    from django.db import transaction

    from django_events import publish_many

    faults = [(args.events // 3, "broker", broker_proxy), (2 * args.events // 3, "db", db_proxy)]
    faults = [f for f in faults if args.cuts in ("both", f[1])]
    timer: threading.Timer | None = None

    def cut(published: int) -> threading.Timer:
        _, what, proxy = faults.pop(0)
        proxy.cut()
        run.cuts.append(f"{what} at {published} events for {args.cut:g}s")
        print(f"cut the {what} ({published} events published)", flush=True)
        timer = threading.Timer(args.cut, _restore, args=(proxy, what))
        timer.daemon = True
        timer.start()
        return timer

    published = 0
    while published < args.events and time.monotonic() < deadline:
        if faults and published >= faults[0][0]:
            if timer is not None:
                timer.join()  # the broker is back before the database goes
            timer = cut(published)
        count = min(args.batch, args.events - published)
        events: list[Any] = []
        try:
            with transaction.atomic():
                events = publish_many(("soak.tick", {"n": published + i}) for i in range(count))
        except Exception as exc:  # noqa: BLE001 - the database is cut: try again
            run.failed_transactions += 1
            run.unsure.update(event.id for event in events)  # a COMMIT that raised may be in
            if run.failed_transactions == 1 or run.failed_transactions % 20 == 0:
                print(f"  transaction failed ({exc.__class__.__name__}), retrying", flush=True)
            _reset_connection()
            time.sleep(0.5)
            continue
        run.committed.update(event.id for event in events)
        published += count
    while faults:
        if timer is not None:
            timer.join()
        timer = cut(published)
    if timer is not None:
        timer.join()


def _restore(proxy: FaultProxy, what: str) -> None:
    from django.db import connection

    from django_events.models import EventRecord

    proxy.restore()
    try:
        pending = EventRecord.objects.filter(status="pending").count()
    except Exception as exc:  # noqa: BLE001 - only a figure
        pending = repr(exc)
    finally:
        connection.close()  # this thread's
    print(f"restored the {what}; records pending: {pending}", flush=True)


def _reset_connection() -> None:
    from django.db import connection

    try:
        connection.close()
    except Exception as exc:  # noqa: BLE001 - a broken connection may not close cleanly
        print(f"  closing the broken connection: {exc!r}", flush=True)


def _killer(args: argparse.Namespace, victim: WorkerProcess, run: Run, stop: Any) -> None:
    """SIGKILL the victim worker (main process and pool) every --kill-every s; restart it."""
    while not stop.wait(args.kill_every):
        run.kill_times.append(time.time())
        victim.kill()
        run.kills += 1
        if stop.is_set():
            return
        try:
            victim.start(timeout=120)  # during a broker cut it cannot get ready
        except RuntimeError:
            run.restarts_not_ready += 1


def _count(run: Run, relay_log: Path) -> tuple[dict[str, Any], bool]:
    """The figures, and whether any of them breaks the promise."""
    from django_events.models import Delivery, EventRecord
    from tests.app.models import HandlerRun

    records = set(EventRecord.objects.values_list("id", flat=True))
    committed = run.committed | (run.unsure & records)
    runs = {
        handler: Counter(
            HandlerRun.objects.filter(handler=handler).values_list("event_id", flat=True)
        )
        for handler in SUBSCRIPTIONS.values()
    }
    rows = Counter(Delivery.objects.values_list("event_id", "subscription"))
    succeeded = Delivery.objects.filter(status="succeeded").count()
    expected = {(event, sub) for event in committed for sub in SUBSCRIPTIONS}
    once, plain = runs["hang_once"], runs["hang_plain"]
    # A handler that needs the database and ran only while it was cut exhausts the default
    # retry policy (3 runs over a few seconds): its delivery ends failed, shown in the admin
    # and retryable, not lost. Counted apart; any other failure breaks the promise.
    cut_out = set(
        Delivery.objects.filter(
            status="failed", last_error__contains="OperationalError"
        ).values_list("event_id", "subscription")
    )
    by_handler = {h: s for s, h in SUBSCRIPTIONS.items()}
    lost = sum(
        1
        for e in committed
        for h in SUBSCRIPTIONS.values()
        if not runs[h][e] and (e, by_handler[h]) not in cut_out
    )
    text = relay_log.read_text(errors="replace") if relay_log.exists() else ""
    relayed_events = sum(int(n) for n in re.findall(r"Relayed (\d+) event", text))
    relayed_retries = sum(int(n) for n in re.findall(r"and (\d+) due deliver", text))
    resent = sum(int(n) for n in re.findall(r"resent (\d+) delivery", text))
    from django_events.conf import conf

    figures: dict[str, Any] = {
        "SUCCESS_RECORDS": conf.SUCCESS_RECORDS,
        "events committed": len(committed),
        "  of which in a transaction that raised": len(run.unsure & records),
        "transactions that raised (retried)": run.failed_transactions,
        "cuts": "; ".join(run.cuts),
        "worker kills (SIGKILL, whole worker)": run.kills,
        "restarts not ready in 120 s": run.restarts_not_ready,
        "events relayed by events_relay --loop": relayed_events,
        "retries relayed by events_relay --loop": relayed_retries,
        "deliveries resent (no outcome) by events_relay": resent,
        "deliveries expected": len(expected),
        "deliveries succeeded": succeeded,
        "lost (event x subscription never run)": lost,
        "duplicate effects, idempotent subscription": sum(once.values()) - len(once),
        "duplicate runs, plain subscription": sum(plain.values()) - len(plain),
        "records missing (committed, no EventRecord)": len(run.committed - records),
        "delivery rows missing": len(expected - set(rows)),
        "failed in the database cut (retryable)": len(cut_out),
        "delivery rows not succeeded, other": Delivery.objects.exclude(status="succeeded").count()
        - len(cut_out),
        "delivery rows twice for one pair": sum(1 for n in rows.values() if n > 1),
        "records still pending": EventRecord.objects.filter(status="pending").count(),
    }
    failed = any(
        figures[key]
        for key in (
            "lost (event x subscription never run)",
            "duplicate effects, idempotent subscription",
            "records missing (committed, no EventRecord)",
            "delivery rows missing",
            "delivery rows not succeeded, other",
            "records still pending",
        )
    )
    _attribute(run, figures)
    return figures, failed


# How a run of the plain handler beyond its first came (tests.app.handlers._how_delivered).
SECOND_RUNS = {
    "retry": "a Celery retry of a message that had run",
    "resent": "a rerun message (events_relay resent it: no outcome, or a due retry)",
    "redelivered": "the broker redelivered a message that had run (worker killed or cut off)",
    "redelivered-other": "the broker redelivered another message of the event",
    # Its first attempt may have failed (the database cut): it ran on a retry.
    "relayed": "a second message (events_relay sent a record still pending, sent before)",
    "unflagged": "the same message again, not flagged redelivered",
}


def _attribute(run: Run, figures: dict[str, Any]) -> None:
    """Say how each duplicate run of the plain subscription came, from its message's flags."""
    import bisect

    from tests.app.models import HandlerRun

    by_event: dict[uuid.UUID, list[Any]] = {}
    for row in HandlerRun.objects.filter(handler="hang_plain").order_by("created_at", "pk"):
        by_event.setdefault(row.event_id, []).append(row)
    kinds: Counter[str] = Counter()
    gaps: dict[str, list[float]] = {}
    before_kill: list[float] = []
    for event_runs in by_event.values():
        first, tasks = event_runs[0], {event_runs[0].payload.get("task_id")}
        for later in event_runs[1:]:
            how = later.payload
            if how.get("retries") and how.get("task_id") in tasks:
                kind = "retry"  # a retry keeps its task id: this message had run before
            elif how.get("rerun"):
                kind = "resent"
            elif how.get("redelivered"):
                kind = "redelivered" if how.get("task_id") in tasks else "redelivered-other"
            else:
                kind = "unflagged" if how.get("task_id") in tasks else "relayed"
            kinds[kind] += 1
            tasks.add(how.get("task_id"))
            gaps.setdefault(kind, []).append((later.created_at - first.created_at).total_seconds())
            if kind == "redelivered":  # how long before the next kill its first run was
                at = first.created_at.timestamp()
                i = bisect.bisect_left(run.kill_times, at)
                if i < len(run.kill_times):
                    before_kill.append(run.kill_times[i] - at)
    figures["publisher batches unconfirmed at a broker cut"] = run.unconfirmed_batches
    for kind, label in SECOND_RUNS.items():
        if kind in kinds:
            spread = sorted(gaps[kind])
            figures[f"  duplicate runs: {label}"] = (
                f"{kinds[kind]} (s after the first run: min {spread[0]:.1f}, "
                f"median {spread[len(spread) // 2]:.1f}, max {spread[-1]:.1f})"
            )
    if before_kill:
        before_kill.sort()
        figures["  redelivered: s from their first run to the kill"] = (
            f"min {before_kill[0]:.2f}, median {before_kill[len(before_kill) // 2]:.2f}, "
            f"max {before_kill[-1]:.2f}"
        )


class _Unconfirmed(logging.Handler):
    """Counts the publisher batches a lost connection left unconfirmed (they stay pending and
    events_relay sends them again: a second message for each event the broker had taken)."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Lost the publisher connection with %d batch"):
            self.run.unconfirmed_batches += int(record.args[0])  # type: ignore[index]


def _drop_queue(kind: str, queue: str) -> None:
    from tests import brokers

    with getattr(brokers, kind).connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)


if __name__ == "__main__":
    sys.exit(main())
