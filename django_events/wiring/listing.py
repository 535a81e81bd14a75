"""The wiring as text: a table, JSON, or a Mermaid flowchart (``events_list``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from django_events.wiring.describing import EndpointInfo, SubscriptionInfo, Wiring, carried

FORMATS = ("table", "json", "mermaid")


def render(wiring: Wiring, fmt: str) -> str:
    """Render ``wiring`` in one of ``FORMATS`` (``events_list --format`` offers no other)."""
    renderers: dict[str, Callable[[Wiring], str]] = {
        "table": as_table,
        "json": as_json,
        "mermaid": as_mermaid,
    }
    return renderers[fmt](wiring)


def as_json(wiring: Wiring) -> str:
    return json.dumps(wiring.as_dict(), indent=2, sort_keys=True, default=str)


def as_table(wiring: Wiring) -> str:
    header = ["EVENT", "SUBSCRIPTION", "MODE", "VIA", "QUEUE", "FILTER", "RETRY", "FLAGS", "ORIGIN"]
    rows: list[list[str]] = []
    for event in wiring.events:
        if not event.subscriptions:
            rows.append([event.name, "-", "", "", "", "", "", "", event.origin])
        rows.extend(_row(event.name, s) for s in event.subscriptions)
    rows.extend(_row("(no event)", s) for s in wiring.unmatched)
    lines = _columns(header, rows)
    summary = f"{len(wiring.events)} event(s), {sum(len(e.subscriptions) for e in wiring.events)}"
    summary += " subscription link(s)"
    if wiring.endpoints:
        enabled = sum(1 for e in wiring.endpoints if e.enabled)
        summary += f", {len(wiring.endpoints)} webhook endpoint(s) ({enabled} enabled)"
        header = ["WEBHOOK ENDPOINT", "URL", "EVENTS", "QUEUE", "STATE", "DESCRIPTION"]
        lines += ["", *_columns(header, [_endpoint_row(e) for e in wiring.endpoints])]
    if wiring.problems:
        summary += f"; {wiring.problems} configuration error(s): run events_check"
    return "\n".join([*lines, "", summary])


def _columns(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def _endpoint_row(endpoint: EndpointInfo) -> list[str]:
    description = " ".join(endpoint.description.split())  # one line
    return [
        endpoint.name,
        endpoint.url,
        ",".join(endpoint.events),
        endpoint.queue,
        endpoint.state,
        description,
    ]


def _row(event: str, s: SubscriptionInfo) -> list[str]:
    flags = [f for f, on in (("broadcast", s.broadcast), ("idempotent", s.idempotent)) if on]
    if s.timeout:
        flags.append(f"timeout={s.timeout:g}s")
    if s.give_up_after:
        flags.append(f"give_up_after={s.give_up_after:g}s")
    if s.ordering_key:
        flags.append(f"ordered by {s.ordering_key}")
    return [
        event,
        s.name,
        s.mode,
        s.via or "",
        s.queue or "",
        _compact(s.when) if s.when is not None else "",
        retry_text(s.retry),
        ",".join(flags),
        s.origin,
    ]


def retry_text(retry: dict[str, Any] | None) -> str:
    """``3x, backoff 2s (max 300s), jitter`` for a retry policy, "" for none."""
    if not retry:
        return ""
    text = (
        f"{retry['max_attempts']}x, backoff {retry['backoff']:g}s (max {retry['max_backoff']:g}s)"
    )
    return text + (", jitter" if retry["jitter"] else "")


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def as_mermaid(wiring: Wiring) -> str:
    lines = ["flowchart LR"]
    node_ids: dict[str, str] = {}
    for i, event in enumerate(wiring.events):
        node_ids[event.name] = f"e{i}"
        lines.append(f'  e{i}(["{_label(event.name)}"])')
    for j, s in enumerate(_unique_subscriptions(wiring)):
        lines.append(f'  s{j}["{_label(s.name)}<br/>{_label(carried(s))}"]')
        for event in wiring.events:
            if any(x.name == s.name for x in event.subscriptions):
                arrow = f'-->|"{_label(_compact(s.when))}"|' if s.when is not None else "-->"
                lines.append(f"  {node_ids[event.name]} {arrow} s{j}")
    return "\n".join(lines)


def _unique_subscriptions(wiring: Wiring) -> list[SubscriptionInfo]:
    seen: dict[str, SubscriptionInfo] = {}
    for event in wiring.events:
        for s in event.subscriptions:
            seen.setdefault(s.name, s)
    for s in wiring.unmatched:
        seen.setdefault(s.name, s)
    return list(seen.values())


LABEL_CODES = str.maketrans(
    {"&": "#amp;", '"': "#quot;", "<": "#lt;", ">": "#gt;", "`": "#96;", "\n": " ", "\r": " "}
)


def _label(text: str) -> str:
    # Mermaid labels are quoted; its entity codes keep quotes and brackets literal, a line
    # break would end the statement and a backquote would start a Markdown label.
    return text.translate(LABEL_CODES)
