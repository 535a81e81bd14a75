"""kombu's filesystem transport, with message and exchange files that only ever appear whole,
and a Celery worker that survives a killed pool process.

kombu's own transport creates a message file under its final name and then writes it; a
worker polling the folder in between moves the still empty file away, fails to decode it and
exits, and the message is gone. It creates an exchange's table file the same way, so a process
binding a queue at that moment reads an empty table and fails. This transport writes each file
under a name nobody reads and renames it into place.

It also runs in a Celery worker's event loop, polling the folder from the loop's timer (as
kombu's SQS transport polls its queues). kombu's own is not asynchronous, so Celery runs its
prefork pool without the event loop: billiard's classic pool, where the idle pool processes
read their jobs from one shared pipe under one lock, which the process waiting for a job holds
while it waits. A pool process SIGKILLed then (out of memory, a time limit, an operator) takes
the lock with it: no process ever gets a job again, the messages the worker took (their files
deleted) are neither run nor given back while it lives, and lost if it is killed. In the event
loop Celery runs its own pool (a pipe per process), which gives a dead process's jobs to
another one, or their messages back to the queue (``reject_on_worker_lost``).

Use it with ``filesystem://``::

    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT = "django_events.contrib.filesystem_transport:Transport"

It reads and writes the same folders as kombu's (``CELERY_BROKER_TRANSPORT_OPTIONS``), so
producers and workers can move to it one at a time.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.asynchronous import Hub, get_event_loop
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


def _hidden(folder: str | Path) -> Path:
    """A file of ``folder`` no reader looks at: without the queue's name, which kombu before
    5.7 looks for anywhere in a file name (``.<queue>.msg``), and 5.7 after the first dot."""
    return Path(folder, f".partial-{uuid.uuid4().hex}")


class Channel(filesystem.Channel):
    """A filesystem channel whose files appear under their names complete."""

    _hub: Hub | None = None  # the event loop that polls for this channel's consumers

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str | None, **kwargs: Any
    ) -> str:
        consumed = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        hub = get_event_loop()  # a Celery worker's; None elsewhere (drain_events polls there)
        if hub is not None and self._hub is None:
            self._hub = hub
            hub.call_soon(self._poll_folder)
        return consumed

    def _poll_folder(self) -> None:
        """Deliver what waits in the consumed queues, as the prefetch limit allows; again soon."""
        hub = self._hub
        if hub is None or self.closed or not self._consumers:
            self._hub = None  # a later basic_consume starts polling again
            return
        delivered = False
        try:
            delivered = self._drain_waiting()
        finally:  # an error that does not end the connection must not end the polling
            if delivered:
                hub.call_soon(self._poll_folder)
            else:
                hub.call_later(self.connection.polling_interval or 0, self._poll_folder)

    def _drain_waiting(self) -> bool:
        """Deliver messages until none waits or the prefetch is full; whether any was."""
        delivered = False
        while True:
            try:
                self.drain_events()  # one message, or Empty (none, or the prefetch is full)
            except Empty:
                return delivered
            delivered = True

    # kombu's filesystem signature, which differs from its virtual channel's
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        # kombu's name: the time orders the messages, the part after the first dot the queue.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        partial = _hidden(self.data_folder_out)
        try:
            partial.write_bytes(str_to_bytes(dumps(payload)))
            os.replace(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ChannelError(f"Cannot add file {name!r} to {self.data_folder_out}") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        table = self.control_folder / f"{exchange}.exchange"  # kombu's name for it
        if table.parent != self.control_folder:  # "a/b" or "../b": not a name of that folder
            raise ChannelError(f"Invalid exchange name: {exchange!r}")
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        if not table.exists() and self._create_table(table, binding):
            return
        # The table exists: kombu adds the binding to it under its lock.
        super()._queue_bind(exchange, routing_key, pattern, queue)

    def _create_table(self, table: Path, binding: tuple[str, str, str]) -> bool:
        """Create ``table`` holding ``binding``, whole; False if another process made it first."""
        self.control_folder.mkdir(parents=True, exist_ok=True)
        partial = _hidden(self.control_folder)
        try:
            partial.write_bytes(str_to_bytes(dumps([binding])))
            os.link(partial, table)  # unlike a rename, fails if the table is there already
        except FileExistsError:
            return False
        except OSError as exc:
            raise ChannelError(f"Cannot create {table}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return True


class Transport(filesystem.Transport):
    """``CELERY_BROKER_TRANSPORT = "django_events.contrib.filesystem_transport:Transport"``."""

    Channel = Channel
    # Celery runs a worker's event loop (and its own prefork pool) for asynchronous transports.
    implements = filesystem.Transport.implements.extend(asynchronous=True)

    @property
    def default_connection_params(self) -> dict[str, Any]:
        # A folder has no host: kombu's virtual transports default to "localhost", and warn
        # "No hostname was supplied" for every connection to ``filesystem://``.
        return {"port": self.default_port}
