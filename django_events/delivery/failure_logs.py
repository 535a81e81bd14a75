"""Log records of a handler's failure with the event's redacted values masked, as the admin
shows them: an exception's text often quotes the payload (DESIGN 3.2: ``redact`` masks
fields "in the admin and logs"). Also the exception Celery is handed for a retry, which it
logs and sends in task events."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

from django_events.delivery.messages import MalformedMessage, parse_message
from django_events.delivery.sealing import Unsealable, open_event
from django_events.events import Event
from django_events.exceptions import NewerVersion, UpcastError
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


class MaskedError(Exception):
    """An exception of a delivery whose event declares ``redact``, as Celery is shown it: the
    original's type name and its text with the redacted values masked.

    ``repr()`` reads as the original's would (``RuntimeError('boom •••')``): Celery's worker
    logs ``Retry in 5s: <repr>`` at INFO and task events (Flower) carry the same repr.
    """

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(type_name, text)  # both in args: it pickles, as Celery checks
        self.type_name = type_name
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"{self.type_name}({self.text!r})"


def masked_for_celery(message: Any, exc: Exception | None) -> Exception | None:
    """``exc``, of a run of ``message`` that is retried, as Celery may show it.

    For an event that declares ``redact``, a `MaskedError`: its text masked with the payload
    the message carries (opened when sealed) and, for an older version, the payload upcast
    as the handler got it. A payload that does not open masks the whole text. Otherwise
    ``exc`` itself.
    """
    if exc is None:
        return None
    try:
        event = parse_message(message).event
    except MalformedMessage:
        return exc
    compiled = get_registry().events.get(event["name"])
    redact = compiled.declaration.redact if compiled is not None else ()
    if compiled is None or not redact:
        return exc
    name = type(exc).__name__
    try:
        data = open_event(event)["payload"]
    except Unsealable:
        return MaskedError(name, "(not shown: the event's payload does not open here)")
    payloads = [data]
    version = event.get("version", 1)
    if version != compiled.declaration.version:
        # A payload that does not upcast ran no handler: the error is the worker's own.
        with contextlib.suppress(NewerVersion, UpcastError, TypeError, ValueError):
            payloads.append(compiled.upgrade(data, int(version)))
    text = str(exc)
    for payload in payloads:
        text = redact_text(text, payload, redact)
    return MaskedError(name, text)
