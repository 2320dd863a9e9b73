"""A user's examples: read one from a dataset, tell what it is, and draw it as HTML.

Datasets are anything indexable: a torch ``Dataset`` (``Subset`` too), a Hugging Face dataset, a
list, or a ``DataLoader`` (its ``.dataset`` is read). An item is ``(input, target)``, a Mapping
(Hugging Face style: the input is every field but ``target_key``) or a bare input.

What an input is decides how it is drawn (:func:`kind_of`):

- ``image``: an array or tensor (C, H, W) or (H, W, C) with 1, 3 or 4 channels, or (H, W); also a flat
  vector whose length is a perfect square ≥ 64 that is uint8, or floats in [0, 1] or whole in 0..255
  (the digits' 64 → 8×8, MNIST's 784 → 28×28); a PIL image.
- ``tokens``: 1-D integer ids when a tokenizer is given (or a Mapping with ``input_ids``): decoded text.
- ``text``: a string.
- ``table``: other 1-D numbers, a Mapping of scalars, a pandas Series: one row of a table.
- anything else: its ``repr``, shortened.

A ``render(example) -> str | PIL image | array`` function overrides all of it: a string is shown as
text, an array or PIL image as a picture. Every string from the data is escaped.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ViewError
from . import html as h
from .png import image_png

KINDS = ("auto", "image", "tokens", "text", "table")
MAX_TABLE_FIELDS = 16
MAX_TEXT_CHARS = 600
MAX_TOKENS = 256


# ---- reading an example ------------------------------------------------------------------------
@dataclass
class Example:
    """One example as the views see it: its input, its target as the data holds it, its position."""

    position: int
    input: Any
    target: Any = None


def dataset_of(data: Any) -> Any:
    """The indexable behind ``data`` (a DataLoader's ``.dataset``), refusing what cannot be indexed."""
    if data is None:
        return None
    inner = getattr(data, "dataset", None)
    if inner is not None and hasattr(data, "batch_size") and hasattr(inner, "__getitem__"):
        data = inner
    if not hasattr(data, "__getitem__"):
        raise ViewError(
            f"cannot read examples from a {type(data).__name__}; pass the dataset itself (anything indexable "
            "by position: a torch Dataset, a Hugging Face dataset, a list)"
        )
    return data


def _numpy(x: Any) -> Any:
    """A tensor (torch, cupy, jax) as a NumPy array; other objects unchanged."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch, without importing it
        return x.detach().cpu().numpy()
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    if hasattr(x, "__array__") and not isinstance(x, (str, bytes, Mapping)) and not _is_pil(x):
        return np.asarray(x)
    if (
        isinstance(x, (list, tuple))
        and x
        and all(isinstance(v, (int, float, np.number)) or isinstance(v, (list, tuple)) for v in x)
    ):
        try:  # a Hugging Face dataset's columns come as lists
            a = np.asarray(x)
        except ValueError:
            return x
        return a if a.dtype.kind in "biuf" else x
    return x


PICTURE_KEYS = ("image", "img", "pixel_values", "picture")
TEXT_KEYS = ("text", "sentence", "content", "review")


def unwrap(x: Any, *, tokenizer: Any = None) -> Any:
    """The part of a Mapping input to draw: ``input_ids`` stay with their Mapping (tokens), a picture or
    text field is drawn alone, a Mapping of one field is that field; other Mappings are table rows."""
    if not isinstance(x, Mapping) or (tokenizer is not None and "input_ids" in x):
        return x
    for key in PICTURE_KEYS:
        if key in x and (_is_pil(x[key]) or image_array(x[key]) is not None):
            return x[key]
    for key in TEXT_KEYS:
        if isinstance(x.get(key), str):
            return x[key]
    if len(x) == 1:
        return next(iter(x.values()))
    return x


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "save") and hasattr(x, "size")


def read_example(data: Any, position: int, *, target_key: str = "labels") -> Example:
    """Item ``position`` of ``data`` split into input and target."""
    try:
        item = data[int(position)]
    except (IndexError, KeyError) as e:
        n = _length(data)
        size = f" of {n}" if n is not None else ""
        raise ViewError(
            f"example {int(position)} is not in the dataset{size} ({type(e).__name__}); pass the dataset the "
            "store was captured from"
        ) from None
    if isinstance(item, Mapping):
        target = item.get(target_key)
        fields = {k: v for k, v in item.items() if k != target_key}
        return Example(int(position), fields, target)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Example(int(position), item[0], item[1])
    return Example(int(position), item, None)


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def scalar_label(value: Any) -> Any:
    """A target that is one scalar (a class, a number) as a Python value; None for anything else."""
    value = _numpy(value)
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    return None


# ---- what an input is --------------------------------------------------------------------------
def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n and n >= 64 else None


def _looks_like_pixels(a: np.ndarray) -> bool:
    """uint8, or floats in [0, 1] or whole in 0..255; other integer vectors are ids or counts, not pixels."""
    if a.dtype == np.uint8 or a.dtype == bool:
        return True
    if a.dtype.kind != "f" or not np.all(np.isfinite(a)):
        return False
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return True
    return lo >= 0.0 and hi <= 255.0 and bool(np.all(a == np.round(a)))


def image_array(x: Any) -> np.ndarray | None:
    """``x`` as an (H, W) or (H, W, C) picture when it is one (see the module docs), else None."""
    a = _numpy(x)
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        return None
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[1] > 1 and a.shape[2] > 1 and a.shape[2] not in (3, 4):
        return np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4) and a.shape[0] > 1 and a.shape[1] > 1:
        return a
    if a.ndim == 3 and a.shape[0] in (1, 3, 4):
        return np.moveaxis(a, 0, -1)
    if a.ndim == 2 and min(a.shape) > 1:
        return a
    if a.ndim == 1 and a.dtype.kind in "uif":
        side = _square_side(a.size)
        if side is not None and _looks_like_pixels(a):
            return a.reshape(side, side)
    return None


def kind_of(x: Any, *, tokenizer: Any = None) -> str:
    """ "image", "tokens", "text", "table" or "other" (see the module docs)."""
    if isinstance(x, str):
        return "text"
    if _is_pil(x):
        return "image"
    if isinstance(x, Mapping):
        if tokenizer is not None and "input_ids" in x:
            return "tokens"
        return "table"
    if type(x).__name__ == "Series" and hasattr(x, "items"):
        return "table"
    a = _numpy(x)
    if isinstance(a, np.ndarray):
        if a.dtype.kind in "iu" and tokenizer is not None and a.size and a.squeeze().ndim <= 1:
            return "tokens"
        if image_array(a) is not None:
            return "image"
        if a.ndim <= 1 and a.dtype.kind in "biufcU":
            return "table"
    return "other"


# ---- drawing -----------------------------------------------------------------------------------
@dataclass
class Drawing:
    """How an example is drawn: HTML for a page and, for PNG output, a picture or a few lines of text."""

    html: str
    kind: str
    pixels: np.ndarray | None = None  # (H, W[, C]) uint8-able picture for matplotlib
    lines: str = ""  # plain text for a PNG cell
    wide: bool = False  # text and tables take a wider card


@dataclass
class Renderer:
    """Draws inputs of one dataset: by kind, or by the user's ``render`` function.

    ``tokenizer``: any object with ``decode(ids) -> str`` (a Hugging Face tokenizer). ``columns``: names
    of a tabular row's features. ``kind``: force one kind instead of guessing. ``invert``: draw grayscale
    pictures dark on white. ``token_weights``: per-token weights (see :func:`token_weights_for`).
    """

    render: Callable[[Any], Any] | None = None
    tokenizer: Any = None
    columns: Sequence[str] | None = None
    kind: str = "auto"
    invert: bool = False
    token_weights: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ViewError(f"kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.tokenizer is not None and not hasattr(self.tokenizer, "decode"):
            raise ViewError(
                f"tokenizer={type(self.tokenizer).__name__} has no decode(ids); pass a Hugging Face tokenizer or "
                "any object with decode"
            )

    def draw(self, example: Example, *, side: str = "train") -> Drawing:
        if self.render is not None:
            return self._draw_rendered(example)
        x = unwrap(example.input, tokenizer=self.tokenizer) if self.kind in ("auto", "image", "text") else example.input
        kind = self.kind if self.kind != "auto" else kind_of(x, tokenizer=self.tokenizer)
        if kind == "image":
            return self._draw_image(x)
        if kind == "tokens":
            ids = x["input_ids"] if isinstance(x, Mapping) else x
            mask = x.get("attention_mask") if isinstance(x, Mapping) else None
            weights = token_weights_for(self.token_weights, example.position, side)
            return self._draw_tokens(ids, mask, weights)
        if kind == "text":
            return _draw_text(str(x))
        if kind == "table":
            return self._draw_table(x)
        return _draw_text(_short_repr(x))

    # -- by kind --
    def _draw_rendered(self, example: Example) -> Drawing:
        assert self.render is not None  # only called with a render function
        try:
            out = self.render(example.input)
        except Exception as e:
            raise ViewError(
                f"render raised {type(e).__name__}: {e} on example {example.position}; fix render "
                "(it receives the example's input and returns a str, a PIL image or an array)"
            ) from e
        if isinstance(out, str):
            return _draw_text(out)
        if _is_pil(out) or image_array(out) is not None:
            return self._draw_image(out)
        raise ViewError(
            f"render returned a {type(out).__name__} for example {example.position}; return a str, "
            "a PIL image or an image array"
        )

    def _draw_image(self, x: Any) -> Drawing:
        if _is_pil(x):
            buf = io.BytesIO()
            x.save(buf, format="PNG")
            pixels = np.asarray(x.convert("RGBA" if "A" in x.getbands() else "RGB"))
            return Drawing(h.img(buf.getvalue(), "example"), "image", pixels=pixels)
        a = image_array(x)
        if a is None:
            a = _numpy(x)
            raise ViewError(
                f"an input of shape {getattr(a, 'shape', '?')} is not a picture; give (C, H, W), "
                "(H, W, C) or (H, W) arrays, or kind='table'"
            )
        png = image_png(a, invert=self.invert)
        pixels = a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a
        return Drawing(h.img(png, "example"), "image", pixels=pixels)

    def _draw_tokens(self, ids: Any, mask: Any, weights: np.ndarray | None) -> Drawing:
        if self.tokenizer is None:
            raise ViewError("token ids need a tokenizer to be shown as text; pass tokenizer= (or render=)")
        ids = np.asarray(_numpy(ids)).reshape(-1).astype(np.int64)
        keep = np.ones(len(ids), dtype=bool)
        if mask is not None:
            keep = np.asarray(_numpy(mask)).reshape(-1).astype(bool)[: len(ids)]
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        positions = [i for i in range(len(ids)) if keep[i] and int(ids[i]) not in special][:MAX_TOKENS]
        plain = _decode(self.tokenizer, [int(ids[i]) for i in positions])
        if weights is None:
            return _draw_text(plain)
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(w) != len(ids):
            raise ViewError(f"token weights have {len(w)} values for {len(ids)} tokens; give one per token")
        top = max(float(np.max(w[positions])) if positions else 0.0, 1e-30)
        spans = []
        for i, piece in zip(positions, _pieces(self.tokenizer, [int(ids[i]) for i in positions])):
            alpha = max(0.0, float(w[i]) / top)
            style = f"background:rgba(255,140,0,{alpha:.2f})"
            spans.append(h.tag("span", h.text(piece), class_="tko-tok", style=style, title=f"gradient mass {w[i]:.3g}"))
        body = h.tag("p", "".join(spans), class_="tko-text")
        return Drawing(body, "tokens", lines=_clip(plain), wide=True)

    def _draw_table(self, x: Any) -> Drawing:
        if isinstance(x, Mapping) or type(x).__name__ == "Series":
            items = [(str(k), v) for k, v in x.items()]
        else:
            a = np.asarray(_numpy(x)).reshape(-1)
            names = list(self.columns) if self.columns is not None else [str(i) for i in range(len(a))]
            if len(names) != len(a):
                raise ViewError(f"columns has {len(names)} names for rows of {len(a)} values; give one per value")
            items = list(zip(names, a.tolist()))
        shown = items[:MAX_TABLE_FIELDS]
        rows = [(k, _cell(v)) for k, v in shown]
        more = len(items) - len(shown)
        body = h.table(rows, numeric=(1,))
        if more:
            body += h.tag("div", h.text(f"… {more} more"), class_="tko-note")
        lines = "\n".join(f"{k}: {v}" for k, v in rows[:8]) + (f"\n… {len(items) - 8} more" if len(items) > 8 else "")
        return Drawing(body, "table", lines=lines, wide=True)


def _draw_text(s: str) -> Drawing:
    return Drawing(h.tag("p", h.text(_clip(s)), class_="tko-text"), "text", lines=_clip(s, 200), wide=True)


def _clip(s: str, limit: int = MAX_TEXT_CHARS) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _cell(v: Any) -> str:
    v = _numpy(v)
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(()).item()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, np.ndarray):
        return _short_repr(v)
    return _clip(str(v), 80)


def _short_repr(x: Any) -> str:
    a = _numpy(x)
    if isinstance(a, np.ndarray):
        return f"array {a.shape} {a.dtype}: " + np.array2string(a.reshape(-1)[:12], precision=3, separator=", ")
    return _clip(repr(x), 300)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        out = tokenizer.decode(ids)
    except Exception as e:
        raise ViewError(f"tokenizer.decode failed ({type(e).__name__}: {e}); pass the tokenizer of this data") from e
    return out if isinstance(out, str) else str(out)


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's own part of the decoded text, spacing included: decode(ids[:i+1]) less decode(ids[:i])
    (decoding one token alone loses the space before it in most tokenizers)."""
    pieces, before = [], ""
    for i in range(len(ids)):
        now = _decode(tokenizer, ids[: i + 1])
        if now.startswith(before):
            pieces.append(now[len(before) :])
        else:  # a tokenizer that rewrites earlier text as it goes: fall back to the token alone
            pieces.append((" " if pieces else "") + _decode(tokenizer, [ids[i]]))
        before = now
    return pieces


def token_weights_for(weights: Any, position: int, side: str) -> np.ndarray | None:
    """The per-token weights of one example: ``weights`` is None, a callable ``(position, side)``, a
    Mapping ``{"train": w, "test": w}`` of per-example sequences, or one sequence (for ``side`` "train")."""
    if weights is None:
        return None
    if callable(weights):
        out = weights(position, side)
        return None if out is None else np.asarray(_numpy(out), dtype=np.float64)
    if isinstance(weights, Mapping):
        weights = weights.get(side)
        if weights is None:
            return None
    elif side != "train":
        return None
    try:
        row = weights[position]
    except (IndexError, KeyError):
        return None
    return None if row is None else np.asarray(_numpy(row), dtype=np.float64)
