"""Typed event classes for the registry tests (a dataclass and a pydantic model)."""

from __future__ import annotations

import datetime
import decimal
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel

from django_events import event


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int = 1


@event("typed.order_placed", description="A typed order.")
@dataclass(frozen=True)
class OrderPlaced:
    """A customer placed an order (dataclass)."""

    order_id: int
    total: float
    placed_at: datetime.datetime
    lines: list[Line] = field(default_factory=list)
    coupon: str | None = None


@event("typed.payment_received", durable=False)
class PaymentReceived(BaseModel):
    """Money arrived (pydantic)."""

    payment_id: uuid.UUID
    amount: decimal.Decimal
    currency: str = "EUR"


@dataclass
class Shipment:
    """Not an @event: manifests point at it with ``type:``."""

    order_id: int
    carrier: str
    shipped_on: datetime.date
    parcels: tuple[str, ...] = ()
    tracking: dict[str, uuid.UUID] = field(default_factory=dict)
