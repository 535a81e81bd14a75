"""The Celery app of the test project (broker from CELERY_BROKER_URL)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.accept_content = ["json"]
app.conf.task_serializer = "json"
app.conf.broker_connection_timeout = 2
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_hijack_root_logger = False
