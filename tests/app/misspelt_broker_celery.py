"""A Celery app whose broker URL's scheme names no kombu transport: django_events.E208."""

from __future__ import annotations

from celery import Celery

app = Celery("misspelt_broker", set_as_current=False)  # not current: changes no other test
app.conf.broker_url = "redsi://user:s3cret@127.0.0.1:6379/8"
