"""Handlers for typed events: they keep what they received, so tests can look at the payload."""

from __future__ import annotations

from django_events import Event

received: list[Event] = []


def keep(event: Event) -> None:
    received.append(event)


class KeepingHandler:
    """A class handler: instantiated once per process, ``handle`` called per event."""

    instances = 0

    def __init__(self) -> None:
        type(self).instances += 1

    def handle(self, event: Event) -> None:
        received.append(event)
