"""Log records of a handler's failure with the event's redacted values masked, as the admin
shows them: an exception's text often quotes the payload (DESIGN 3.2: ``redact`` masks
fields "in the admin and logs")."""

from __future__ import annotations

import logging
import sys
from typing import Any

from django_events.events import Event
from django_events.logs import log_extra
from django_events.wiring.compiled import Subscription
from django_events.wiring.redaction import redact_text
from django_events.wiring.registry import get_registry


def log_failure(
    logger: logging.Logger,
    level: int,
    event: Event,
    subscription: Subscription,
    msg: str,
    *args: Any,
    exc_info: bool = False,
) -> None:
    """``logger.log(level, msg, *args)`` with ``log_extra``; with ``exc_info``, the traceback
    of the exception being handled. For an event that declares ``redact``, text arguments and
    that traceback come masked, and the record holds the traceback only as masked text
    (``exc_text``, with ``exc_info`` None)."""
    if not logger.isEnabledFor(level):
        return
    compiled = get_registry().events.get(event.name)
    redact = compiled.declaration.redact if compiled is not None else ()
    caught = sys.exc_info() if exc_info else None
    extra = log_extra(event, subscription)
    if not redact:  # stacklevel: the record names where log_failure was called, as below
        logger.log(level, msg, *args, exc_info=caught, extra=extra, stacklevel=2)
        return

    def mask(text: str) -> str:
        return redact_text(text, event.data, redact)

    masked = tuple(mask(a) if isinstance(a, str) else a for a in args)
    path, line, function, _ = logger.findCaller(stacklevel=2)  # where log_failure was called
    # No exc_info: a formatter given the exception formats it itself, in clear
    # (python-json-logger's JsonFormatter does, whatever exc_text says), and error trackers
    # read its message and the traceback's local variables. The record carries the masked
    # traceback as exc_text, which every formatter prints when exc_info is None. The exception
    # object itself reaches code only through the delivery_failed signal (docs/observability.md).
    record = logger.makeRecord(logger.name, level, path, line, msg, masked, None, function, extra)
    if caught is not None:
        record.exc_text = mask(logging.Formatter().formatException(caught))
    logger.handle(record)
