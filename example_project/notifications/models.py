from __future__ import annotations

from django.db import models


class Notification(models.Model):
    class Kind(models.TextChoices):
        BIG_ORDER = "big_order", "big order alert"
        ACTIVITY = "activity", "order activity"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    # Notifications know orders only through events: an id, no foreign key to orders.
    order_id = models.PositiveBigIntegerField()
    event_id = models.UUIDField(help_text="The event this notification is about.")
    recipient = models.CharField(max_length=200, blank=True)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["kind", "event_id"], name="one_notification_per_event"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.message}"
