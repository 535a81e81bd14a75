"""Include under any prefix: ``path("events/", include("django_events.urls"))``.

``POST <prefix>/<event name>/`` publishes events whose declaration has an ``inbound`` block;
``POST <prefix>/sources/<source>/`` receives the webhooks of a manifest's ``sources``.
"""

from __future__ import annotations

from django.urls import path

from django_events.inbound.sources import source
from django_events.inbound.views import inbound

app_name = "django_events"

urlpatterns = [
    path("sources/<str:source>/", source, name="source"),
    path("<str:name>/", inbound, name="inbound"),
]
