"""The example shop's Django project."""

from __future__ import annotations

# Load the Celery app when Django starts, so that publishing uses it.
from .celery import app as celery_app

__all__ = ["celery_app"]
