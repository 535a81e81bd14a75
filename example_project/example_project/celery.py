"""The Celery app of the example shop (``celery -A example_project worker``)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
# Every CELERY_* setting in settings.py (the broker URL, transport options...).
app.config_from_object("django.conf:settings", namespace="CELERY")
# JSON only: a worker must never unpickle what arrives from the broker (django_events.E204).
app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json")
# Finds tasks.py in installed apps; django_events registers its one task itself.
app.autodiscover_tasks()
