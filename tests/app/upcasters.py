"""Upcasters the tests declare: ``orders.placed`` v1 -> v2 -> v3 and broken ones."""

from __future__ import annotations

from typing import Any


def split_total(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 -> v2: ``total`` (a number) becomes ``amount`` in cents plus a ``currency``."""
    payload = dict(payload)
    payload["amount"] = round(payload.pop("total") * 100)
    payload["currency"] = "EUR"
    return payload


def add_channel(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 -> v3: a required ``channel``; everything before v3 came from the web shop."""
    return {**payload, "channel": "web"}


def explode(payload: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("upcaster exploded on purpose")


def drop_everything(payload: dict[str, Any]) -> dict[str, Any]:
    """Returns a payload the next version's schema refuses."""
    return {"unexpected": True}


def not_a_dict(payload: dict[str, Any]) -> Any:
    return ["not", "a", "payload"]


not_callable = 42
