"""The views' model: rows of cards, each card one example with its caption, drawn as HTML or PNG.

:mod:`.show` fills rows from a result; this module turns them into a notebook fragment, a page, or
(with matplotlib) a picture.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import html as h
from .examples import Drawing

# role -> (css class, matplotlib colour, word)
ROLES = {
    "test": ("test", "#0969da", "test example"),
    "proponent": ("pro", "#1a7f37", "proponent"),
    "opponent": ("opp", "#cf222e", "opponent"),
    "suspect": ("sus", "#9a6700", "suspect"),
    "helpful": ("pro", "#1a7f37", "most helpful"),
    "harmful": ("opp", "#cf222e", "most harmful"),
}


@dataclass
class Card:
    """One example on screen: what it is (role, heading), what the store and the user say of its label,
    its score, and its drawing (None when no data was given for it)."""

    role: str
    heading: str
    drawing: Drawing | None = None
    label: str | None = None  # as stored (or as the data gives it)
    true_label: str | None = None  # as the user gave it; shown when it differs from ``label``
    score: str | None = None

    @property
    def mismatch(self) -> bool:
        return self.true_label is not None and self.label is not None and self.true_label != self.label

    def caption_lines(self) -> list[str]:
        lines = [self.heading]
        if self.label is not None:
            lines.append(f"label {self.label}" + (f", true {self.true_label}" if self.mismatch else ""))
        elif self.true_label is not None:
            lines.append(f"true {self.true_label}")
        if self.score is not None:
            lines.append(self.score)
        return lines

    def html(self) -> str:
        css = ROLES[self.role][0]
        wide = self.drawing is not None and self.drawing.wide
        body = self.drawing.html if self.drawing is not None else h.tag("div", "(no data given)", class_="tko-note")
        cap = [h.tag("b", h.text(self.heading))]
        if self.label is not None:
            cap.append(h.text(f"label {self.label}"))
            if self.mismatch:
                cap.append(h.tag("span", h.text(f"true {self.true_label}"), class_="tko-bad"))
        elif self.true_label is not None:
            cap.append(h.text(f"true {self.true_label}"))
        if self.score is not None:
            cap.append(h.text(self.score))
        caption = h.tag("div", "<br>".join(cap), class_="tko-cap")
        return h.tag("div", body + caption, class_=f"tko-card {css}" + (" wide" if wide else ""), data_role=self.role)


@dataclass
class Row:
    """A line of cards: groups (say: the test example | its proponents | its opponents) with separators."""

    title: str
    groups: list[list[Card]] = field(default_factory=list)

    @property
    def cards(self) -> list[Card]:
        return [c for g in self.groups for c in g]

    def html(self) -> str:
        parts = []
        for i, group in enumerate(self.groups):
            if i:
                parts.append('<div class="tko-sep"></div>')
            parts.extend(c.html() for c in group)
        head = h.tag("h3", h.text(self.title)) if self.title else ""
        return head + h.tag("div", "".join(parts), class_="tko-row")


def legend(roles: Sequence[str]) -> str:
    """A line naming the colours of the roles shown."""
    spans = "".join(
        f'<span style="border-color:{ROLES[r][1]}">{h.text(ROLES[r][2])}</span>' for r in dict.fromkeys(roles)
    )
    return h.tag("div", spans, class_="tko-legend tko-note")


def rows_html(title: str, note: str, rows: Sequence[Row]) -> str:
    """The HTML body of a view: its title, a note, the legend and the rows."""
    return h.tag("h2", h.text(title)) + rows_body(note, rows)


def rows_body(note: str, rows: Sequence[Row]) -> str:
    """A view's note, legend and rows, without its title (for a page that has its own headings)."""
    roles = [c.role for r in rows for c in r.cards]
    return h.tag("div", h.text(note), class_="tko-note") + legend(roles) + "".join(r.html() for r in rows)


# ---- PNG ---------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "saving a view as .png needs matplotlib: pip install 'trackin-ooc[demo]' (or save it as .html)"
        ) from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


MAX_PNG_COLUMNS = 8


def _png_lines(rows: Sequence[Row]) -> list[list[list[Card]]]:
    """Each row as its groups; a one-group row longer than MAX_PNG_COLUMNS wraps onto several lines."""
    lines = []
    for row in rows:
        if len(row.groups) == 1 and len(row.groups[0]) > MAX_PNG_COLUMNS:
            cards = row.groups[0]
            lines += [[cards[i : i + MAX_PNG_COLUMNS]] for i in range(0, len(cards), MAX_PNG_COLUMNS)]
        else:
            lines.append(list(row.groups))
    return lines


def save_png(path: str | os.PathLike, title: str, rows: Sequence[Row], *, invert: bool = False, dpi: int = 110) -> None:
    """Draw ``rows`` as a grid of small pictures (or text boxes) with captions, one line per row, a narrow
    gap between groups (the test example | its proponents | its opponents)."""
    plt = _pyplot()
    lines = _png_lines(rows)
    if not lines:
        raise ValueError("nothing to draw: the view has no examples")
    # Column layout of the widest line: cards, with a narrow gap column between groups.
    widest = max(lines, key=lambda groups: sum(len(g) for g in groups) + len(groups))
    ratios: list[float] = []
    for g, group in enumerate(widest):
        if g:
            ratios.append(0.25)
        ratios += [1.0] * len(group)
    wide = any(c.drawing is not None and c.drawing.wide for groups in lines for g in groups for c in g)
    cell_w, cell_h = (2.3, 2.1) if wide else (1.3, 1.75)
    fig, axes = plt.subplots(
        len(lines),
        len(ratios),
        figsize=(cell_w * sum(ratios), cell_h * len(lines) + 0.4),
        dpi=dpi,
        squeeze=False,
        gridspec_kw={"width_ratios": ratios},
    )
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, groups in enumerate(lines):
        col = 0
        for g, group in enumerate(groups):
            if g:
                col += 1  # the gap column
            for card in group:
                if col < len(ratios):
                    _draw_cell(axes[r, col], card, invert=invert)
                col += 1
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    from .output import PNG_SOFTWARE

    fig.savefig(path, format="png", metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)


def _draw_cell(ax, card: Card, *, invert: bool) -> None:
    colour = ROLES[card.role][1]
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(colour)
        spine.set_linewidth(1.5)
    d = card.drawing
    if d is not None and d.pixels is not None:
        pixels = np.asarray(d.pixels)
        if pixels.ndim == 2:
            ax.imshow(pixels, cmap="gray_r" if invert else "gray", interpolation="nearest")
        else:
            from .png import to_uint8

            ax.imshow(to_uint8(pixels), interpolation="nearest")
    else:
        words = d.lines if d is not None else "(no data given)"
        wrapped = "\n".join(textwrap.fill(line, 28) for line in words.splitlines()[:10])
        ax.text(
            0.03,
            0.97,
            wrapped,
            va="top",
            ha="left",
            fontsize=6,
            family="monospace",
            transform=ax.transAxes,
            clip_on=True,
        )
    lines = card.caption_lines()
    ax.set_title("\n".join(lines), fontsize=6.5, color=colour)
