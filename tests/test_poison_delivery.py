"""Poison input meets a real `celery worker` (prefork): nothing stops a worker or loops.

Runs on the filesystem transport, RabbitMQ and Redis; on SQLite or PostgreSQL (DATABASE_URL).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from django_events import InvalidPayload, publish
from django_events.delivery.messages import TASK_NAME, build_message
from django_events.models import Delivery, EventRecord
from tests import brokers
from tests.app.models import HandlerRun
from tests.test_delivery import Broker
from tests.worker import start_worker, wait_for, wait_idle

pytestmark = [pytest.mark.servers, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module", params=brokers.worker_kinds("filesystem", "amqp", "redis"))
def broker(request, django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[Broker]:
    kind = request.param
    folder = tmp_path_factory.mktemp(f"poison-{kind}")
    with start_worker(kind, folder, prefix=f"poison-{kind}", manifest="poison.yaml") as worker:
        yield Broker(kind, worker.queue, worker, folder / "unused")


@pytest.fixture
def wired(broker: Broker) -> Iterator[Broker]:
    with brokers.delivery_wiring(broker.kind, broker.queue, "poison.yaml"):
        yield broker


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def runs(handler: str, event_id: Any) -> int:
    return HandlerRun.objects.filter(handler=handler, event_id=event_id).count()


def test_the_deepest_payload_publish_accepts_is_delivered(wired: Broker) -> None:
    """The bound sits well below what a prefork pool carries (pickle stops near 500)."""
    deepest = {"deep": nested(63)}  # the payload object is the first level
    with pytest.raises(InvalidPayload, match=r"\$\.deep(\[0\]){63}: nested deeper than 64"):
        publish("poison.any", {"deep": nested(64)})
    event = publish("poison.any", deepest)

    run = wait_for(
        lambda: HandlerRun.objects.filter(handler="record", event_id=event.id).first(),
        what="the deepest payload's delivery",
    )
    assert run.payload == deepest
    # The handler's row commits before the worker writes the delivery's outcome.
    wait_for(
        lambda: Delivery.objects.filter(event_id=event.id, status="succeeded").exists(),
        what="the deepest payload's delivery outcome",
    )
    assert wired.worker.process is not None and wired.worker.process.poll() is None
    assert "Unrecoverable error" not in wired.worker.log()


def test_a_handler_error_with_nul_and_a_lone_surrogate_fails_once_recorded(
    wired: Broker,
) -> None:
    event = publish("poison.fails", {"file": "a.txt"})

    failure = wait_for(
        lambda: Delivery.objects.filter(event_id=event.id, status="failed").first(),
        timeout=30,
        what="the failed delivery",
    )
    wait_idle(wired.worker)  # a third run would have run by now
    assert runs("fails_with_unstorable_text", event.id) == 2 == failure.attempts
    assert failure.last_error == "RuntimeError: bad\\x00byte \\udc80 in a.txt"
    assert "bad\\x00byte \\udc80" in failure.traceback


def _forged(event: dict[str, Any], subscription: str, **changes: Any) -> dict[str, Any]:
    message = build_message(event, subscription, "default")
    message.update(changes)
    return message


def _event_message(event: Any, payload: dict[str, Any], **changes: Any) -> dict[str, Any]:
    event_id = str(uuid.uuid4())
    return {
        "id": event_id,
        "name": event,
        "payload": payload,
        "headers": {},
        "occurred_at": "2025-03-01T12:00:00+00:00",
        "correlation_id": event_id,
        "causation_id": None,
        **changes,
    }


def test_forged_messages_are_rejected_or_recorded_once_never_run_or_looped(
    wired: Broker,
) -> None:
    """Someone with write access to the broker sends `django_events.deliver` tasks by hand."""
    as_list = _event_message(["poison.fails"], {})
    negative = _event_message("poison.fails", {"file": "negative"})
    huge = _event_message("poison.fails", {"file": "huge"})
    nul = _event_message("poison.fails", {"file": "nul\u0000"})
    surrogate_key = _event_message("poison.fails", {"file\udc80": "x"})
    unwired = _event_message("poison.fails", {"file": "unwired"})
    rejected = [
        _forged(as_list, "poison-fails"),
        _forged(negative, "poison-fails", prior_attempts=-1_000_000),
        _forged(huge, "poison-fails", prior_attempts=10**12),
        _forged(nul, "poison-fails"),
        _forged(surrogate_key, "poison-fails"),
    ]
    start = len(wired.worker.log())
    for message in [*rejected, _forged(unwired, "poison-record")]:
        wired.app.send_task(TASK_NAME, args=(message,), queue=wired.queue, serializer="json")
    after = publish("poison.any", {"n": 1})

    wait_for(lambda: runs("record", after.id), what="an event sent after them")
    failure = wait_for(
        lambda: Delivery.objects.filter(event_id=unwired["id"]).first(),
        what="the failure of the unwired pair",
    )
    log = wait_for(
        lambda: (
            (text := wired.worker.log()[start:]).count("Rejected a malformed django_events message")
            >= len(rejected)
            and text
        ),
        what="the rejections",
    )
    wait_idle(wired.worker)  # a message going round again would show up by now
    assert (failure.subscription, failure.status, failure.attempts) == (
        "poison-record",
        "failed",
        0,  # no run: `Delivery.attempts` counts handler runs (DESIGN 3.7)
    )
    assert "'poison-record' does not receive event 'poison.fails'" in failure.last_error
    ids = [as_list["id"], negative["id"], huge["id"], nul["id"], surrogate_key["id"], unwired["id"]]
    assert not HandlerRun.objects.filter(event_id__in=ids).exists()  # no handler ran
    assert list(Delivery.objects.filter(event_id__in=ids)) == [failure]
    assert list(EventRecord.objects.filter(pk__in=ids).values_list("pk", flat=True)) == [
        uuid.UUID(unwired["id"])
    ]
    log = wired.worker.log()[start:]
    assert log.count("Rejected a malformed django_events message") == len(rejected)
    assert "nul\u0000" not in log and "Traceback" not in log


def test_a_message_for_a_database_the_worker_lacks_goes_round_never_run_nor_recorded(
    tmp_path: Any,
) -> None:
    """The publisher's DATABASES has an alias the worker's lacks: the worker runs nothing,
    records nothing on its own databases, and sends the message again for one that has it
    (a worker of its own: the message goes round until the test ends)."""
    event = _event_message("poison.any", {"n": 1})
    message = _forged(event, "poison-record", db="reporting")
    logged = "Database 'reporting' is not in this worker's DATABASES ('default', 'other')"
    with (
        start_worker(
            "filesystem", tmp_path, prefix="poison-nodb", manifest="poison.yaml"
        ) as worker,
        brokers.delivery_wiring("filesystem", worker.queue, "poison.yaml"),
    ):
        brokers.filesystem.send_task(
            TASK_NAME, args=(message,), queue=worker.queue, serializer="json"
        )
        log = wait_for(
            lambda: (text := worker.log()).count(logged) >= 2 and text,
            timeout=30,
            what="the message to come round again",
        )

    assert f"subscription 'poison-record', event poison.any {event['id']} not run" in log
    assert "Traceback" not in log
    assert not HandlerRun.objects.filter(event_id=event["id"]).exists()
    assert not Delivery.objects.filter(event_id=event["id"]).exists()
    assert not EventRecord.objects.filter(pk=event["id"]).exists()
