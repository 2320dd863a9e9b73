"""HTML pieces shared by the views, the report and the reprs: escaping, tags, data URIs, one page.

Everything that comes from a user's data (labels, decoded text, ids, feature names, paths) goes
through :func:`text` (``html.escape`` with quotes), so a ``<script>`` in a training text is shown as
text. Pages written to disk are self-contained: inline CSS, pictures as ``data:`` URIs, no scripts,
and a Content-Security-Policy that forbids any script and any request a page could make.
"""

from __future__ import annotations

import base64
import html as _html
from collections.abc import Iterable, Mapping

from ..store.guard import GENERATOR

# No scripts, no fetches, no fonts or frames from anywhere; pictures only as data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
.tko{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:13px;color:#1f2328;line-height:1.35}
.tko h1{font-size:22px;margin:8px 0 4px}.tko h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #d0d7de}
.tko h3{font-size:14px;margin:12px 0 4px}
.tko table.tko-t{border-collapse:collapse;margin:4px 0}
.tko table.tko-t th,.tko table.tko-t td{border:1px solid #d0d7de;padding:2px 8px;text-align:left;vertical-align:top}
.tko table.tko-t th{background:#f6f8fa;font-weight:600}
.tko table.tko-t td.num{text-align:right;font-variant-numeric:tabular-nums}
.tko .tko-row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:6px 0 10px}
.tko .tko-sep{width:2px;align-self:stretch;background:#d0d7de;margin:0 4px}
.tko .tko-card{border:2px solid #d0d7de;border-radius:6px;padding:3px;width:100px;background:#fff}
.tko .tko-card.wide{width:240px}
.tko .tko-card.test{border-color:#0969da}.tko .tko-card.pro{border-color:#1a7f37}
.tko .tko-card.opp{border-color:#cf222e}.tko .tko-card.sus{border-color:#9a6700}
.tko .tko-cap{font-size:11px;color:#57606a;margin-top:3px;word-break:break-word}
.tko .tko-cap b{color:#1f2328}
.tko .tko-bad{color:#cf222e;font-weight:600}
.tko img.tko-img{image-rendering:pixelated;width:100%;height:auto;display:block;background:#fff}
.tko .tko-text{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:11px;white-space:pre-wrap;
  word-break:break-word;max-height:14em;overflow:auto;margin:0}
.tko .tko-tok{border-radius:2px}
.tko .tko-note{color:#57606a;font-size:12px}
.tko details>summary{cursor:pointer;color:#0969da}
.tko .tko-legend span{display:inline-block;padding:0 6px;margin-right:6px;border-radius:3px;border:2px solid}
"""


def text(value: object) -> str:
    """``value`` as escaped HTML text (quotes too, so it is safe inside attributes)."""
    return _html.escape(str(value), quote=True)


def tag(name: str, body: str = "", /, **attrs: object) -> str:
    """``<name attrs>body</name>``; ``body`` is HTML already (escape text with :func:`text` first).

    Attribute values are escaped; ``class_`` sets ``class``; a value of None or False is left out.
    """
    parts = [name]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        parts.append(key if value is True else f'{key}="{text(value)}"')
    return f"<{' '.join(parts)}>{body}</{name}>"


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    """A ``data:`` URI of ``payload`` (base64), for pictures embedded in a page."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def img(png: bytes, alt: str, *, width: int | None = None) -> str:
    """An ``<img>`` whose picture is embedded (no file, no request)."""
    style = None if width is None else f"width:{int(width)}px"
    return (
        f'<img class="tko-img" src="{data_uri(png)}" alt="{text(alt)}"' + (f' style="{style}"' if style else "") + ">"
    )


def table(
    rows: Iterable[Iterable[object]],
    header: Iterable[object] | None = None,
    *,
    numeric: Iterable[int] = (),
    raw: bool = False,
) -> str:
    """A plain table. Cells are escaped unless ``raw`` (then they are HTML already); columns listed in
    ``numeric`` are right-aligned."""
    num = set(numeric)

    def cell(i: int, v: object, kind: str) -> str:
        body = str(v) if raw else text(v)
        return tag(kind, body, class_="num" if i in num and kind == "td" else None)

    head = "" if header is None else "<tr>" + "".join(cell(i, h, "th") for i, h in enumerate(header)) + "</tr>"
    body = "".join("<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="tko-t">{head}{body}</table>'


def key_values(pairs: Mapping[str, object] | Iterable[tuple[str, object]], *, raw_values: bool = False) -> str:
    """A two-column table of names and values (values escaped unless ``raw_values``)."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    body = "".join(f"<tr><th>{text(k)}</th><td>{v if raw_values else text(v)}</td></tr>" for k, v in items)
    return f'<table class="tko-t">{body}</table>'


def fragment(body: str) -> str:
    """HTML for a notebook cell: the styles and ``body`` inside one ``div.tko``."""
    return f'<div class="tko"><style>{CSS}</style>{body}</div>'


def page(title: str, body: str, *, kind: str = "view") -> str:
    """A whole self-contained HTML document (inline CSS, CSP forbidding scripts and requests).

    ``kind`` is recorded in a ``<meta name="generator">`` tag, by which a later overwrite recognises
    a page this package wrote.
    """
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="generator" content="{GENERATOR} {text(kind)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{text(title)}</title><style>{CSS}body{{margin:16px 24px;background:#fff}}</style></head>"
        f'<body><div class="tko">{body}</div></body></html>\n'
    )


def score(value: float) -> str:
    """A score in few characters (3 significant digits)."""
    v = float(value)
    if v != v:
        return "nan"
    return f"{v:.3g}"
