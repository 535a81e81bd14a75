from __future__ import annotations

import os

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.app"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # A worker subprocess of the failure-control tests records each delivery_failed signal.
        if os.environ.get("DJANGO_EVENTS_TEST_RECORD_FAILED_SIGNAL"):
            from django_events.signals import delivery_failed

            from .handlers import record_failed_signal

            delivery_failed.connect(record_failed_signal)
        # A worker subprocess of test_failure_control_delivery whose take-back of a held row
        # fails for this subscription.
        refused = os.environ.get("DJANGO_EVENTS_TEST_REFUSE_TAKE_BACK")
        if refused:
            from .take_back_fault import install

            install(refused)
        # A worker subprocess's SUCCESS_RECORDS = "batched" interval (a db_worker's; Celery's
        # pool processes inherit it too).
        interval = os.environ.get("DJANGO_EVENTS_TEST_FLUSH_INTERVAL")
        if interval:
            from django_events.delivery import batching

            batching.FLUSH_INTERVAL = float(interval)
