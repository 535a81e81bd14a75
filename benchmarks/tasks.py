"""Figure 9's baseline: a plain ``django.tasks`` task doing what our handler does."""

from __future__ import annotations

from typing import Any

try:
    from django.tasks import task  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # Django 5.2: the backport
    from django_tasks import task  # type: ignore[no-redef,unused-ignore]

from .handlers import bump


@task()  # type: ignore[untyped-decorator,unused-ignore]
def raw_count(payload: dict[str, Any]) -> None:
    bump(payload)
