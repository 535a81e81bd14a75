from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from django_events.conf import conf
from django_events.wiring.registry import get_registry

from .conftest import wiring

BASE = Path(settings.BASE_DIR) / "manifests" / "base.yaml"
MANIFESTS_HINT = "A list of paths of YAML manifests."
LOCK_FILE_HINT = "The path of the events lock file (events_lock)."


def problems() -> list[tuple[str, str, str, str | None]]:
    return [(p.id, str(p.origin), p.message, p.hint) for p in get_registry().problems]


@pytest.mark.parametrize(
    ("value", "where"),
    [([3], "[0] 3"), ([BASE, None], "[1] None"), ((BASE, b"events.yaml"), "[1] b'events.yaml'")],
)
def test_a_manifest_path_that_is_not_a_path_is_E001_not_a_crash(value: object, where: str) -> None:
    with wiring(MANIFESTS=value):
        assert problems() == [
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                f"DJANGO_EVENTS['MANIFESTS'] is invalid: {where} is not a str or os.PathLike",
                MANIFESTS_HINT,
            )
        ]
        assert conf.MANIFESTS == []  # the key reads as its default until it is fixed
        err = StringIO()
        with pytest.raises(CommandError, match=r"^1 problem\(s\) found"):
            call_command("events_check", stdout=StringIO(), stderr=err)
    assert "(django_events.E001) DJANGO_EVENTS['MANIFESTS'] is invalid: " in err.getvalue()


def test_manifest_paths_may_be_str_or_path() -> None:
    with wiring(MANIFESTS=[str(BASE), BASE]):
        assert problems() == []


@pytest.mark.parametrize("value", [5, "", ["events.lock.json"], None])
def test_a_lock_file_that_is_not_a_path_is_E001(value: object) -> None:
    with wiring(LOCK_FILE=value):
        assert problems() == [
            (
                "django_events.E001",
                "settings.DJANGO_EVENTS",
                f"DJANGO_EVENTS['LOCK_FILE'] is {value!r}",
                LOCK_FILE_HINT,
            )
        ]
        lock_file = conf.LOCK_FILE
        assert lock_file == Path("events.lock.json")


@pytest.mark.parametrize("value", ["contract.lock.json", Path("contract.lock.json")])
def test_a_lock_file_may_be_str_or_path(value: object) -> None:
    with wiring(LOCK_FILE=value):
        assert problems() == []
        lock_file = conf.LOCK_FILE
        assert lock_file == Path("contract.lock.json")


@pytest.mark.parametrize(
    ("retry", "where"),
    [
        ({"max_attempts": "5"}, "['retry']['max_attempts'] '5' is not of type 'integer'"),
        ({"max_attempt": 5}, "['retry'] Additional properties are not allowed ('max_attempt' was"),
        (3, "['retry'] 3 is not of type 'object', 'null'"),
    ],
)
def test_a_webhook_endpoints_retry_error_says_what_is_wrong(retry: object, where: str) -> None:
    with wiring(WEBHOOK_ENDPOINTS={"retry": retry}):
        [(check_id, _, message, _)] = problems()

    assert check_id == "django_events.E001"
    assert message.startswith(f"DJANGO_EVENTS['WEBHOOK_ENDPOINTS'] is invalid: {where}")


def test_a_webhook_endpoints_retry_may_be_a_policy_or_none() -> None:
    for retry in (None, {}, {"max_attempts": 5}):
        with wiring(WEBHOOK_ENDPOINTS={"retry": retry}):
            assert problems() == []
