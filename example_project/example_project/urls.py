"""URLs of the example shop: only the admin (the event log lives there too)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

urlpatterns = [
    path("admin/", admin.site.urls),
]
