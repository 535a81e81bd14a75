from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from tests.app.async_views import publish_orders

urlpatterns = [
    path("admin/", admin.site.urls),
    path("events/", include("django_events.urls")),
    path("async/orders/", publish_orders),
]
