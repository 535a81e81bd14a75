"""A Celery app on kombu's own filesystem transport: the checks warn (django_events.W205)."""

from __future__ import annotations

from celery import Celery

app = Celery("stock_filesystem", set_as_current=False)  # not current: changes no other test
app.conf.broker_url = "filesystem://"
# Folders that exist (django_events.W206 is about missing ones); nothing is ever sent here.
app.conf.broker_transport_options = {"data_folder_in": "/tmp", "data_folder_out": "/tmp"}
