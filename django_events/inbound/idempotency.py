"""Publish an inbound event at most once per idempotency key within its retention window."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.db import IntegrityError, router, transaction
from django.utils import timezone

from django_events.exceptions import InvalidPayload, PayloadProblem
from django_events.models import EventRecord, IdempotencyKey
from django_events.publishing import publish


def scoped_key(identity: str, key: str) -> str:
    """The stored form of a caller's ``key``: one caller's keys never meet another's."""
    stored = f"{len(identity)}:{identity}:{key}"  # the length: no identity ends inside a key
    if len(stored) <= (IdempotencyKey._meta.get_field("key").max_length or 0):
        return stored
    return "sha256:" + hashlib.sha256(stored.encode()).hexdigest()


def publish_once(
    name: str,
    payload: Any,
    headers: Mapping[str, str],
    keys: Mapping[str, float],
) -> tuple[UUID, bool]:
    """Publish ``name`` unless one of ``keys`` was used for it within its retention (seconds).

    Returns the event id and whether it is the first call's (nothing published now). The
    key rows are written in the transaction that records the event, under a unique
    constraint: of two racing calls, the second one's insert fails, its publish rolls back
    and it answers the first one's id.
    """
    if payload is None:  # a JSON null: publish() would take it for no payload at all ({})
        raise InvalidPayload(name, [PayloadProblem("$", "expected an object, got null")])
    alias = router.db_for_write(EventRecord)
    if not keys:
        return publish(name, payload, headers=headers, using=alias).id, False
    rows = IdempotencyKey.objects.using(alias).filter(event_name=name, key__in=list(keys))
    now = timezone.now()
    first = rows.filter(expires_at__gt=now).values_list("event_id", flat=True).first()
    if first is not None:
        return first, True
    try:
        with transaction.atomic(using=alias):
            rows.filter(expires_at__lte=now).delete()  # an expired key starts afresh
            event = publish(name, payload, headers=headers, using=alias)
            IdempotencyKey.objects.using(alias).bulk_create(
                IdempotencyKey(
                    event_name=name,
                    key=key,
                    event_id=event.id,
                    created_at=now,
                    expires_at=now + timedelta(seconds=retention),
                )
                for key, retention in sorted(keys.items())  # one lock order: no deadlock
            )
    except IntegrityError:
        # A concurrent call with one of these keys committed first (the insert waited for it).
        first = rows.values_list("event_id", flat=True).first()
        if first is None:
            raise
        return first, True
    return event.id, False
