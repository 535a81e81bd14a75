"""Running one handler for one event, through the interceptors' ``handle`` hooks."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from types import CoroutineType
from typing import Any

from asgiref.sync import AsyncToSync, SyncToAsync

from django_events.events import Event, attempt_number, handled_event
from django_events.wiring.compiled import Subscription


def run_handler(
    subscription: Subscription, event: Event, interceptors: Sequence[Any], attempt: int = 1
) -> Any:
    """Call the subscription's handler with ``event`` as the current event.

    An ``async def`` handler is awaited to completion here, inside the interceptors, so they
    time and see the body's run, not the creation of a coroutine.
    """
    handler = subscription.handler()
    if subscription.is_async:
        handler = partial(run_coroutine_function, handler)
    # The context variables set and reset by hand, not by a context manager: this runs for
    # every handler call (figure 1).
    handled = handled_event.set(event)
    try:
        if not interceptors:
            return _finish(handler(event))
        call_next: Any = handler
        for interceptor in reversed(interceptors):
            call_next = partial(_intercept, interceptor, subscription, call_next)
        token = attempt_number.set(attempt)
        try:
            return _finish(call_next(event))
        finally:
            attempt_number.reset(token)
    finally:
        handled_event.reset(handled)


def _intercept(interceptor: Any, subscription: Subscription, call_next: Any, event: Event) -> Any:
    return interceptor.handle(event, subscription, call_next)


def _finish(result: Any) -> Any:
    # A sync callable that returned a coroutine (a lambda around an async function): the
    # body has not run yet, and a delivery only counts once it has.
    if type(result) is CoroutineType:
        return run_coroutine_function(_await, result)
    return result


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def run_coroutine_function(function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """Run ``await function(*args)`` to completion from synchronous code; return its result.

    Inside ``sync_to_async`` (an ASGI request, ``apublish``) it runs on the server's event
    loop, as ``async_to_sync`` does. Elsewhere (a worker, a WSGI thread) it runs on one event
    loop kept for the whole process, not a new loop per call. Either way the coroutine's
    thread-sensitive ``sync_to_async`` calls (Django's async ORM) come back to this thread,
    with its database connection and open transaction.
    """
    local = SyncToAsync.threadlocal
    above = getattr(local, "main_event_loop", None)
    above_pid = getattr(local, "main_event_loop_pid", None)
    # A loop that is not running is one left behind by code that ran here before (its
    # async_to_sync is over): scheduling on it would start a new loop for every call.
    if above is not None and above_pid == os.getpid() and above.is_running():
        return AsyncToSync(function)(*args)
    # asgiref's own hook for "the loop above this sync thread": async_to_sync then schedules
    # on our loop instead of starting a loop (and a thread) for this one call.
    local.main_event_loop, local.main_event_loop_pid = _process_loop(), os.getpid()
    try:
        return AsyncToSync(function)(*args)
    finally:
        local.main_event_loop, local.main_event_loop_pid = above, above_pid


_loop: asyncio.AbstractEventLoop | None = None
_loop_pid = 0
_loop_lock = threading.Lock()


def _process_loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for async handlers, running in a daemon thread."""
    global _loop, _loop_pid
    pid = os.getpid()
    if _loop is not None and _loop_pid == pid:
        return _loop
    with _loop_lock:
        if _loop is None or _loop_pid != pid:  # none yet, or inherited through fork()
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="django_events-async-handlers", daemon=True
            ).start()
            _loop, _loop_pid = loop, pid
    return _loop
