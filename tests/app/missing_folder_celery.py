"""A Celery app on our filesystem transport whose folder is not there: django_events.W206."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

MISSING = Path(__file__).resolve().parent / "no-such-broker-folder"

app = Celery("missing_folder", set_as_current=False)  # not current: changes no other test
app.conf.broker_url = "filesystem://"
app.conf.broker_transport = "django_events.contrib.filesystem_transport:Transport"
app.conf.broker_transport_options = {
    "data_folder_in": str(MISSING),
    "data_folder_out": str(MISSING),
}
