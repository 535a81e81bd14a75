"""Failure control through a real `celery worker`: RetryLater, PermanentFailure, pause,
give_up_after and the delivery_failed signal (sent once, on the worker)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from itertools import pairwise

import pytest
from django.core.management import call_command
from django.utils import timezone

from django_events import publish
from django_events.delivery import pausing
from django_events.models import Delivery, EventRecord
from django_events.operations.pausing import ORPHAN_AFTER, pause, resume
from tests import brokers
from tests.app.models import HandlerRun
from tests.app.take_back_fault import REFUSED
from tests.worker import WorkerProcess, start_worker, wait_for, wait_idle

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]

MANIFEST = "failctl.yaml"


@dataclass
class Worker:
    kind: str
    queue: str
    process: WorkerProcess


@pytest.fixture(scope="module", params=brokers.worker_kinds("filesystem", "redis"))
def worker(request, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Worker]:
    kind = request.param
    folder = tmp_path_factory.mktemp(f"worker-{kind}")
    env = {
        "DJANGO_EVENTS_TEST_RECORD_FAILED_SIGNAL": "1",
        "DJANGO_EVENTS_TEST_REFUSE_TAKE_BACK": "fc-take-back",
    }
    with start_worker(kind, folder, prefix=f"fc-{kind}", manifest=MANIFEST, env=env) as process:
        yield Worker(kind, process.queue, process)


@pytest.fixture
def wired(worker: Worker) -> Iterator[Worker]:
    with brokers.delivery_wiring(worker.kind, worker.queue, MANIFEST):
        yield worker


def runs(handler: str, event_id) -> list[HandlerRun]:
    return list(HandlerRun.objects.filter(handler=handler, event_id=event_id).order_by("pk"))


def settled(event_id, subscription: str, status: str) -> Delivery:
    return wait_for(
        lambda: Delivery.objects.filter(
            event_id=event_id, subscription=subscription, status=status
        ).first(),
        what=f"{subscription} {status}",
    )


def test_retry_later_waits_the_seconds_it_asks_for(wired: Worker) -> None:
    event = publish("fc.job", {"n": 1, "times": 1, "seconds": 1.5})

    delivery = settled(event.id, "fc-retry-later", "succeeded")
    attempts = runs("retry_later", event.id)
    assert len(attempts) == 2 == delivery.attempts
    gap = (attempts[1].created_at - attempts[0].created_at).total_seconds()
    assert gap >= 1.4  # RetryLater's 1.5 s, not the policy's 0.1 s backoff
    assert delivery.duration_ms is not None and 0 < delivery.duration_ms < 10_000  # measured
    assert runs("delivery_failed", event.id) == []


def test_retry_later_that_counts_uses_up_max_attempts(wired: Worker) -> None:
    event = publish("fc.job", {"n": 2, "times": 5, "seconds": 0.1})

    delivery = settled(event.id, "fc-retry-later", "failed")
    wait_idle(wired.process)  # a third run or a second signal would have shown by now
    assert len(runs("retry_later", event.id)) == 2 == delivery.attempts  # max_attempts: 2
    assert delivery.last_error == "RetryLater: retry in 0.1s (not retried: max_attempts 2 reached)"
    signals = runs("delivery_failed", event.id)
    assert len(signals) == 1
    assert signals[0].payload == {
        "subscription": "fc-retry-later",
        "attempts": 2,
        "mode": "async",
        "error": "RetryLater: retry in 0.1s (not retried: max_attempts 2 reached)",
        "exception": "RetryLater",
    }
    assert signals[0].pid == runs("retry_later", event.id)[-1].pid  # sent on the worker


def test_retry_later_not_counted_runs_past_max_attempts(wired: Worker) -> None:
    event = publish("fc.job", {"n": 3, "times": 4, "seconds": 0.1, "counts": False})

    delivery = settled(event.id, "fc-retry-later", "succeeded")
    # Four uncounted runs, then the fifth succeeds: max_attempts 2 counted only that one.
    assert len(runs("retry_later", event.id)) == 5 == delivery.attempts
    assert runs("delivery_failed", event.id) == []


def test_uncounted_runs_leave_max_attempts_to_the_runs_that_count(wired: Worker) -> None:
    payload = {"n": 4, "times": 3, "seconds": 0.1, "counts": False, "then_fail": True}
    event = publish("fc.job", payload)

    delivery = settled(event.id, "fc-retry-later", "failed")
    wait_idle(wired.process)
    # Three uncounted runs, then max_attempts (2) runs that raise: five in all.
    assert len(runs("retry_later", event.id)) == 5 == delivery.attempts
    assert delivery.last_error == "RuntimeError: failed after 4 retries asked for"
    assert [s.payload["attempts"] for s in runs("delivery_failed", event.id)] == [5]


def test_uncounted_runs_stay_uncounted_when_a_pause_holds_the_delivery(wired: Worker) -> None:
    # The first retry meets a pause: held, then resumed from its row, which remembers the
    # uncounted run (the retry's message did, and was acknowledged when held).
    payload = {"n": 5, "times": 3, "seconds": 2.5, "counts": False, "then_fail": True}
    event = publish("fc.job", payload)
    wait_for(lambda: runs("retry_later", event.id), what="the first run")
    pause("fc-retry-later")  # the worker reads it within CACHE_SECONDS, before the retry
    held = settled(event.id, "fc-retry-later", "held")
    assert (held.attempts, held.uncounted) == (1, 1)
    assert resume("fc-retry-later").sent == 1

    delivery = settled(event.id, "fc-retry-later", "failed")
    wait_idle(wired.process)
    # As without the pause: three uncounted runs, then max_attempts (2) runs that raise.
    assert len(runs("retry_later", event.id)) == 5 == delivery.attempts
    assert delivery.uncounted == 3
    assert [s.payload["attempts"] for s in runs("delivery_failed", event.id)] == [5]


def test_permanent_failure_fails_at_once_and_signals_once(wired: Worker) -> None:
    event = publish("fc.job", {"n": -1})

    delivery = settled(event.id, "fc-permanent", "failed")
    wait_idle(wired.process)  # max_attempts is 5: no retry is scheduled
    assert len(runs("permanent_failure", event.id)) == 1 == delivery.attempts
    assert delivery.last_error == "PermanentFailure: customer -1 does not exist"
    assert [r.payload["exception"] for r in runs("delivery_failed", event.id)] == [
        "PermanentFailure"
    ]


def test_give_up_after_ends_retries_early(wired: Worker) -> None:
    event = publish("fc.job", {"n": -2})

    delivery = settled(event.id, "fc-give-up", "failed")
    wait_idle(wired.process)
    attempts = runs("always_fails", event.id)
    # Backoff 0.4 s then 0.8 s: the third run would start after the 1 s limit.
    assert len(attempts) == 2 == delivery.attempts
    assert all(b.created_at > a.created_at for a, b in pairwise(attempts))
    assert "gave up: give_up_after 1s since the event occurred" in delivery.last_error
    signals = runs("delivery_failed", event.id)
    assert [(s.payload["subscription"], s.payload["attempts"]) for s in signals] == [
        ("fc-give-up", 2)
    ]


def test_pause_holds_deliveries_across_a_worker_restart_and_resume_delivers_each_once(
    wired: Worker,
) -> None:
    out = io.StringIO()
    call_command("events_pause", "fc-record", stdout=out)
    assert "Paused 'fc-record'" in out.getvalue()
    time.sleep(pausing.CACHE_SECONDS + 0.2)  # what a worker read before the pause expires

    before = [publish("fc.job", {"n": n}).id for n in range(4)]
    wait_for(lambda: held_count(before) == 4, what="4 held deliveries")
    wired.process.stop()
    during = [publish("fc.job", {"n": n}).id for n in range(4, 7)]  # queued, no worker
    wired.process.start()
    wait_for(lambda: held_count(during) == 3, what="the held deliveries after the restart")
    wait_idle(wired.process)
    ids = before + during
    assert HandlerRun.objects.filter(handler="record", event_id__in=ids).count() == 0
    listing = io.StringIO()
    call_command("events_list", "--state", stdout=listing)
    assert "fc-record: paused, 7 held" in listing.getvalue()

    out = io.StringIO()
    call_command("events_resume", "fc-record", stdout=out)
    assert "7 re-enqueued for a worker" in out.getvalue()
    wait_for(
        lambda: HandlerRun.objects.filter(handler="record", event_id__in=ids).count() == 7,
        what="7 resumed deliveries",
    )
    wait_idle(wired.process)  # a duplicate would have shown by now
    handled = HandlerRun.objects.filter(handler="record", event_id__in=ids)
    assert sorted(str(r.event_id) for r in handled) == sorted(map(str, ids))
    rows = Delivery.objects.filter(event_id__in=ids, subscription="fc-record")
    assert set(rows.values_list("status", "attempts")) == {("succeeded", 1)}
    # Resumed means resumed: the next event is not held.
    after = publish("fc.job", {"n": 9}).id
    wait_for(lambda: runs("record", after), what="an event after the resume")


def held_count(ids) -> int:
    return Delivery.objects.filter(
        event_id__in=list(ids), subscription="fc-record", status="held"
    ).count()


def test_a_resumed_delivery_of_an_event_recorded_only_on_failure_is_recorded(
    wired: Worker,
) -> None:
    pause("fc-quiet")
    time.sleep(pausing.CACHE_SECONDS + 0.2)
    ids = [publish("fc.quiet", {"i": i}).id for i in range(2)]
    wait_for(
        lambda: Delivery.objects.filter(event_id__in=ids, status="held").count() == 2,
        what="2 held deliveries",
    )
    # Both runs ended: a worker still between writing its held row and reading the pauses
    # again would see the resume and run that delivery itself (`_hold`), not the resume.
    wait_idle(wired.process)
    assert resume("fc-quiet").sent == 2
    wait_for(
        lambda: Delivery.objects.filter(event_id__in=ids, status="succeeded").count() == 2,
        what="their successes recorded (not left pending)",
    )
    assert HandlerRun.objects.filter(handler="record", event_id__in=ids).count() == 2


def test_a_duplicate_of_a_success_meeting_a_pause_is_not_held_nor_run_again(
    wired: Worker,
) -> None:
    # The duplicate comes as DESIGN 3.5 says it may: a publisher that died after its commit,
    # before marking its record dispatched, leaves it pending, and the relay sends it again.
    event_id = publish("fc.once", {}).id
    settled(event_id, "fc-once", "succeeded")
    pause("fc-once")
    time.sleep(pausing.CACHE_SECONDS + 0.2)
    EventRecord.objects.filter(pk=event_id).update(status="pending")
    call_command("events_relay", "--min-age", "0", stdout=io.StringIO())
    wait_for(
        lambda: "Already succeeded or resolved" in wired.process.log(),
        what="the worker skipping the duplicate",
    )
    assert resume("fc-once").sent == 0
    wait_idle(wired.process)
    row = Delivery.objects.get(event_id=event_id, subscription="fc-once")
    assert (row.status, row.attempts) == ("succeeded", 1)
    assert len(runs("record", event_id)) == 1


def test_a_held_row_the_worker_cannot_take_back_runs_once_from_the_relay(wired: Worker) -> None:
    """A resume commits just after the worker recorded the delivery held, before it read the
    pauses again; taking its row back (held -> pending) then fails (tests/app/take_back_fault).
    The row stays held and the message is acknowledged: the relay delivers the row as any held
    row of a subscription no longer paused, and the handler runs once. A retry of the message
    besides would run it too (twice; with the event recorded only on failure, its success
    leaving the row held for the relay to send again)."""
    pause("fc-take-back")
    time.sleep(pausing.CACHE_SECONDS + 0.2)  # what the worker read before the pause expires
    event_id = publish("fc.take_back", {}).id
    wait_for(lambda: REFUSED in wired.process.log(), what="the refused take-back")
    wait_idle(wired.process)  # a retry of the message would have run by now
    assert runs("record", event_id) == []
    rows = Delivery.objects.filter(event_id=event_id, subscription="fc-take-back")
    assert rows.get().status == "held"
    assert not pausing.paused_names("default", fresh=True)  # resumed: nothing else sends it

    rows.update(updated_at=timezone.now() - timedelta(seconds=ORPHAN_AFTER + 1))
    call_command("events_relay", "--min-age", "0", stdout=io.StringIO())
    settled(event_id, "fc-take-back", "succeeded")
    wait_idle(wired.process)
    assert len(runs("record", event_id)) == 1
