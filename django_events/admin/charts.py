"""SVG charts of the dashboard, drawn on the server (no script, nothing from a CDN).

Readable without colour: every bar carries its figure in words, failures are hatched, p50 is
a circle and p95 a square. Names are escaped, long ones shortened (in full in a tooltip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from django_events.admin.dashboard import BOUNDS_MS, SubscriptionStats

ROW = 30
NAME_W = 190
PLOT_X, PLOT_W = 200, 220
LABEL_X = PLOT_X + PLOT_W + 12
WIDTH = LABEL_X + 250
CHAR_W = 7.3
TOP = 10


def duration_text(ms: float | None) -> str:
    """``≤ 20 ms``, ``≤ 2 s``, ``> 60 s`` for a bucket bound; ``-`` when nothing was measured."""
    if ms is None:
        return "-"
    if math.isinf(ms):
        return f"> {BOUNDS_MS[-1] / 1000:g} s"
    return f"≤ {ms:g} ms" if ms < 1000 else f"≤ {ms / 1000:g} s"


def _svg(height: int, title: str, body: list[str]) -> SafeString:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="de-chart" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">'
        f"<title>{escape(title)}</title>"
        '<defs><pattern id="de-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" class="de-c-fail-bg"/>'
        '<line x1="0" y1="0" x2="0" y2="6" class="de-c-hatch"/></pattern></defs>'
    )
    # Safe: every text in it went through escape(); the rest is markup written here.
    return mark_safe(head + "".join(body) + "</svg>")


def _name(y: int, name: str) -> str:
    chars = int(NAME_W / CHAR_W)
    shown = name if len(name) <= chars else name[: chars - 1] + "…"
    return (
        f'<text x="4" y="{y + 19}" class="de-c-name"><title>{escape(name)}</title>'
        f"{escape(shown)}</text>"
    )


def _label(y: int, text: str) -> str:
    return f'<text x="{LABEL_X}" y="{y + 19}" class="de-c-label">{escape(text)}</text>'


def deliveries_chart(rows: Sequence[SubscriptionStats], window: str) -> SafeString:
    """Horizontal bars: deliveries per subscription, the failed part hatched."""
    most = max((r.windows[window].deliveries for r in rows), default=0) or 1
    body = []
    for i, row in enumerate(rows):
        w = row.windows[window]
        y = TOP + i * ROW
        full = PLOT_W * w.deliveries / most
        failed = PLOT_W * w.failed / most
        body.append(_name(y, row.name))
        body.append(
            f'<rect x="{PLOT_X}" y="{y + 6}" width="{full:.1f}" height="18" class="de-c-bar"/>'
        )
        if w.failed:
            body.append(
                f'<rect x="{PLOT_X}" y="{y + 6}" width="{max(failed, 2):.1f}" height="18" '
                'class="de-c-failed" fill="url(#de-hatch)"/>'
            )
        rate = f" ({w.failure_rate:.1%})" if w.failure_rate is not None else ""
        body.append(_label(y, f"{w.deliveries:,} · {w.failed:,} failed{rate}"))
    height = TOP + max(len(rows), 1) * ROW + 8
    return _svg(height, f"Deliveries per subscription, last {window}", body)


def durations_chart(rows: Sequence[SubscriptionStats], window: str) -> SafeString:
    """Handler time per subscription on a log scale: p50 a circle, p95 a square."""
    low, high = math.log10(BOUNDS_MS[0]), math.log10(BOUNDS_MS[-1] * 2)

    def x(ms: float) -> float:
        ms = BOUNDS_MS[-1] * 2 if math.isinf(ms) else ms
        return PLOT_X + PLOT_W * (math.log10(ms) - low) / (high - low)

    body = []
    for tick in (1, 10, 100, 1_000, 10_000):
        tx = x(tick)
        body.append(
            f'<line x1="{tx:.1f}" y1="{TOP}" x2="{tx:.1f}" y2="{TOP + len(rows) * ROW}" '
            'class="de-c-grid"/>'
        )
    for tick in (1, 100, 10_000):  # every other decade: labels that never touch
        tx = x(tick)
        text = f"{tick:g} ms" if tick < 1000 else f"{tick / 1000:g} s"
        body.append(
            f'<text x="{tx:.1f}" y="{TOP + len(rows) * ROW + 14}" class="de-c-tick" '
            f'text-anchor="middle">{escape(text)}</text>'
        )
    for i, row in enumerate(rows):
        w = row.windows[window]
        y = TOP + i * ROW
        body.append(_name(y, row.name))
        if w.p50 is None or w.p95 is None:
            body.append(_label(y, "not measured"))
            continue
        x50, x95 = x(w.p50), x(w.p95)
        body.append(
            f'<line x1="{x50:.1f}" y1="{y + 15}" x2="{x95:.1f}" y2="{y + 15}" class="de-c-range"/>'
            f'<circle cx="{x50:.1f}" cy="{y + 15}" r="5" class="de-c-p50"/>'
            f'<rect x="{x95 - 5:.1f}" y="{y + 10}" width="10" height="10" class="de-c-p95"/>'
        )
        body.append(_label(y, f"p50 {duration_text(w.p50)} · p95 {duration_text(w.p95)}"))
    height = TOP + max(len(rows), 1) * ROW + 24
    return _svg(height, f"Handler time per subscription, last {window}", body)
