"""Which subscriptions are paused, as the delivery path asks it (read through a short cache).

A paused subscription's deliveries are held: recorded as ``held`` `Delivery` rows instead of
run, until `django_events.operations.pausing.resume` sends them again. The paused set lives in
the database (`PausedSubscription`), so a pause outlives worker restarts; each process reads it
at most once per `CACHE_SECONDS`, so a pause reaches every worker within that time.
"""

from __future__ import annotations

import logging
import time

from django.db import DatabaseError

from django_events.logs import log_extra
from django_events.models import PausedSubscription

CACHE_SECONDS = 1.0
#: Seconds a held row of a subscription no longer paused waits before the relay delivers it
#: (`operations.pausing.deliver_orphaned_held`): time for the process that wrote it to take it
#: back itself.
ORPHAN_AFTER = 60.0

logger = logging.getLogger("django_events.pausing")

# alias -> (monotonic time read, paused names)
_cache: dict[str, tuple[float, frozenset[str]]] = {}


def paused_names(alias: str, *, fresh: bool = False) -> frozenset[str]:
    """The names of the paused subscriptions (at most `CACHE_SECONDS` old unless ``fresh``)."""
    now = time.monotonic()
    cached = _cache.get(alias)
    if cached is not None and not fresh and now - cached[0] < CACHE_SECONDS:
        return cached[1]
    try:
        names = frozenset(
            PausedSubscription.objects.using(alias).values_list("subscription", flat=True)
        )
    except DatabaseError:
        # Without the database the handler's outcome cannot be recorded either: the delivery
        # is retried by that path, so running it is no worse than holding it.
        logger.warning("Could not read the paused subscriptions", exc_info=True, extra=log_extra())
        return cached[1] if cached is not None else frozenset()
    _cache[alias] = (now, names)
    return names


def forget() -> None:
    """Drop the cache: this process reads the paused set again on its next delivery."""
    _cache.clear()
