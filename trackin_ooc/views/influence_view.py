"""``to.show``: the examples behind a result, beside each other, as HTML (Jupyter) or a saved file.

A top-k result shows each test example with its proponents and opponents; a self-influence result
the top suspects with their labels; a net-influence result the most helpful and most harmful training
examples. Labels are the stores' (what the model was trained and scored with), and the user's true
labels where ``labels=`` gives them (a mismatch is marked).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from . import cards as c
from . import html as h
from .examples import Renderer, ViewError, dataset_of, read_example, scalar_label
from .output import write_text_output

SUFFIXES = (".html", ".htm", ".png")


class InfluenceView:
    """What :func:`show` returns: rows of examples that render in Jupyter and save as .html or .png.

    Parameters
    ----------
    title : str
        The heading.
    note : str
        One line on what the scores are.
    rows : list of trackin_ooc.views.cards.Row
        The examples, one row per test example or suspect.
    invert : bool
        Draw images dark-on-light.
    inputs : sequence
        Paths of the stores behind the result; :meth:`save` never writes over them.
    """

    def __init__(self, title: str, note: str, rows: list[c.Row], *, invert: bool = False, inputs: Sequence[Any] = ()):
        self.title = title
        self.note = note
        self.rows = rows
        self.invert = invert
        self.inputs = [p for p in inputs if p is not None]  # the stores behind the result: never written over

    def html(self) -> str:
        """The view's HTML body (no styles): for embedding in a larger page (the report does)."""
        return c.rows_html(self.title, self.note, self.rows)

    def body(self) -> str:
        """The view's note, legend and rows without its title."""
        return c.rows_body(self.note, self.rows)

    def _repr_html_(self) -> str:
        return h.fragment(self.html())

    def to_html(self) -> str:
        """A whole self-contained page (inline styles, embedded pictures, no scripts)."""
        return h.page(self.title, self.html(), kind="view")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Write the view to ``path``: ``.html`` (a self-contained page) or ``.png`` (needs matplotlib).

        An existing file is replaced only with ``overwrite=True``. Returns the absolute path written.
        """
        suffix = os.path.splitext(os.fspath(path))[1].lower()
        if suffix not in SUFFIXES:
            raise ViewError(f"cannot tell how to save {os.fspath(path)}; end the name in .html or .png")
        if suffix == ".png":
            c._pyplot()  # fail before touching anything when matplotlib is missing

            def draw(target: str) -> None:
                c.save_png(target, self.title, self.rows, invert=self.invert)

            return write_text_output(path, draw, kind="view", overwrite=overwrite, inputs=self.inputs)
        return write_text_output(path, self.to_html(), kind="view", overwrite=overwrite, inputs=self.inputs)

    def __repr__(self) -> str:
        n = sum(len(r.cards) for r in self.rows)
        return f"<InfluenceView {self.title!r}: {len(self.rows)} rows, {n} examples>"


# ---- labels ------------------------------------------------------------------------------------
def _store_labels(path: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(labels, example ids) of the gradient store at ``path``; (None, None) when it cannot be opened."""
    if path is None:
        return None, None
    from ..store import open_store

    try:
        st = open_store(path)
        return st.labels(), st.example_ids()
    except Exception:
        return None, None


class _Labels:
    """Label text of one side (train or test): stored labels first, the data's targets otherwise; the
    user's true labels beside them; class names for integer classes."""

    def __init__(self, stored: np.ndarray | None, true: Any, class_names: Any):
        self.stored = None if stored is None else np.asarray(stored)
        self.true = None if true is None else np.asarray(true)
        self.class_names = class_names

    def name(self, value: Any) -> str | None:
        if value is None:
            return None
        v = scalar_label(value)
        if v is None:
            return None
        names = self.class_names
        if names is not None and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            try:
                return f"{v} ({names[v]})"
            except (IndexError, KeyError, TypeError):
                pass
        return str(v)

    def stored_at(self, row: int, data_target: Any) -> str | None:
        if self.stored is not None and 0 <= row < len(self.stored):
            return self.name(self.stored[row])
        return self.name(data_target)

    def true_at(self, row: int) -> str | None:
        if self.true is None:
            return None
        if not 0 <= row < len(self.true):
            raise ViewError(f"labels= has {len(self.true)} values but example {row} is shown; give one per example")
        return self.name(self.true[row])


# ---- building cards ----------------------------------------------------------------------------
class _Side:
    """One dataset (train or test) with its renderer, labels and example ids."""

    def __init__(
        self, name: str, data: Any, renderer: Renderer, labels: _Labels, ids: np.ndarray | None, target_key: str
    ):
        self.name = name
        self.data = dataset_of(data)
        self.renderer = renderer
        self.labels = labels
        self.ids = ids
        self.target_key = target_key

    def card(self, role: str, heading: str, row: int, score: str | None) -> c.Card:
        drawing, target = None, None
        if self.data is not None:
            ex = read_example(self.data, row, target_key=self.target_key)
            drawing, target = self.renderer.draw(ex, side=self.name), ex.target
        ident = self.ids[row] if self.ids is not None and row < len(self.ids) else row
        return c.Card(
            role=role,
            heading=heading.format(id=ident),
            drawing=drawing,
            label=self.labels.stored_at(row, target),
            true_label=self.labels.true_at(row),
            score=score,
        )


