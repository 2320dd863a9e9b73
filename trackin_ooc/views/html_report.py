"""``to.report``: one self-contained HTML file that shows what a train and a test store say.

Sections (each an ``<section id=...>`` with an ``<h2>``): how to read this (``how-to-read``), the two
stores (``stores``), the most self-influential training examples as suspects (``suspects``), the first
test examples with their proponents and opponents (``proponents``), the most helpful and harmful
training examples for the whole test set (``net``), each checkpoint's share of the scores
(``checkpoints``) and the score distributions (``distribution``). Scores come from the public API
(``self_influence``, ``influence``, ``net_influence``, ``GradientStore.to_xarray``); pictures are
embedded, charts are inline SVG, and the page loads nothing and runs no script.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr

from .._version import __version__
from ..errors import TrackinError
from ..ranks import rank_coordinate
from ..store.guard import check_file_output
from . import html as h
from .examples import ViewError
from .influence_view import InfluenceView, show
from .output import write_text_output
from .plots import bars_svg, histogram_svg

N_DISTRIBUTION = 100  # test examples whose scores against every training example make the histogram
SLAB_BYTES = 256 * 2**20  # ... at most this many bytes of them (fewer rows for a bigger train store)
BINS = 40

HOW_TO_READ = """
<p><b>Influence</b> of a training example z on a test example z′ is TracInCP's
Σ<sub>c</sub> η<sub>c</sub> ⟨g<sub>c</sub>(z′), g<sub>c</sub>(z)⟩: over the saved checkpoints c, the
learning rate η<sub>c</sub> times the dot product of the two examples' loss gradients. A positive score
means the SGD steps on z lowered the loss of z′; a negative one that they raised it.</p>
<ul>
<li><b>Proponents</b> (green, +) are the training examples with the highest scores for a test example: the
ones that pushed the model towards its answer. <b>Opponents</b> (red, −) have the lowest scores: they pulled
the other way. A proponent that looks nothing like the test example, or has another label, is worth a look.</li>
<li><b>Self-influence</b> Σ<sub>c</sub> η<sub>c</sub> ‖g<sub>c</sub>(z)‖² is how much an example's own steps
lowered its own loss. Mislabelled and unusual examples are the ones the model has to memorise, so they
come first (brown <b>suspects</b>); check their labels from the top down.</li>
<li><b>Net influence</b> sums a training example's influence over the whole test set: the most harmful ones
are candidates to remove.</li>
<li><b>Each checkpoint's share</b> says which phase of training the scores come from: a checkpoint counts
with its learning rate η<sub>c</sub> and its gradients, so a schedule that decays η makes late checkpoints count
for less.</li>
<li>Labels are the ones stored with the gradients (what the model was trained on); where true labels were
given, a different one is marked in red.</li>
</ul>
<p class="tko-note">Docs: docs/start-here.md in the trackin-ooc sources (which score answers which question).</p>
"""


def _section(ident: str, title: str, body: str) -> str:
    return h.tag("section", h.tag("h2", h.text(title)) + body, id=ident)


def _stores_table(te, tr) -> str:
    from ..summary import human_bytes, store_info

    infos = [store_info(tr), store_info(te)]

    def row(name: str, fn: Callable[[dict], Any]) -> list[Any]:
        return [name] + [fn(i) for i in infos]

    rows = [
        row("path", lambda i: i["path"]),
        row("examples", lambda i: f"{i['n_examples']:,}"),
        row("checkpoints (η)", lambda i: ", ".join(f"{c['name']} ({c['learning_rate']:g})" for c in i["checkpoints"])),
        row("projection", lambda i: i["projection"]["description"]),
        row("features", lambda i: f"{i['feature_dim']:,} per example and checkpoint"),
        row("dtype", lambda i: i["dtype"]),
        row("loss", lambda i: i["loss"] or "unknown"),
        row(
            "labels",
            lambda i: ("yes" + (f" ({i['n_classes']} classes)" if i["n_classes"] else "")) if i["labels"] else "none",
        ),
        row("size on disk", lambda i: human_bytes(i["size_on_disk"])),
        row("fingerprint", lambda i: i["fingerprint"][:16]),
        row("created", lambda i: i.get("created") or ""),
    ]
    same = "the same projection (the stores combine)" if te.fingerprint == tr.fingerprint else "DIFFERENT projections"
    return h.table(rows, ["", "train store", "test store"]) + h.tag(
        "p", h.text(f"Both stores use {same}."), class_="tko-note"
    )


# ---- scores ------------------------------------------------------------------------------------
def _top(rows: np.ndarray, k: int, *, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k largest (or smallest) scores per row, ties to the lower index."""
    order = np.argsort(-rows if largest else rows, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(rows, order, axis=1)


def top_k_rows(rows: np.ndarray, k: int, te, tr, normalize: bool) -> xr.Dataset:
    """A ``to.top_k``-shaped Dataset for the first test rows (their scores against every training example),
    so that :func:`show` draws it."""
    pi, ps = _top(rows, k, largest=True)
    oi, os_ = _top(rows, k, largest=False)
    dims = ("test", "rank")
    return xr.Dataset(
        {
            "proponent_index": (dims, pi),
            "proponent_score": (dims, ps),
            "opponent_index": (dims, oi),
            "opponent_score": (dims, os_),
        },
        coords={"test": te.example_ids()[: len(rows)], "rank": rank_coordinate(k)},
        attrs={"k": k, "normalize": normalize, "test_store": te.path, "train_store": tr.path, "approximate": False},
    )


def slab_rows(n_train: int, n_shown: int, n_test: int) -> int:
    """Test rows whose scores the report holds: at least the shown ones, up to N_DISTRIBUTION within
    SLAB_BYTES (float32 scores against every training example)."""
    fit = max(1, SLAB_BYTES // max(1, 4 * n_train))
    return min(n_test, max(n_shown, min(N_DISTRIBUTION, fit)))


def _grads(store) -> xr.DataArray | None:
    """The store's gradient features as a lazy (checkpoint, example, feature) array; None for a factor store."""
    if store.has_factors:
        return None
    ds = store.to_xarray()
    return ds["grads"]


def checkpoint_shares(te, tr, pairs: Sequence[tuple[int, int]], *, normalize: bool) -> dict[str, np.ndarray | None]:
    """Each checkpoint's share of (a) the train store's total self-influence and (b) the scores of ``pairs``
    ((test row, train row): the shown proponents): η_c-weighted terms over their sum."""
    lrs = np.asarray(tr.learning_rates, dtype=np.float64)
    out: dict[str, np.ndarray | None] = {"self_influence": None, "proponents": None}
    g_tr = _grads(tr)
    if tr.has_exact_norms:
        total = np.zeros(tr.n_checkpoints)
        for start, stop in tr.row_blocks():
            total += tr.read_sq_norms(start, stop).astype(np.float64).sum(axis=1)
        per = lrs * total
    elif g_tr is not None:
        per = lrs * np.asarray((g_tr.astype(np.float64) ** 2).sum(["example", g_tr.dims[-1]]).values)
    else:
        per = None
    if per is not None and per.sum() > 0:
        out["self_influence"] = per / per.sum()
    g_te = _grads(te)
    if pairs and g_tr is not None and g_te is not None:
        rows_te = np.array([p[0] for p in pairs])
        rows_tr = np.array([p[1] for p in pairs])
        a, b = dask.compute(g_te.data[:, np.unique(rows_te)], g_tr.data[:, np.unique(rows_tr)])
        a = a.astype(np.float64)[:, np.searchsorted(np.unique(rows_te), rows_te)]
        b = b.astype(np.float64)[:, np.searchsorted(np.unique(rows_tr), rows_tr)]
        terms = (a * b).sum(axis=-1)  # (checkpoint, pair)
        if normalize:
            norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            terms = np.divide(terms, norms, out=np.zeros_like(terms), where=norms > 0)
        per = (lrs[:, None] * terms).sum(axis=1)
        if abs(per.sum()) > 0:
            out["proponents"] = per / per.sum()
    return out


def _histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts and edges of BINS bins over the finite values' range."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, lo + 0.5
    counts, edges = np.histogram(v, bins=BINS, range=(lo, hi))
    return counts, edges


# ---- the report --------------------------------------------------------------------------------
def report(
    test: Any,
    train: Any,
    path: str | os.PathLike,
    *,
    train_data: Any = None,
    test_data: Any = None,
    k: int = 5,
    n_test: int = 5,
    n_suspects: int = 10,
    normalize: bool = False,
    render: Any = None,
    tokenizer: Any = None,
    labels: Sequence | np.ndarray | None = None,
    test_labels: Sequence | np.ndarray | None = None,
    class_names: Any = None,
    target_key: str = "labels",
    invert: bool = False,
    title: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> str:
    """Write one self-contained HTML report of a train and a test store to ``path``.

    Parameters
    ----------
    test, train
        The test and train gradient stores (``GradientStore`` or paths), complete and compatible.
    path
        The ``.html`` file to write (local). Refused when it is an input; an existing file is replaced
        only with ``overwrite=True`` and only if it is an earlier report or view.
    train_data, test_data
        The datasets the stores were captured from, to draw the examples (see :func:`show`); None: ids,
        labels and scores only.
    k
        Proponents and opponents shown per test example.
    n_test, n_suspects
        Test examples shown with their proponents; suspects (highest self-influence) shown.
    normalize
        Cosine TracIn for the proponents instead of raw influence.
    render, tokenizer, labels, test_labels, class_names, target_key, invert
        As in :func:`show`.
    title
        The page's title (default: "trackin-ooc report").
    overwrite
        Replace an earlier report at ``path``.
    progress
        Progress bars of the scoring passes (None: on a terminal only).

    Returns
    -------
    str
        The absolute path written.

    Raises
    ------
    StoreExistsError, OutputKindError, OutputOverlapsInputError
        The output rule (before any work).
    IncompatibleStoresError, IncompleteStoreError
        Stores that cannot be scored together.
    ViewError
        Examples that are not in the data, or arguments that do not fit.
    """
    import trackin_ooc as to

    if not str(os.fspath(path)).lower().endswith((".html", ".htm")):
        raise ViewError(f"the report is an HTML file; end {os.fspath(path)} in .html")
    for name, value in (("k", k), ("n_test", n_test), ("n_suspects", n_suspects)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ViewError(f"{name} must be a positive integer, got {value!r}")
    final = check_file_output(path, what="report", overwrite=overwrite, inputs=[test, train])
    te, tr = to.open_store(test).require_complete(), to.open_store(train).require_complete()
    k = min(int(k), tr.n_examples)
    show_kw = dict(
        render=render, tokenizer=tokenizer, labels=labels, class_names=class_names, target_key=target_key, invert=invert
    )

    scores = to.influence(te, tr, normalize=normalize)  # lazy; checks the stores combine
    n_shown = min(int(n_test), te.n_examples)
    si = to.self_influence(tr, progress=progress)
    # The first test rows' scores against every training example, in one pass over the train store: the
    # shown rows' proponents and opponents, and the distribution of all m rows.
    m = slab_rows(tr.n_examples, n_shown, te.n_examples)
    (slab,) = dask.compute(scores.isel(test=slice(0, m)).data.astype(np.float32))
    slab = np.asarray(slab)
    best = top_k_rows(slab[:n_shown].astype(np.float64), k, te, tr, normalize)

    sections = [
        _section("how-to-read", "How to read this", HOW_TO_READ),
        _section("stores", "Stores", _stores_table(te, tr)),
    ]

    suspects = show(si, train_data, n=min(int(n_suspects), tr.n_examples), **show_kw)
    sections.append(_section("suspects", "Suspects: the most self-influential training examples", suspects.body()))

    view: InfluenceView = show(best, train_data, test_data, n=n_shown, k=k, test_labels=test_labels, **show_kw)
    sections.append(_section("proponents", "Proponents and opponents of the first test examples", view.body()))

    sections.append(_net_section(te, tr, train_data, normalize=normalize, k=k, progress=progress, show_kw=show_kw))

    pairs = [(t, int(j)) for t in range(n_shown) for j in best["proponent_index"].values[t]]
    shares = checkpoint_shares(te, tr, pairs, normalize=normalize)
    sections.append(_section("checkpoints", "Each checkpoint's share of the scores", _shares_body(tr, shares)))

    sections.append(_section("distribution", "Score distribution", _distribution_body(si, slab, normalize)))

    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = (
        h.tag("h1", h.text(title or "trackin-ooc report"))
        + h.tag(
            "div",
            h.text(
                f"{tr.n_examples:,} training and {te.n_examples:,} test examples · "
                f"{tr.n_checkpoints} checkpoints · written {when} by trackin-ooc {__version__}"
            ),
            class_="tko-note",
        )
        + _contents()
    )
    page = h.page(title or "trackin-ooc report", head + "".join(sections), kind="report")
    return write_text_output(final, page, kind="report", overwrite=overwrite, inputs=[te, tr])


def _contents() -> str:
    links = [
        ("how-to-read", "How to read this"),
        ("stores", "Stores"),
        ("suspects", "Suspects"),
        ("proponents", "Proponents and opponents"),
        ("net", "Most helpful and harmful"),
        ("checkpoints", "Checkpoints"),
        ("distribution", "Score distribution"),
    ]
    return h.tag("nav", " · ".join(h.tag("a", h.text(t), href=f"#{i}") for i, t in links), class_="tko-note")


def _net_section(te, tr, train_data, *, normalize, k, progress, show_kw) -> str:
    import trackin_ooc as to

    title = "Most helpful and most harmful training examples for the whole test set"
    try:
        net = to.net_influence(te, tr, normalize=normalize, progress=progress)
    except TrackinError as e:  # a factor store: net influence needs flat features
        return _section("net", title, h.tag("p", h.text(f"Not shown: {e}"), class_="tko-note"))
    view = show(net, train_data, n=k, **show_kw)
    return _section("net", title, view.body())


def _shares_body(tr, shares: dict[str, np.ndarray | None]) -> str:
    names = list(tr.checkpoint_names)
    lrs = [float(x) for x in tr.learning_rates]
    si, pro = shares["self_influence"], shares["proponents"]
    rows = []
    for c, (name, lr) in enumerate(zip(names, lrs)):
        rows.append([c, name, f"{lr:g}", "" if si is None else f"{si[c]:.1%}", "" if pro is None else f"{pro[c]:.1%}"])
    body = h.table(
        rows,
        ["", "checkpoint", "η", "share of self-influence", "share of the proponents' scores"],
        numeric=(0, 2, 3, 4),
    )
    if si is not None:
        body += bars_svg(
            names,
            si,
            title="share of the training set's self-influence by checkpoint",
            xlabel="checkpoint",
            ylabel="share",
        )
    if pro is None:
        body += h.tag(
            "p", h.text("The proponents' shares need flat gradient features (not a factor store)."), class_="tko-note"
        )
    body += h.tag(
        "p",
        h.text(
            "A checkpoint's share is its term η_c·⟨g_c, g′_c⟩ (or η_c‖g_c‖²) summed over the "
            "examples, divided by the sum over all checkpoints."
        ),
        class_="tko-note",
    )
    return body


def _distribution_body(si: xr.DataArray, slab: np.ndarray, normalize: bool) -> str:
    si_counts, si_edges = _histogram(si.values)
    inf_counts, inf_edges = _histogram(slab)
    what = "cosine TracIn" if normalize else "influence"
    body = histogram_svg(
        si_counts,
        si_edges,
        title="self-influence of every training example",
        xlabel="self-influence",
        log=True,
        color="#9a6700",
    )
    body += histogram_svg(
        inf_counts,
        inf_edges,
        title=f"{what} of the first {len(slab):,} test examples on every training example",
        xlabel=what,
        log=True,
        unit="pairs",
    )
    positive = float((slab > 0).mean()) if slab.size else 0.0
    body += h.tag(
        "p",
        h.text(
            f"Counts on a log scale; the dashed line is 0. {positive:.0%} of the {what} scores are "
            "positive. The few examples far out on either side carry most of the influence: they "
            "are the proponents and opponents above."
        ),
        class_="tko-note",
    )
    return body
