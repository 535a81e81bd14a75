"""Switches that `django_events.testing` flips; ``None`` (production) costs one lookup."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

#: When set, ``publish()`` hands each validated batch here and does nothing else.
capture: Callable[[Sequence[Any], str], None] | None = None
#: When set, async deliveries go here instead of to the broker (returns unsent event ids).
send: Callable[[Sequence[Any], str], set[UUID]] | None = None
