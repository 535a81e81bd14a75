"""``async def`` views that publish with ``apublish`` / ``apublish_many``."""

from __future__ import annotations

import asyncio
import json

from django.http import HttpRequest, JsonResponse

from django_events import InvalidPayload, apublish, apublish_many, current_event


async def publish_orders(request: HttpRequest) -> JsonResponse:
    """POST ``{"payload": {...}}`` or ``{"many": [{...}, ...]}``: publish orders.placed."""
    body = json.loads(request.body or b"{}")
    try:
        if "many" in body:
            events = await apublish_many([("orders.placed", p) for p in body["many"]])
        else:
            events = [await apublish("orders.placed", body["payload"])]
    except InvalidPayload as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse(
        {
            "ids": [str(e.id) for e in events],
            "loop": id(asyncio.get_running_loop()),
            "current": current_event() is not None,
        }
    )
