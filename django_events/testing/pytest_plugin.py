"""pytest fixtures ``captured_events`` and ``events_eager``, registered as the ``pytest11``
entry point ``django_events``. Importing it touches neither settings nor models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from django_events import testing


@pytest.fixture
def captured_events() -> Iterator[testing.CapturedEvents]:
    """Capture published events (after commit) and dispatch nothing."""
    with testing.captured_events() as captured:
        yield captured


@pytest.fixture
def events_eager() -> Iterator[testing.EagerEvents]:
    """Run async subscriptions in-process after commit; their failures raise in the test."""
    with testing.events_eager() as eager:
        yield eager
