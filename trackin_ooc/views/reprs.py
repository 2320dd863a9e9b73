"""Tables for Jupyter: a gradient store, a top-k index and a capture's projection plan as HTML.

``GradientStore._repr_html_`` and ``TopKIndex._repr_html_`` call :func:`store_html` and
:func:`index_html`; :func:`plan_table_html` renders the per-layer plan of a projection spec (kind,
factor widths, dims: what ``capturing.projection.factored.describe_plan`` prints) from a spec, its
dict, its ``extra`` entry, a list of layer dicts, or any object with ``to_dict()`` returning one of
those. Only metadata is read: no gradients, no folder walk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..spec import ProjectionSpec
from . import html as h

MAX_ROWS = 200  # layers (or parameters) listed before "… N more"


def _bytes(n: float) -> str:
    from ..summary import human_bytes

    return human_bytes(n)


def _details(summary: str, body: str, *, open_: bool = False) -> str:
    return h.tag("details", h.tag("summary", h.text(summary)) + body, open=open_)


# ---- the projection plan -----------------------------------------------------------------------
def _as_plan_input(obj: Any) -> Any:
    if isinstance(obj, ProjectionSpec):
        return obj.to_dict()
    if not isinstance(obj, (Mapping, list, tuple)) and hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj


def _layer_dicts(obj: Any) -> list[dict]:
    out = []
    for x in obj:
        x = x.to_dict() if hasattr(x, "to_dict") and not isinstance(x, Mapping) else x
        if not isinstance(x, Mapping):
            raise TypeError(f"a plan's layers are dicts, not {type(x).__name__}")
        out.append(dict(x))
    return out


def _factored_how(x: Mapping) -> str:
    mix = int(x.get("mix", 0))
    if mix and x.get("method") == "formed":
        return f"dense Gaussian map into the {mix:,} shared dims"
    how = _own_how(x)
    return f"{how}, hashed into the {mix:,} shared dims" if mix else how


def _own_how(x: Mapping) -> str:
    kind, method = x["kind"], x.get("method", "factors")
    d_in, d_out, k_in, k_out = int(x["d_in"]), int(x["d_out"]), int(x["k_in"]), int(x["k_out"])
    width, blocks = int(x["width"]), int(x.get("blocks", 1))
    if kind == "pad":
        return "zeros (fill the width up to projection_dim)"
    if kind == "dense":
        return "exact" if k_out == d_out else f"dense Gaussian to {width}"
    if method == "formed":
        return f"formed gradient, dense Gaussian to {width}"
    if width == d_in * d_out:
        return "exact"
    side_in = "identity" if k_in == d_in else str(k_in * blocks)
    side_out = "identity" if k_out == d_out else str(k_out * blocks)
    how = f"in {d_in}→{side_in}, out {d_out}→{side_out}"
    return how + (f" in {blocks} blocks of {k_in}×{k_out}" if blocks > 1 else "")


def _factored_rows(layers: list[dict]) -> tuple[list[str], list[list[Any]], tuple[int, ...]]:
    header = ["layer", "kind", "exact size", "input factor", "output factor", "blocks", "stored", "how"]
    rows = []
    for x in layers:
        name = x.get("module") or ",".join(x.get("params", [])) or "(zeros)"
        if x["kind"] == "pad":
            rows.append([name, "pad", "", "", "", "", f"{int(x['width']):,}", _factored_how(x)])
            continue
        d_in, d_out = int(x["d_in"]), int(x["d_out"])
        rows.append(
            [
                name,
                x["kind"],
                f"{d_in:,} × {d_out:,} = {d_in * d_out:,}",
                f"{d_in:,} → {int(x['k_in']):,}",
                f"{d_out:,} → {int(x['k_out']):,}",
                int(x.get("blocks", 1)),
                f"{int(x['width']):,}",
                _factored_how(x),
            ]
        )
    return header, rows, (2, 5, 6)


def _factors_rows(layers: list[dict]) -> tuple[list[str], list[list[Any]], tuple[int, ...]]:
    header = ["layer", "kind", "exact size", "stored as"]
    rows = [
        [x.get("module", ""), x.get("kind", ""), f"{int(x['d_in']):,} × {int(x['d_out']):,}", x.get("store", "")]
        for x in layers
    ]
    return header, rows, (2,)


def _generic_rows(layers: list[dict]) -> tuple[list[str], list[list[Any]], tuple[int, ...]]:
    header: list[str] = []
    for x in layers:
        header += [k for k in x if k not in header]
    rows = [[_plain(x.get(k, "")) for k in header] for x in layers]
    numeric = tuple(i for i, k in enumerate(header) if all(isinstance(x.get(k), (int, float)) for x in layers))
    return header, rows, numeric


def _plain(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(p) for p in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _param_rows(params: list[dict]) -> tuple[list[str], list[list[Any]], tuple[int, ...]]:
    rows = [
        [p["name"], " × ".join(str(s) for s in p["shape"]) or "scalar", f"{math.prod(p['shape']):,}"] for p in params
    ]
    return ["parameter", "shape", "values"], rows, (2,)


def _clipped(header, rows, numeric) -> str:
    shown = h.table(rows[:MAX_ROWS], header, numeric=numeric)
    if len(rows) > MAX_ROWS:
        shown += h.tag("div", h.text(f"… {len(rows) - MAX_ROWS:,} more"), class_="tko-note")
    return shown


def plan_body(spec_or_plan: Any) -> str:
    """The plan table (no styles), for embedding in other tables."""
    obj = _as_plan_input(spec_or_plan)
    summary: list[tuple[str, Any]] = []
    if isinstance(obj, Mapping) and "kind" in obj and "extra" in obj:  # a spec dict
        spec = ProjectionSpec.from_dict(dict(obj))
        summary = [("projection", spec.describe()), ("stored width", f"{spec.dim:,} per example and checkpoint")]
        extra = dict(obj.get("extra") or {})
        if spec.kind == "factored" and extra.get("factored"):
            header, rows, num = _factored_rows(_layer_dicts(extra["factored"]["layers"]))
        elif spec.kind == "factors" and extra.get("factors"):
            plan = extra["factors"]
            header, rows, num = _factors_rows(_layer_dicts(plan.get("layers", [])))
            flat = list(plan.get("flat", []))
            if flat:
                summary.append(("stored flat", ", ".join(flat[:8]) + (" …" if len(flat) > 8 else "")))
        else:
            header, rows, num = _param_rows(list(obj.get("layers", [])))
    elif isinstance(obj, Mapping) and "layers" in obj:  # a plan: the spec's extra entry, or a plan object's dict
        summary = [(str(k), _plain(v)) for k, v in obj.items() if k != "layers" and not isinstance(v, (Mapping, list))]
        layers = _layer_dicts(obj["layers"])
        header, rows, num = _rows_for(layers)
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        header, rows, num = _rows_for(_layer_dicts(obj))
    else:
        raise TypeError(
            f"plan_table_html takes a ProjectionSpec, its dict, a plan dict with 'layers' or a list of "
            f"layer dicts, not a {type(obj).__name__}"
        )
    head = h.key_values(summary) if summary else ""
    return head + _clipped(header, rows, num)


def _rows_for(layers: list[dict]):
    keys = set().union(*(x.keys() for x in layers)) if layers else set()
    if {"d_in", "d_out", "k_in", "k_out", "width"} <= keys:
        return _factored_rows(layers)
    if {"d_in", "d_out", "store"} <= keys:
        return _factors_rows(layers)
    if {"name", "shape"} <= keys and len(keys) == 2:
        return _param_rows(layers)
    return _generic_rows(layers)


def plan_table_html(spec_or_plan_dict: Any) -> str:
    """The per-layer projection plan as an HTML table (for ``_repr_html_``).

    Parameters
    ----------
    spec_or_plan_dict
        A :class:`~trackin_ooc.ProjectionSpec`, its ``to_dict()``, a plan dict holding ``layers`` (a
        factored spec's ``extra["factored"]``, a ``factors`` spec's ``extra["factors"]``, or any plan whose
        layers are dicts: their keys become the columns; other scalar entries are listed above), a list of
        layer dicts, or an object with ``to_dict()`` returning one of those.

    Returns
    -------
    str
        HTML (a ``div`` with its own styles); every name in it is escaped.

    Raises
    ------
    TypeError
        For anything else.
    """
    return h.fragment(plan_body(spec_or_plan_dict))


# ---- a gradient store --------------------------------------------------------------------------
def store_html(store: Any) -> str:
    """The HTML summary of a :class:`~trackin_ooc.GradientStore` (metadata only)."""
    state = "complete" if store.complete else "INCOMPLETE (rerun the capture to resume it)"
    width = f"{store.feature_dim:,} features"
    if store.has_factors:
        width = f"{store.feature_dim:,} flat features + {len(store.factor_arrays)} factor layers"
    labels = "none"
    if store.has_labels:
        labels = f"yes ({store.label_dtype})"
    pairs = [
        ("path", store.path),
        ("state", state),
        ("examples", f"{store.n_examples:,}"),
        ("checkpoints", f"{store.n_checkpoints}"),
        ("features", width),
        ("projection", store.spec.describe()),
        ("dtype", f"{store.dtype} (chunks of {store.chunk_rows:,} rows)"),
        ("loss", store.loss_name or "unknown"),
        ("labels", labels),
        ("exact norms", "yes" if store.has_exact_norms else "no"),
        ("gradients", f"{_bytes(store.nbytes)} uncompressed"),
        ("fingerprint", store.fingerprint[:16]),
    ]
    if store.n_nonfinite:
        pairs.append(("non-finite", f"{store.n_nonfinite:,} example(s) stored as zeros"))
    ckpt_rows = [[i, name, f"{lr:g}"] for i, (name, lr) in enumerate(zip(store.checkpoint_names, store.learning_rates))]
    checkpoints = h.table(ckpt_rows, ["", "checkpoint", "η"], numeric=(0, 2))
    body = (
        h.tag("b", h.text("GradientStore"))
        + h.key_values(pairs)
        + _details(f"checkpoints ({store.n_checkpoints})", checkpoints)
        + _details(f"layers and projection plan ({len(store.spec.layers)} parameters)", plan_body(store.spec))
    )
    return h.fragment(body)


# ---- a top-k index -----------------------------------------------------------------------------
def index_html(index: Any) -> str:
    """The HTML summary of a :class:`~trackin_ooc.TopKIndex` with its calibration table."""
    state = "complete" if index.complete else "INCOMPLETE (rerun the same build_index call to resume it)"
    pairs = [
        ("path", index.path),
        ("state", state),
        ("lists", f"{index.n_lists:,} over {index.n_examples:,} rows"),
        ("scores", "cosine (normalize=True)" if index.normalize else "dot product"),
        ("n_probe", f"{index.n_probe} by default (calibrated at build time)" if index.complete else "not calibrated"),
        ("features", f"{index.n_checkpoints} checkpoints × {index.feature_dim:,}, {index.dtype}"),
        ("size", f"{_bytes(index.nbytes)} uncompressed"),
        ("train store", index.train_store),
    ]
    body = h.tag("b", h.text("TopKIndex")) + h.key_values(pairs)
    cal = index.calibration if index.complete else {}
    table = _calibration_table(cal)
    if table:
        body += _details("calibration on held-out queries", table, open_=True)
    return h.fragment(body)


def _calibration_table(cal: Mapping[str, Any]) -> str:
    """Rows by n_probe (the ``by_n_probe`` table the build measured: recall at both ends, fraction read),
    after the calibration's scalar settings (k, target recall, queries)."""
    if not cal:
        return ""
    table = cal.get("by_n_probe") or {}
    head = h.key_values([(str(k), _plain(v)) for k, v in cal.items() if k != "by_n_probe"])
    if not isinstance(table, Mapping) or not table:
        return head
    columns: list[str] = []
    for row in table.values():
        columns += [k for k in row if k not in columns]
    order = sorted(table, key=lambda p: int(p) if str(p).isdigit() else 0)
    rows = [[p] + [_plain(table[p].get(k, "")) for k in columns] for p in order]
    return head + h.table(rows, ["n_probe", *columns], numeric=tuple(range(len(columns) + 1)))
