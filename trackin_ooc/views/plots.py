"""Small inline SVG charts (histogram, bars) for the report: no plotting library, no files, no requests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from . import html as h

W, H = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 26, 40


def _frame(title: str, body: str, xlabel: str, ylabel: str) -> str:
    return (
        f'<svg role="img" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'font-family="sans-serif" font-size="11">'
        f"<title>{h.text(title)}</title>"
        f'<text x="{W / 2}" y="15" text-anchor="middle" font-size="12" font-weight="600">{h.text(title)}</text>'
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#57606a"/>'
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#57606a"/>'
        f"{body}"
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">{h.text(xlabel)}</text>'
        f'<text x="12" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(TOP + H - BOTTOM) / 2})">{h.text(ylabel)}</text>'
        "</svg>"
    )


def histogram_svg(
    bin_counts: ArrayLike,
    bin_edges: ArrayLike,
    *,
    title: str,
    xlabel: str,
    log: bool = False,
    color: str = "#0969da",
    unit: str = "examples",
) -> str:
    """An SVG histogram of ``bin_counts`` over bins ``bin_edges`` (one more); ``log`` scales the counts."""
    counts = np.asarray(bin_counts, dtype=np.float64)
    edges = np.asarray(bin_edges, dtype=np.float64)
    shown = np.log10(1 + counts) if log else counts
    top = float(shown.max()) if shown.size and shown.max() > 0 else 1.0
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    bar_w = plot_w / max(1, len(counts))
    bars = []
    for i, (c, s) in enumerate(zip(counts, shown)):
        bh = plot_h * s / top
        x, y = LEFT + i * bar_w, H - BOTTOM - bh
        tip = h.text(f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {int(c):,}")
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 0.5):.1f}" height="{bh:.1f}" '
            f'fill="{color}"><title>{tip}</title></rect>'
        )
    ticks = []
    for frac in (0.0, 0.5, 1.0):
        value = edges[0] + frac * (edges[-1] - edges[0])
        x = LEFT + frac * plot_w
        ticks.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{h.text(h.score(value))}</text>')
    if edges[0] < 0 < edges[-1]:
        x0 = LEFT + plot_w * (0 - edges[0]) / (edges[-1] - edges[0])
        ticks.append(
            f'<line x1="{x0:.1f}" y1="{TOP}" x2="{x0:.1f}" y2="{H - BOTTOM}" stroke="#cf222e" stroke-dasharray="3,3"/>'
        )
    peak = int(counts.max()) if counts.size else 0
    ticks.append(f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{peak:,}</text>')
    ticks.append(f'<text x="{LEFT - 4}" y="{H - BOTTOM}" text-anchor="end">0</text>')
    ylabel = f"{unit} (log scale)" if log else unit
    return _frame(title, "".join(bars) + "".join(ticks), xlabel, ylabel)


def bars_svg(
    names: Sequence[str],
    bar_values: ArrayLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    color: str = "#1a7f37",
    fmt: str = "{:.0%}",
) -> str:
    """An SVG bar chart: one bar per name, its value written above it."""
    values = np.asarray(bar_values, dtype=np.float64)
    top = float(np.nanmax(np.abs(values))) if values.size and np.nanmax(np.abs(values)) > 0 else 1.0
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    bar_w = plot_w / max(1, len(values))
    parts = []
    for i, (name, v) in enumerate(zip(names, values)):
        bh = 0.85 * plot_h * abs(v) / top  # room above the tallest bar for its value
        x, y = LEFT + i * bar_w, H - BOTTOM - bh
        parts.append(
            f'<rect x="{x + 0.15 * bar_w:.1f}" y="{y:.1f}" width="{0.7 * bar_w:.1f}" height="{bh:.1f}" '
            f'fill="{color}"><title>{h.text(f"{name}: {fmt.format(v)}")}</title></rect>'
        )
        parts.append(
            f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle">{h.text(fmt.format(v))}</text>'
        )
        label = name if len(name) <= 14 else name[:13] + "…"
        parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{h.text(label)}</text>')
    return _frame(title, "".join(parts), xlabel, ylabel)
