"""Importing this module leaves a file behind: proof that a worker imported it."""

from __future__ import annotations

import os
from pathlib import Path

_marker = os.environ.get("DJANGO_EVENTS_IMPORT_MARKER")
if _marker:
    Path(_marker).write_text("imported")


def handle(event: object) -> None:
    """Never to be called by a worker: messages name subscriptions, not handlers."""
