from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DjangoEventsConfig(AppConfig):
    name = "django_events"
    label = "django_events"
    verbose_name = _("Events")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.checks import Tags, register
        from django.core.signals import setting_changed
        from django.db.models.signals import post_delete, post_save
        from django.utils.module_loading import autodiscover_modules

        from django_events import checks, tasks  # noqa: F401 - tasks registers django_events.deliver
        from django_events.conf import conf
        from django_events.inbound.checks import check_inbound
        from django_events.wiring.registry import get_registry

        register(checks.check_configuration, "django_events")
        register(checks.check_handlers, "django_events")
        register(checks.check_celery, "django_events")
        register(checks.check_tasks, "django_events")
        register(checks.check_database, "django_events")
        register(checks.check_upcasters, "django_events")
        register(checks.check_lock, "django_events")
        register(checks.check_endpoints, "django_events", Tags.database)  # reads rows
        register(checks.check_worker_connections, "django_events", deploy=True)
        register(check_inbound, "django_events")
        setting_changed.connect(_reset_on_settings_change, dispatch_uid="django_events.reset")
        # A publisher's list of webhook endpoints is read again after a change in this
        # process (other processes: after WEBHOOK_ENDPOINTS["refresh"] seconds).
        endpoint = self.get_model("WebhookEndpoint")
        post_save.connect(_forget_endpoints, endpoint, dispatch_uid="django_events.endpoints")
        post_delete.connect(_forget_endpoints, endpoint, dispatch_uid="django_events.endpoints")
        post_delete.connect(_endpoint_deleted, endpoint, dispatch_uid="django_events.deleted")
        if conf.AUTODISCOVER:
            autodiscover_modules("events")  # apps' events.py modules declare @event classes
        get_registry()


def _reset_on_settings_change(*, setting: str, **kwargs: Any) -> None:
    if setting in ("DJANGO_EVENTS", "USE_TZ"):  # the registry holds USE_TZ's clock
        from django_events.wiring.registry import reset_registry

        reset_registry()
        _forget_endpoints()


def _endpoint_deleted(*, instance: Any, using: str, **kwargs: Any) -> None:
    from functools import partial

    from django.db import transaction

    from django_events.delivery.recording import event_log_alias
    from django_events.operations.pausing import endpoint_deleted

    # Its pause and deliveries are in the event log, where the routers put it: maybe not
    # the endpoint's database (``using``).
    alias = event_log_alias()
    if alias == using:  # in the deletion's transaction, undone with it
        endpoint_deleted(instance.pk, using=alias)
    else:  # not for a deletion rolled back (at once outside a transaction)
        transaction.on_commit(partial(endpoint_deleted, instance.pk, using=alias), using=using)


def _forget_endpoints(**kwargs: Any) -> None:
    from django_events.delivery.endpoints import forget

    forget()
