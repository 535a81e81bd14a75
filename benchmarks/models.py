"""The hand-written outbox of the baselines (no migrations: the bench database is synced)."""

from __future__ import annotations

import uuid

from django.db import models


class HandOutbox(models.Model):
    """What a team writes by hand: a row per message, marked sent once the broker took it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    task = models.CharField(max_length=200)
    payload = models.JSONField()
    created_at = models.DateTimeField()
    sent = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.task} {self.id}"


class Order(models.Model):
    """The caller's own write in figure 2's transaction (ours and the bare on_commit alike)."""

    total = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"order {self.pk}"
