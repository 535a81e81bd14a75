# Ordered deliveries: an index of the unfinished ones of each key (issue 19).

from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("django_events", "0009_unfinished_deliveries"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="delivery",
            index=models.Index(
                condition=models.Q(
                    ("sequence__isnull", False),
                    models.Q(("status__in", ["succeeded", "resolved"]), _negated=True),
                ),
                fields=["subscription", "ordering_key", "sequence"],
                name="django_events_dlv_turn_idx",
            ),
        ),
    ]
