"""The current registry: built on first use, rebuilt after a reset or a new ``@event`` class."""

from __future__ import annotations

import threading

from django_events.wiring import typed
from django_events.wiring.building import build_registry
from django_events.wiring.compiled import Registry

_registry: Registry | None = None
_built_for = -1  # the typed.generation() the registry was built with
_lock = threading.Lock()


def get_registry() -> Registry:
    """Return the registry, building it on first use after start-up, a reset or an ``@event``."""
    registry = _registry
    if registry is None or _built_for != typed.generation():
        with _lock:
            registry = _build_and_store()
    return registry


def checked_registry() -> Registry:
    """The registry the system checks read: ``get_registry()``, plus, when a manifest has a
    schema error (E103), that file's declarations that match the schema (never published to),
    so one run reports every problem of the file."""
    registry = get_registry()
    return registry.checked or registry


def _build_and_store() -> Registry:
    global _registry, _built_for
    generation = typed.generation()
    if _registry is None or _built_for != generation:
        _registry, _built_for = build_registry(), generation
    return _registry


def reset_registry() -> None:
    """Forget the registry; the next use rebuilds it from settings, manifests and code."""
    global _registry
    _registry = None
