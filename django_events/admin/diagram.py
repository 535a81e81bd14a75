"""The wiring as an SVG picture, drawn on the server from the declarations (no script, no CDN).

Events on the left, subscriptions on the right (their mode, what runs them: celery or tasks,
and their queue), one arrow per (event, subscription) link.
Everything a colour says is also said in words or line style: a paused subscription has a
dashed box and the word "paused", a failing one a thick box and "N failed", a filtered link
(``when``) a dashed arrow. Every name is escaped; long ones are shortened, in full in a
``<title>`` tooltip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from django_events.wiring.describing import SubscriptionInfo, Wiring, carried

ROW = 72  # vertical room of one box
BOX_H = 62  # three lines: name, detail, state
EVENT_X, EVENT_W = 8, 250
SUB_X, SUB_W = 400, 320
WIDTH = SUB_X + SUB_W + 8
CHAR_W = 7.3  # 12 px monospace, generously
TOP = 8
LEGEND_H = 40


@dataclass(frozen=True)
class _Box:
    y: int
    lines: list[tuple[str, str]]  # (text, css class)
    title: str
    css: str


def wiring_svg(wiring: Wiring, state: Mapping[str, Mapping[str, Any]]) -> SafeString:
    """The SVG of ``wiring``; ``state`` maps subscription names to ``paused``/``failed``."""
    subscriptions: dict[str, SubscriptionInfo] = {}
    links: list[tuple[str, SubscriptionInfo]] = []
    for event in wiring.events:
        for s in event.subscriptions:
            subscriptions.setdefault(s.name, s)
            links.append((event.name, s))
    rows = max(len(wiring.events), len(subscriptions), 1)
    height = TOP + rows * ROW + LEGEND_H
    event_y = _spread(len(wiring.events), rows)
    sub_y = _spread(len(subscriptions), rows)
    events = {e.name: event_y[i] for i, e in enumerate(wiring.events)}
    subs = {name: sub_y[i] for i, name in enumerate(subscriptions)}

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="de-diagram" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
        'aria-labelledby="de-diagram-title">',
        '<title id="de-diagram-title">Events and the subscriptions they reach</title>',
        '<defs><marker id="de-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'class="de-d-arrowhead"/></marker></defs>',
    ]
    for event_name, s in links:
        y1, y2 = events[event_name] + BOX_H // 2, subs[s.name] + BOX_H // 2
        x1, x2 = EVENT_X + EVENT_W, SUB_X
        mid = (x1 + x2) // 2
        css = "de-d-link de-d-filtered" if s.when is not None else "de-d-link"
        parts.append(
            f'<path class="{css}" d="M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2 - 2} {y2}" '
            'marker-end="url(#de-arrow)"/>'
        )
    for event in wiring.events:
        count = len(event.subscriptions)
        detail = f"{count} subscription{'s' if count != 1 else ''}"
        parts.append(
            _box(
                EVENT_X,
                EVENT_W,
                _Box(
                    events[event.name],
                    [(event.name, "de-d-name"), (detail, "de-d-detail")],
                    event.name,
                    "de-d-event",
                ),
            )
        )
    for name, s in subscriptions.items():
        info = state.get(name, {})
        detail = carried(s)  # async via celery · big-orders
        flags = []
        css = "de-d-sub"
        if info.get("paused"):
            flags.append("paused")
            css += " de-d-paused"
        if info.get("failed"):
            flags.append(f"{info['failed']} failed")
            css += " de-d-failing"
        if info.get("held"):
            flags.append(f"{info['held']} held")
        lines = [(name, "de-d-name"), (detail, "de-d-detail")]
        if flags:
            lines.append((", ".join(flags), "de-d-state"))
        title = f"{name} ({s.handler}): " + " · ".join([detail, *flags])
        parts.append(_box(SUB_X, SUB_W, _Box(subs[name], lines, title, css)))
    parts.append(_legend(TOP + rows * ROW + 6))
    parts.append("</svg>")
    # Safe: every text in it went through escape(); the rest is markup written here.
    return mark_safe("".join(parts))


def _spread(count: int, rows: int) -> list[int]:
    """The top of ``count`` boxes spread over ``rows`` rows, centred."""
    if count == 0:
        return []
    step = rows * ROW / count
    return [int(TOP + i * step + (step - ROW) / 2) for i in range(count)]


def _box(x: int, width: int, box: _Box) -> str:
    chars = int((width - 16) / CHAR_W)
    texts = "".join(
        f'<text x="{x + 8}" y="{box.y + 19 + 17 * i}" class="{css}">{escape(_fit(text, chars))}'
        "</text>"
        for i, (text, css) in enumerate(box.lines)
    )
    return (
        f'<g class="{box.css}"><title>{escape(box.title)}</title>'
        f'<rect x="{x}" y="{box.y}" width="{width}" height="{BOX_H}" rx="6"/>{texts}</g>'
    )


def _fit(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _legend(y: int) -> str:
    items = [
        ('<line x1="0" y1="6" x2="28" y2="6" class="de-d-link"/>', "delivered"),
        ('<line x1="0" y1="6" x2="28" y2="6" class="de-d-link de-d-filtered"/>', "filtered (when)"),
        (
            '<rect x="0" y="0" width="28" height="12" rx="3" class="de-d-box de-d-paused"/>',
            "paused",
        ),
        (
            '<rect x="0" y="0" width="28" height="12" rx="3" class="de-d-box de-d-failing"/>',
            "failing",
        ),
    ]
    x, out = 8, []
    for shape, label in items:
        out.append(
            f'<g transform="translate({x} {y})" class="de-d-legend">{shape}'
            f'<text x="34" y="11" class="de-d-detail">{escape(label)}</text></g>'
        )
        x += 40 + int(len(label) * CHAR_W) + 24
    return "".join(out)
