"""Publisher confirms for a whole batch (RabbitMQ): publish every message, then wait once.

Waiting for each message's confirm before sending the next costs a broker round trip per
message; the broker acknowledges a pipelined batch just as surely, in a few acks.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID


class PublisherConfirms:
    """Tracks the confirms of one channel in confirm mode; see :meth:`start`."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self._last_tag = 0
        self._pending: dict[int, UUID] = {}  # delivery tag -> event, in publishing order
        self._nacked: set[UUID] = set()

    @classmethod
    def start(cls, channel: Any) -> PublisherConfirms | None:
        """Put ``channel`` in confirm mode; ``None`` for a transport without confirms."""
        if not callable(getattr(channel, "confirm_select", None)):
            return None  # Redis, filesystem: a publish that returned is stored
        confirms = cls(channel)
        channel.confirm_select()
        channel.events["basic_ack"].add(confirms._on_ack)
        channel.events["basic_nack"].add(confirms._on_nack)
        return confirms

    def published(self, event_id: UUID) -> None:
        """Note one message just published for ``event_id`` (tags count from 1 per channel)."""
        self._last_tag += 1
        self._pending[self._last_tag] = event_id

    def wait(self, timeout: float) -> set[UUID]:
        """Wait for every confirm; return the events with a message nacked or unconfirmed."""
        deadline = time.monotonic() + timeout
        while self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._channel.connection.drain_events(timeout=remaining)
            except TimeoutError:
                break
        return self.unconfirmed()

    def poll(self) -> None:
        """Read the confirms that have arrived, without waiting for more."""
        while self._pending:
            try:
                self._channel.connection.drain_events(timeout=0)
            except TimeoutError:
                return

    def waiting(self) -> bool:
        """Whether a message published on this channel still waits for its confirm."""
        return bool(self._pending)

    def unconfirmed(self) -> set[UUID]:
        """Events with a message the broker refused or has not confirmed yet."""
        return self._nacked | set(self._pending.values())

    def refused(self) -> set[UUID]:
        """Events with a message the broker refused (nacked)."""
        return set(self._nacked)

    def unanswered(self) -> set[UUID]:
        """Events with a message the broker has neither confirmed nor refused yet: it may
        hold it or not."""
        return set(self._pending.values())

    def forget(self, event_ids: set[UUID]) -> None:
        """Forget the refusals of a batch waited for (batches share a kept channel)."""
        self._nacked -= event_ids

    def settle(self, event_ids: set[UUID]) -> tuple[set[UUID], set[UUID]] | None:
        """(taken, refused) of a batch once no message of it waits for its confirm (else
        ``None``); its refusals are forgotten then, so batches may share the channel."""
        if not event_ids.isdisjoint(self._pending.values()):
            return None
        refused = event_ids & self._nacked
        self._nacked -= refused
        return event_ids - refused, refused

    def _settle(self, tag: int, multiple: bool) -> list[UUID]:
        if not multiple:
            event_id = self._pending.pop(tag, None)
            return [] if event_id is None else [event_id]
        tags = []
        for pending in self._pending:  # ascending: stop at the first tag not covered
            if pending > tag:
                break
            tags.append(pending)
        return [self._pending.pop(t) for t in tags]

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked.update(self._settle(tag, multiple))
