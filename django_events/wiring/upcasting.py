"""Upcasting: a stored or sent payload of an older version, upgraded step by step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.utils.module_loading import import_string

from django_events.exceptions import PayloadProblem, UpcastError
from django_events.wiring.validation import json_problems

Upcaster = Callable[[dict[str, Any]], Any]


def resolve_upcaster(path: str) -> Upcaster:
    """Import an upcaster ``f(payload) -> payload`` (``ImportError``/``TypeError`` if unusable)."""
    target = import_string(path)
    if not callable(target):
        raise TypeError(f"{path!r} is not callable")
    upcaster: Upcaster = target
    return upcaster


# A payload's way to the current version: (the version each upcaster upgrades from, its
# path, the upcaster), in the order they run.
Chain = tuple[tuple[int, str, Upcaster], ...]


def resolve_chain(
    name: str, version: int, current: int, steps: dict[int, str], cache: dict[int, Upcaster]
) -> Chain:
    """The upcasters that take a payload of ``version`` (not newer than ``current``) to
    ``current``, each imported once into ``cache``; a version without an upcaster has no
    step (its change was additive). Raises `UpcastError` naming a step that does not import."""
    chain = []
    for step in range(max(version, 1), current):
        path = steps.get(step)
        if path is None:
            continue
        function = cache.get(step)
        if function is None:
            try:
                function = cache[step] = resolve_upcaster(path)
            except (ImportError, TypeError) as exc:
                raise UpcastError(name, step, path, f"does not import: {exc}") from exc
        chain.append((step, path, function))
    return tuple(chain)


def run_chain(
    name: str,
    data: dict[str, Any],
    chain: Chain,
    validate: Callable[[dict[str, Any]], list[PayloadProblem]] | None = None,
) -> dict[str, Any]:
    """Return ``data`` upgraded by each upcaster of ``chain`` in turn.

    Each step must return a dict; the chain's result must be JSON and, with ``validate``,
    valid for the current schema, or the last step is named (a value an earlier step
    returned may have passed through it: a worker checks a payload once, not once a step).
    Without ``validate`` the caller checks the result (`invalid_result` names the step).
    Raises `UpcastError` naming the step that failed.
    """
    for step, path, function in chain:
        try:
            result = function(data)
        except Exception as exc:  # any error of user code: the caller records it as a failure
            raise UpcastError(name, step, path, f"raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, dict):
            raise UpcastError(
                name, step, path, f"returned {type(result).__name__}, not a payload dict"
            )
        data = result
    if not chain:
        return data
    problems = json_problems(data)
    if problems:
        details = "; ".join(map(str, problems))
        step, path, _ = chain[-1]
        raise UpcastError(name, step, path, f"returned a payload that is not JSON: {details}")
    if validate is not None and (problems := validate(data)):
        step, path, _ = chain[-1]
        raise _invalid(name, (step, path), problems)
    return data


def invalid_result(
    name: str, version: int, current: int, steps: dict[int, str], problems: list[PayloadProblem]
) -> UpcastError | None:
    """The error of a payload of ``version`` that `upcast` upgraded to ``current`` and whose
    result has schema ``problems``: it names the last step that ran (None: no step ran, the
    payload is as it was)."""
    ran = [step for step in steps if max(version, 1) <= step < current]
    if not ran:
        return None
    last = max(ran)
    return _invalid(name, (last, steps[last]), problems)


def _invalid(name: str, last: tuple[int, str], problems: list[PayloadProblem]) -> UpcastError:
    details = "; ".join(map(str, problems))
    return UpcastError(name, *last, f"returned an invalid payload: {details}")
