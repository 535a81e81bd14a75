"""URLs of the example shop: the admin (the event log lives there too) and the inbound
endpoint, POST /events/<event name>/, that turns the payment provider's webhook into an event."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("events/", include("django_events.urls")),
]
