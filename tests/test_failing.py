"""What follows a failed run (django_events.delivery.failing), and give_up_after declared."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from django_events import PermanentFailure, RetryLater, checks
from django_events.delivery.failing import Verdict, judge
from django_events.wiring.describing import describe_wiring
from django_events.wiring.listing import as_table
from django_events.wiring.registry import get_registry
from tests.conftest import wiring

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
BASE = {
    "event": "orders.placed",
    "handler": "tests.app.handlers.record",
    "mode": "async",
    "name": "s",
    "retry": {"max_attempts": 3, "backoff": 2, "max_backoff": 300, "jitter": False},
}


def verdict(exc: BaseException, attempt: int = 1, age: float = 0, **keys) -> Verdict:
    with wiring({**BASE, **keys}):
        subscription = get_registry().subscriptions["s"]
        return judge(exc, subscription, attempt, NOW - timedelta(seconds=age), NOW)


@pytest.mark.parametrize(
    ("exc", "attempt", "keys", "expected"),
    [
        (RuntimeError("x"), 1, {}, Verdict(2.0)),
        (RuntimeError("x"), 2, {}, Verdict(4.0)),
        (RuntimeError("x"), 3, {}, Verdict(None)),
        (PermanentFailure("gone"), 1, {}, Verdict(None)),
        (RetryLater(60), 1, {}, Verdict(60.0)),
        (RetryLater(60), 3, {}, Verdict(None, note="not retried: max_attempts 3 reached")),
        (RetryLater(60, counts=False), 3, {}, Verdict(60.0, counted=False)),
        (
            RetryLater(60, counts=False),
            1,
            {"broadcast": True},
            Verdict(None, note="not retried: a broadcast copy is never retried"),
        ),
        (
            RetryLater(60),
            1,
            {"broadcast": True, "retry": {"max_attempts": 5}},
            Verdict(None, note="not retried: a broadcast copy is never retried"),
        ),
        (RuntimeError("x"), 1, {"broadcast": True}, Verdict(None)),
    ],
)
def test_judge(exc: BaseException, attempt: int, keys: dict, expected: Verdict) -> None:
    assert verdict(exc, attempt, **keys) == expected


def test_give_up_after_counts_from_when_the_event_occurred() -> None:
    assert verdict(RuntimeError("x"), age=7, give_up_after=10) == Verdict(2.0)
    gave_up = verdict(RuntimeError("x"), age=9, give_up_after=10)
    assert gave_up == Verdict(None, note="gave up: give_up_after 10s since the event occurred")
    assert verdict(RetryLater(5, counts=False), age=6, give_up_after=10).final
    assert not verdict(RetryLater(5, counts=False), age=4, give_up_after=10).final


def test_give_up_after_is_listed_and_warned_about_on_sync_subscriptions() -> None:
    with wiring({**BASE, "give_up_after": 90}):
        assert "give_up_after=90s" in as_table(describe_wiring())
        (info,) = [s for e in describe_wiring().events for s in e.subscriptions if s.name == "s"]
        assert info.give_up_after == 90
    sync = {k: v for k, v in BASE.items() if k != "retry"}
    with wiring({**sync, "mode": "sync", "give_up_after": 90}):
        reported = [(m.id, m.msg) for m in checks.check_configuration()]
    assert reported == [
        (
            "django_events.W102",
            "Subscription 's' is sync: give_up_after only applies to async subscriptions",
        )
    ]


def test_give_up_after_must_be_positive() -> None:
    with wiring({**BASE, "give_up_after": 0}):
        messages = [m.msg for m in checks.check_configuration()]
    assert any("give_up_after: 0 is less than or equal to the minimum of 0" in m for m in messages)
