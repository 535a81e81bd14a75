from __future__ import annotations

from django.db import models


class HandlerRun(models.Model):
    """One run of a test handler: what the worker (or the publisher) did, visible to tests."""

    handler = models.CharField(max_length=100)
    event_id = models.UUIDField()
    event_name = models.CharField(max_length=200)
    payload = models.JSONField(default=dict)
    correlation_id = models.UUIDField(null=True)
    causation_id = models.UUIDField(null=True)
    pid = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)


class Order(models.Model):
    total = models.FloatField()
