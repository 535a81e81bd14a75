"""What a failed handler run leads to: another attempt (when), or the end of the delivery.

Pure logic, shared by the worker and `events_eager`: `RetryLater`, `PermanentFailure`,
``max_attempts`` and ``give_up_after`` decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django_events.exceptions import PermanentFailure, RetryLater
from django_events.wiring.compiled import Subscription


@dataclass(frozen=True)
class Verdict:
    """``retry_in`` seconds before the next attempt, or None: the delivery ends failed.

    ``counted``: whether the next attempt's predecessor counts towards ``max_attempts``;
    ``note``: why it ended, appended to the recorded error (empty for the ordinary reasons).
    """

    retry_in: float | None
    counted: bool = True
    note: str = ""

    @property
    def final(self) -> bool:
        return self.retry_in is None


def judge(
    exc: BaseException,
    subscription: Subscription,
    counted_attempt: int,
    occurred_at: datetime,
    now: datetime,
) -> Verdict:
    """Decide what follows a run that raised ``exc``.

    ``counted_attempt`` is this run's number among the runs that count (``RetryLater(...,
    counts=False)`` runs do not): it decides ``max_attempts`` and the backoff, so a failure
    after uncounted runs waits the first delay, not one grown by runs that did not count.
    """
    if isinstance(exc, PermanentFailure):
        return Verdict(None)
    # A broadcast copy is never retried: a retry would reach every worker again.
    max_attempts = 1 if subscription.declaration.broadcast else subscription.retry.max_attempts
    if isinstance(exc, RetryLater):
        # Its message, "retry in 0.3s", would read as a retry to come: say there is none.
        if subscription.declaration.broadcast:
            return Verdict(None, note="not retried: a broadcast copy is never retried")
        if exc.counts and counted_attempt >= max_attempts:
            return Verdict(None, note=f"not retried: max_attempts {max_attempts} reached")
        retry_in, counted = exc.seconds, exc.counts
    elif counted_attempt >= max_attempts:
        return Verdict(None)
    else:
        retry_in, counted = subscription.retry.delay(counted_attempt), True
    limit = subscription.declaration.give_up_after
    if limit is not None and (now - occurred_at).total_seconds() + retry_in > limit:
        return Verdict(None, note=f"gave up: give_up_after {limit:g}s since the event occurred")
    return Verdict(retry_in, counted)
