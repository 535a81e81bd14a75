"""kombu's filesystem transport, with message and exchange files that only ever appear whole.

kombu's own transport creates a message file under its final name and then writes it; a
worker polling the folder in between moves the still empty file away, fails to decode it and
exits, and the message is gone. It creates an exchange's table file the same way, so a process
binding a queue at that moment reads an empty table and fails. This transport writes each file
under a name nobody reads and renames it into place. Use it with ``filesystem://``::

    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT = "django_events.contrib.filesystem_transport:Transport"

It reads and writes the same folders as kombu's (``CELERY_BROKER_TRANSPORT_OPTIONS``), so
producers and workers can move to it one at a time.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

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