def _as_renderer(render: Any, tokenizer: Any, **kw: Any) -> Renderer:
    if render is not None and hasattr(render, "decode") and tokenizer is None:
        return Renderer(tokenizer=render, **kw)  # render= a tokenizer
    if render is not None and not callable(render):
        raise ViewError(f"render= must be a function of one example or a tokenizer, got a {type(render).__name__}")
    return Renderer(render=render, tokenizer=tokenizer, **kw)


def result_kind(result: Any) -> str:
    """ "top_k", "self_influence" or "net_influence" for a result of those functions (else a ViewError)."""
    if isinstance(result, xr.Dataset) and "proponent_score" in result:
        return "top_k"
    if isinstance(result, xr.DataArray):
        if result.dims == ("train",) or result.dims == ("group", "train"):
            return "net_influence"
        if result.dims == ("example",):
            return "self_influence"
    raise ViewError(
        f"show() takes the result of to.top_k, to.self_influence or to.net_influence, not a "
        f"{type(result).__name__}{' with dims ' + str(tuple(result.dims)) if hasattr(result, 'dims') else ''}"
    )


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ViewError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def show(
    result: xr.Dataset | xr.DataArray,
    train_data: Any,
    test_data: Any = None,
    *,
    n: int = 5,
    k: int | None = None,
    render: Callable[[Any], Any] | Any = None,
    tokenizer: Any = None,
    labels: Sequence | np.ndarray | None = None,
    test_labels: Sequence | np.ndarray | None = None,
    class_names: Sequence[str] | Mapping[Any, str] | None = None,
    target_key: str = "labels",
    columns: Sequence[str] | None = None,
    kind: str = "auto",
    invert: bool = False,
    token_weights: Any = None,
) -> InfluenceView:
    """The examples behind ``result``, drawn by what they are (pictures, decoded text, table rows).

    Parameters
    ----------
    result
        What ``to.top_k`` (each test example with its proponents and opponents), ``to.self_influence``
        (the ``n`` highest: suspects of a wrong label) or ``to.net_influence`` (the ``n`` most helpful and
        most harmful training examples; per group for ``by=``) returned.
    train_data, test_data
        The datasets the stores were captured from (indexable; items ``(input, target)``, a Mapping, or a
        bare input). None: ids, labels and scores only.
    n
        Test examples (top-k), suspects (self-influence), or examples per side (net influence) to show.
    k
        Proponents and opponents per test example (top-k; default: the result's k, at most 5), or
        examples per side for each group of a grouped net influence (default 5).
    render
        ``render(input) -> str | PIL image | array`` for inputs of any other kind, or a tokenizer.
    tokenizer
        Any object with ``decode(ids)`` (a Hugging Face tokenizer): integer token ids (or ``input_ids``
        of a Mapping) are shown as decoded text.
    labels, test_labels
        True labels (one per example) to show beside the stored ones; a difference is marked.
    class_names
        Names of integer classes (a sequence or mapping), shown beside the numbers.
    target_key
        The target's key in Mapping items (as in ``capture``).
    columns
        Feature names of tabular rows.
    kind
        "auto" (guess), or force "image", "tokens", "text" or "table".
    invert
        Draw grayscale pictures dark on white.
    token_weights
        Per-token weights to highlight, e.g. from :func:`trackin_ooc.token_gradient_mass`: a Mapping
        ``{"train": w, "test": w}`` of per-example sequences, one such sequence (train), or a callable
        ``(position, side) -> weights``.

    Returns
    -------
    InfluenceView
        Renders in Jupyter (``_repr_html_``); ``.save(path)`` writes .html or .png.

    Raises
    ------
    ViewError
        A result of another kind, an example that is not in the data, or arguments that do not fit.
    """
    n = _count(n, "n")
    renderer = _as_renderer(render, tokenizer, columns=columns, kind=kind, invert=invert, token_weights=token_weights)
    what = result_kind(result)
    inputs = [result.attrs.get(key) for key in ("store", "train_store", "test_store")]
    if what == "top_k":
        view = _show_top_k(
            result,
            train_data,
            test_data,
            n=n,
            k=k,
            renderer=renderer,
            labels=labels,
            test_labels=test_labels,
            class_names=class_names,
            target_key=target_key,
            invert=invert,
        )
        view.inputs = [p for p in inputs if p is not None]
        return view
    if what == "self_influence":
        stored = result.coords["label"].values if "label" in result.coords else None
        ids = result.coords["example"].values if "example" in result.coords else None
        train = _Side("train", train_data, renderer, _Labels(stored, labels, class_names), ids, target_key)
        values = np.asarray(result.values, dtype=np.float64)
        order = np.argsort(-values, kind="stable")[:n]
        group = [
            train.card("suspect", f"{i + 1}. #{{id}}", int(r), f"self-influence {h.score(values[r])}")
            for i, r in enumerate(order)
        ]
        note = (
            f"The {len(order)} training examples of highest self-influence Σ_c η_c‖g_c(z)‖² (of "
            f"{len(values):,}): check their labels first."
        )
        return InfluenceView(
            "Most self-influential training examples", note, [c.Row("", [group])], invert=invert, inputs=inputs
        )
    view = _show_net(
        result,
        train_data,
        n=n,
        k=k,
        renderer=renderer,
        labels=labels,
        class_names=class_names,
        target_key=target_key,
        invert=invert,
    )
    view.inputs = [p for p in inputs if p is not None]
    return view


