"""A Celery app that accepts pickle: the system checks must refuse it (django_events.E204)."""

from __future__ import annotations

from celery import Celery

# Not the current app, so that importing this module changes nothing for other tests.
app = Celery("pickle_app", set_as_current=False)
app.conf.accept_content = ["pickle", "json"]
