"""A handler module that raises as it is imported (tests/manifests/outcomes.yaml)."""

from __future__ import annotations

raise RuntimeError("this module needs a setting the worker lacks")
