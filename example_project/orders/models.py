from __future__ import annotations

from django.db import models


class Order(models.Model):
    class Status(models.TextChoices):
        PLACED = "placed", "placed"
        CANCELLED = "cancelled", "cancelled"

    email = models.EmailField()
    total = models.DecimalField(max_digits=10, decimal_places=2)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PLACED)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"Order #{self.pk} ({self.total})"