def _show_top_k(
    result, train_data, test_data, *, n, k, renderer, labels, test_labels, class_names, target_key, invert
) -> InfluenceView:
    n_rank = int(result.sizes["rank"])
    k = min(n_rank, 5) if k is None else min(_count(k, "k"), n_rank)
    tr_labels, tr_ids = _store_labels(result.attrs.get("train_store"))
    te_labels, te_ids = _store_labels(result.attrs.get("test_store"))
    if te_ids is None:
        te_ids = np.asarray(result["test"].values)
    train = _Side("train", train_data, renderer, _Labels(tr_labels, labels, class_names), tr_ids, target_key)
    test = _Side("test", test_data, renderer, _Labels(te_labels, test_labels, class_names), te_ids, target_key)
    pi, ps = result["proponent_index"].values, result["proponent_score"].values
    oi, os_ = result["opponent_index"].values, result["opponent_score"].values
    rows = []
    for t in range(min(n, int(result.sizes["test"]))):
        head = [test.card("test", "test #{id}", t, None)]
        pro = [
            train.card("proponent", f"+{j + 1} #{{id}}", int(pi[t, j]), f"score {h.score(ps[t, j])}") for j in range(k)
        ]
        opp = [
            train.card("opponent", f"−{j + 1} #{{id}}", int(oi[t, j]), f"score {h.score(os_[t, j])}") for j in range(k)
        ]
        rows.append(c.Row(f"test example #{te_ids[t]}", [head, pro, opp]))
    how = "cosine TracIn (normalize=True)" if result.attrs.get("normalize") else "TracIn Σ_c η_c⟨g_c(z′), g_c(z)⟩"
    approx = " (from an index: exact scores, approximate membership)" if result.attrs.get("approximate") else ""
    note = (
        f"Each test example, its {k} strongest proponents (+: training examples that lowered its loss most) "
        f"and opponents (−: raised it most), by {how}{approx}."
    )
    title = "Proponents and opponents" + (" (cosine TracIn)" if result.attrs.get("normalize") else " (TracIn)")
    return InfluenceView(title, note, rows, invert=invert)


def _show_net(result, train_data, *, n, k, renderer, labels, class_names, target_key, invert) -> InfluenceView:
    stored = result.coords["label"].values if "label" in result.coords else None
    ids = result.coords["train"].values if "train" in result.coords else None
    train = _Side("train", train_data, renderer, _Labels(stored, labels, class_names), ids, target_key)
    values = np.asarray(result.values, dtype=np.float64)

    def sides(v: np.ndarray, m: int) -> list[list[c.Card]]:
        order = np.argsort(-v, kind="stable")
        best, worst = order[:m], order[::-1][:m]
        return [
            [train.card("helpful", f"{i + 1}. #{{id}}", int(r), f"net {h.score(v[r])}") for i, r in enumerate(best)],
            [train.card("harmful", f"{i + 1}. #{{id}}", int(r), f"net {h.score(v[r])}") for i, r in enumerate(worst)],
        ]

    n_test = result.attrs.get("n_test")
    test_words = f"{n_test:,} test examples" if isinstance(n_test, (int, np.integer)) else "the test set"
    if values.ndim == 1:
        rows = [c.Row("most helpful | most harmful", sides(values, n))]
        note = (
            f"Influence summed over {test_words}: positive examples lowered the test loss (helped), "
            "negative ones raised it (hurt)."
        )
    else:
        m = 5 if k is None else _count(k, "k")
        groups = result.coords["group"].values
        rows = [
            c.Row(f"test group {g}: most helpful | most harmful", sides(values[i], m)) for i, g in enumerate(groups[:n])
        ]
        note = "Influence summed over each group of test examples: the most helpful and most harmful per group."
    return InfluenceView("Most helpful and most harmful training examples", note, rows, invert=invert)
