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
    of the exception being handled. Text arguments and that traceback come masked."""
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
    record = logger.makeRecord(logger.name, level, path, line, msg, masked, caught, function, extra)
    if caught is not None:
        # Formatters print exc_text when it is set; exc_info stays, unmasked, for tools that
        # read the exception object itself (as they read the handler's own variables).
        record.exc_text = mask(logging.Formatter().formatException(caught))
    logger.handle(record)
