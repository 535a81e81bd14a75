"""Include under any prefix: ``path("events/", include("django_events.urls"))``.

``POST <prefix>/<event name>/`` publishes events whose declaration has an ``inbound`` block.
"""

from __future__ import annotations

from django.urls import path

from django_events.inbound.views import inbound

app_name = "django_events"

urlpatterns = [
    path("<str:name>/", inbound, name="inbound"),
]
