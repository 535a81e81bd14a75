"""The private APIs of Celery, kombu and py-amqp the package leans on, one test each.

Each is used in one place only (named in the test). When an upgrade changes one, this file
fails first and says which, before a delivery test fails in a way that is hard to read.
CI runs it on the newest versions and on the oldest ones pyproject.toml allows.
"""

from __future__ import annotations

import inspect
import os
import time
import uuid
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from kombu.transport import filesystem

from django_events.contrib import filesystem_transport


def test_celery_state_holds_the_current_app_and_every_app() -> None:
    # django_events.delivery.broker.celery_app() tells the project's app from Celery's fallback.
    from celery import _state

    from django_events.delivery.broker import _is_celery_fallback

    app = Celery("private-api-probe", set_as_current=True)
    try:
        assert _state._tls.current_app is app, "celery._state._tls.current_app changed"
        assert app in list(_state._apps), "celery._state._apps changed"
        assert _state.default_app is None or isinstance(_state.default_app, Celery)
        assert not _is_celery_fallback(app)
    finally:
        _state._tls.current_app = None
    # The fallback Celery creates when a current app is asked for and there is no default.
    default = _state.default_app
    _state.default_app = None
    try:
        fallback = _state._get_current_app()
        assert fallback is _state.default_app, "celery._state._get_current_app changed"
        assert _is_celery_fallback(fallback), "Celery's fallback app is made another way"
    finally:
        _state.default_app = default


@pytest.mark.parametrize("method", ["_put", "_queue_bind"])
def test_kombu_filesystem_channel_has_the_methods_our_transport_overrides(method: str) -> None:
    # django_events.contrib.filesystem_transport.Channel overrides these.
    theirs = inspect.signature(getattr(filesystem.Channel, method))
    ours = inspect.signature(getattr(filesystem_transport.Channel, method))
    assert list(theirs.parameters)[: len(ours.parameters) - 1] == list(ours.parameters)[:-1] or (
        [p for p in theirs.parameters if p != "kwargs"]
        == [p for p in ours.parameters if p != "kwargs"]
    ), f"kombu's filesystem Channel.{method}{theirs} no longer matches ours {ours}"


def test_kombu_filesystem_names_its_exchange_tables_and_bindings_as_we_write_them() -> None:
    # Our _queue_bind creates `<exchange>.exchange` holding exchange_queue_t tuples.
    assert filesystem.exchange_queue_t._fields == ("routing_key", "pattern", "queue")
    source = inspect.getsource(filesystem.Channel)
    assert '.exchange"' in source or ".exchange'" in source or "exchange_file" in source


def test_celery_runs_the_event_loop_for_transports_that_say_they_are_asynchronous() -> None:
    # django_events.contrib.filesystem_transport.Transport says so, to get Celery's own
    # prefork pool (AsynPool) instead of billiard's classic pool.
    from celery.worker.worker import WorkController

    source = inspect.getsource(WorkController.should_use_eventloop)
    assert "implements.asynchronous" in source, "Celery chooses its event loop another way"


def test_kombu_virtual_channels_drain_one_message_to_their_connection() -> None:
    # django_events.contrib.filesystem_transport.Channel._poll_folder calls drain_events()
    # without a callback while it has `_consumers` and is not `closed`.
    drain = inspect.signature(filesystem.Channel.drain_events)
    assert list(drain.parameters) == ["self", "timeout", "callback"]
    source = inspect.getsource(filesystem.Channel.drain_events)
    assert "self.connection._deliver" in source and "can_consume" in source
    with Connection("memory://") as connection:
        channel: Any = connection.default_channel
        assert channel._consumers == set() and channel.closed is False


@pytest.mark.servers
def test_py_amqp_channels_confirm_and_report_acks_through_their_events() -> None:
    # django_events.delivery.confirms.PublisherConfirms registers on these events.
    url = os.environ.get("DJANGO_EVENTS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    acks: list[tuple[int, bool]] = []
    with Connection(url, connect_timeout=5) as connection:
        channel: Any = connection.default_channel
        channel.confirm_select()
        channel.events["basic_ack"].add(lambda tag, multiple: acks.append((tag, multiple)))
        queue = f"private-api-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue=queue, auto_delete=True)
        channel.basic_publish(channel.prepare_message(b"probe"), routing_key=queue)
        deadline = time.monotonic() + 10
        while not acks and time.monotonic() < deadline:
            channel.connection.drain_events(timeout=1)
        channel.queue_delete(queue)
    assert acks and acks[0][0] == 1, "py-amqp no longer reports confirms via channel.events"


@pytest.mark.parametrize(("reuse", "closes_at_every_task"), [(None, True), (1, True), (2, False)])
def test_celerys_django_fixup_keeps_connections_for_celery_db_reuse_max_of_2_or_more(
    reuse: int | None, closes_at_every_task: bool
) -> None:
    # django_events.checks.check_worker_connections (W215) reads the key Celery's Django fixup
    # reads, and warns below 2, where the fixup still closes the connections at every task.
    from celery.fixups.django import DjangoWorkerFixup

    app = Celery("private-api-reuse", set_as_current=False)
    if reuse is not None:
        app.conf["CELERY_DB_REUSE_MAX"] = reuse
    fixup = DjangoWorkerFixup(app)
    closes = []
    fixup._close_database = lambda *args, **kwargs: closes.append(1)  # type: ignore[method-assign]
    tasks = 10
    for _ in range(tasks):  # its task_prerun and task_postrun handlers each call it
        fixup.close_database()
        fixup.close_database()

    assert fixup.db_reuse_max == reuse, "DjangoWorkerFixup no longer reads CELERY_DB_REUSE_MAX"
    if closes_at_every_task:
        assert len(closes) >= tasks - 1, closes
    else:
        assert len(closes) <= tasks // 2, closes
