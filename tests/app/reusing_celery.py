"""A Celery app whose workers keep their database connections (django_events.W215)."""

from __future__ import annotations

from celery import Celery

# Not the current app, so that importing this module changes nothing for other tests.
app = Celery("reusing_app", set_as_current=False)
app.conf.accept_content = ["json"]
app.conf["CELERY_DB_REUSE_MAX"] = 1000  # as CELERY_DB_REUSE_MAX = 1000 in Django settings does
