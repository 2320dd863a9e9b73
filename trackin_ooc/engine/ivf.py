"""Inverted-file (IVF) arithmetic for maximum-inner-product top-k: the space, the quantizer, list ranking
and the calibration of the default ``n_probe``. Pure NumPy (and scikit-learn's k-means), no I/O.

Σ_c η_c ⟨g_c(z'), g_c(z)⟩ is one inner product of the checkpoint-concatenated vectors (√η_c g_c)_c, so
the index lives in that space (with ``normalize``, each g_c is divided by its norm first).

Lists are the cells of a k-means quantizer trained on a sample, rows weighted by their norm (the
scores of large-norm rows decide the top-k, so they get the finer cells). A row goes to its nearest
centroid. For a query q, list L is ranked for proponents by ⟨q, c_L⟩ + λ‖q‖·r_L and for opponents
by ⟨q, c_L⟩ − λ‖q‖·r_L, where r_L is the largest distance of a member from c_L (λ = 1 gives true
bounds: ⟨q, x⟩ ≤ ⟨q, c_L⟩ + ‖q‖·r_L for every x in L). λ and the default ``n_probe`` are chosen by
:func:`calibrate` on held-in queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from .kernels import fold_checkpoints

BOUND_WEIGHTS = (0.0, 0.1, 0.25, 0.5)  # λ values the calibration tries
TARGET_RECALL = 0.95
# The calibration queries are train rows, whose neighbours are a little easier to find than a held-out
# example's (measured: 0.925 held-out at a held-in 0.95 on digits gradients): calibrate with this margin.
CALIBRATION_MARGIN = 0.02
CALIBRATION_QUERIES = 256
CALIBRATION_K = 10
SAMPLE_PER_LIST = 40  # k-means training rows per list (as FAISS recommends), within the memory budget
KMEANS_ITERATIONS = 20


def index_weights(learning_rates) -> np.ndarray:
    """√η_c per checkpoint: the index space needs η_c ≥ 0 (an inner product of weighted vectors)."""
    lrs = np.asarray(learning_rates, dtype=np.float64)
    if (lrs < 0).any():
        raise ArgumentError(f"an index needs non-negative learning rates, got {list(lrs)}; use exact top_k instead")
    return np.sqrt(lrs)


def to_index_space(grads: np.ndarray, learning_rates, normalize: bool) -> np.ndarray:
    """(C, rows, F) float32 → (rows, C·F): each checkpoint scaled by √η_c (normalised first with ``normalize``)."""
    return fold_checkpoints(grads, np, weights=index_weights(learning_rates), normalize=normalize)


def default_n_lists(n_rows: int) -> int:
    """About √N lists: a few thousand for millions of rows, each a run of about √N rows."""
    return int(max(1, min(n_rows, 65536, round(np.sqrt(n_rows)))))


def sample_size(n_rows: int, n_lists: int, width: int, memory_limit: int) -> int:
    """Rows to train the quantizer on: SAMPLE_PER_LIST per list, at most a quarter of the budget."""
    budget_rows = max(1, memory_limit // (4 * width * 4))
    return int(min(n_rows, SAMPLE_PER_LIST * n_lists, max(budget_rows, min(n_rows, 4 * n_lists))))


def train_quantizer(sample: np.ndarray, n_lists: int, seed: int = 0) -> np.ndarray:
    """(n_lists, W) float32 centroids: k-means on the sample, rows weighted by their norm."""
    from sklearn.cluster import KMeans

    n = sample.shape[0]
    if n_lists > n:
        raise ArgumentError(f"n_lists={n_lists} is more than the {n} rows sampled; use n_lists <= {n}")
    weights = np.sqrt(np.einsum("rw,rw->r", sample, sample, dtype=np.float64))
    if (weights > 0).sum() < n_lists:
        weights = weights + max(weights.max(), 1.0) * 1e-6  # keep every row in play when few are non-zero
    # Initial centroids: rows drawn in proportion to their weight (k-means++ seeding costs a pass over
    # the sample per centroid: minutes for thousands of lists).
    rng = np.random.default_rng(seed)
    init = sample[rng.choice(n, size=n_lists, replace=False, p=weights / weights.sum())]
    km = KMeans(n_clusters=n_lists, init=init, n_init=1, max_iter=KMEANS_ITERATIONS, random_state=seed)
    km.fit(sample, sample_weight=weights)
    centroids = np.ascontiguousarray(km.cluster_centers_, dtype=np.float32)
    return centroids[order_lists(centroids, seed)]


def order_lists(centroids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A storage order of the lists that puts lists pointing the same way side by side (k-means of the
    centroids' directions into ≈ √lists groups; by norm within a group): a query probes neighbouring
    lists, so its reads touch fewer chunks (a third fewer on digits gradients)."""
    from sklearn.cluster import KMeans

    n = centroids.shape[0]
    if n < 4:
        return np.arange(n)
    norms = np.sqrt(np.einsum("lw,lw->l", centroids, centroids, dtype=np.float64))
    unit = centroids / np.maximum(norms, 1e-30)[:, None]
    groups = KMeans(n_clusters=int(round(np.sqrt(n))), n_init=1, random_state=seed).fit(unit).labels_
    return np.lexsort((-norms, groups))


def assign(rows: np.ndarray, centroids: np.ndarray, half_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row (argmax ⟨x, c⟩ − ‖c‖²/2) and the row's distance to it."""
    scores = rows @ centroids.T
    scores -= half_sq
    lists = scores.argmax(axis=1)
    best = np.take_along_axis(scores, lists[:, None], axis=1)[:, 0]
    sq = np.einsum("rw,rw->r", rows, rows, dtype=np.float32) - 2.0 * best  # ‖x‖² − 2⟨x,c⟩ + ‖c‖²
    return lists.astype(np.int32), np.sqrt(np.maximum(sq, 0.0))


def list_scores(queries: np.ndarray, centroids: np.ndarray, radius: np.ndarray, bound_weight: float):
    """Per query and list: the proponent ranking key (high first) and the opponent key (low first)."""
    base = queries @ centroids.T
    if not bound_weight:
        return base, base
    spread = bound_weight * np.sqrt(np.einsum("qw,qw->q", queries, queries))[:, None] * radius[None, :]
    return base + spread, base - spread


def probe(queries: np.ndarray, centroids: np.ndarray, radius: np.ndarray, sizes: np.ndarray, n_probe: int,
          bound_weight: float, k: int) -> np.ndarray:
    """Sorted ids of the lists to read for a block of queries: for each query, its ``n_probe`` best lists
    for proponents and for opponents (more where needed to hold at least ``k`` rows per end)."""
    n_lists = centroids.shape[0]
    hi, lo = list_scores(queries, centroids, radius, bound_weight)
    if n_probe >= n_lists:
        return np.arange(n_lists)
    chosen = np.zeros(n_lists, dtype=bool)
    for keys in (-hi, lo):
        order = np.argsort(keys, axis=1, kind="stable")
        take = np.full(len(queries), n_probe)
        # where the first n_probe lists hold fewer than k rows, take lists until they do
        held = np.cumsum(sizes[order], axis=1)
        short = held[:, n_probe - 1] < k
        if short.any():
            take[short] = np.minimum(n_lists, 1 + np.argmax(held[short] >= k, axis=1))
        cols = np.arange(n_lists)[None, :] < take[:, None]
        chosen[order[cols]] = True
    return np.flatnonzero(chosen)


def rows_of_lists(lists: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Index positions of the rows of ``lists`` (sorted ids), ascending."""
    starts, stops = offsets[lists], offsets[lists + 1]
    lengths = stops - starts
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return base + np.arange(lengths.sum(), dtype=np.int64)


@dataclass(frozen=True)
class Calibration:
    n_probe: int
    bound_weight: float
    table: dict  # n_probe -> recall (proponents, opponents) and mean fraction of rows read per query


def true_top(parts: dict[str, np.ndarray], query_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (train positions) of each calibration query from the per-block partials, itself excluded."""
    from .kernels import TopK, merge_topk

    names = ("calibration_best_score", "calibration_best_index", "calibration_worst_score",
             "calibration_worst_index")
    blocks = [TopK(*(parts[n][b] for n in names)) for b in range(parts[names[0]].shape[0])]
    merged = merge_topk(blocks, parts[names[0]].shape[2])

    def drop_self(index):
        keep = index != query_rows[:, None]
        out = np.empty((len(index), k), dtype=np.int64)
        for i in range(len(index)):
            out[i] = index[i][keep[i]][:k]
        return out

    return drop_self(merged.best_index), drop_self(merged.worst_index)


def calibrate(queries: np.ndarray, best: np.ndarray, worst: np.ndarray, best_lists: np.ndarray,
              worst_lists: np.ndarray, centroids: np.ndarray, radius: np.ndarray, sizes: np.ndarray,
              target: float = TARGET_RECALL) -> Calibration:
    """The λ and smallest ``n_probe`` whose recall@k on held-in queries reaches ``target`` (plus
    CALIBRATION_MARGIN) at both ends, λ chosen to read the fewest rows. ``best``/``worst``: the queries'
    exact top-k rows; ``*_lists``: their lists.

    Recall is counted conservatively: a query finds a row only through its own probed lists.
    """
    target = min(1.0, target + CALIBRATION_MARGIN)
    n_lists = centroids.shape[0]
    n_rows = int(sizes.sum())
    probes = sorted({p for p in (2 ** np.arange(0, int(np.log2(max(1, n_lists))) + 1)).tolist()} | {n_lists})
    choice = None
    for lam in BOUND_WEIGHTS:
        hi, lo = list_scores(queries, centroids, radius, lam)
        rank_hi = np.argsort(np.argsort(-hi, axis=1, kind="stable"), axis=1)
        rank_lo = np.argsort(np.argsort(lo, axis=1, kind="stable"), axis=1)
        found_hi = np.take_along_axis(rank_hi, best_lists, axis=1)  # list rank of each true top-k row
        found_lo = np.take_along_axis(rank_lo, worst_lists, axis=1)
        need = max(_smallest_probe(found_hi, target), _smallest_probe(found_lo, target))
        read = _mean_rows_read(hi, lo, sizes, need) / max(1, n_rows)
        if choice is None or read < choice[2] - 1e-12:
            choice = (lam, need, read, found_hi, found_lo, hi, lo)
    lam, need, _, found_hi, found_lo, hi, lo = choice
    table = {}
    for p in sorted(set(probes) | {need}):
        table[str(p)] = {
            "proponent_recall": round(float((found_hi < p).mean()), 4),
            "opponent_recall": round(float((found_lo < p).mean()), 4),
            "fraction_read": round(_mean_rows_read(hi, lo, sizes, p) / max(1, n_rows), 5),
        }
    return Calibration(n_probe=int(need), bound_weight=float(lam), table=table)


def _smallest_probe(found_rank: np.ndarray, target: float) -> int:
    """Smallest p with mean(found_rank < p) ≥ target."""
    flat = np.sort(found_rank.ravel())
    need = int(np.ceil(target * flat.size - 1e-9))
    return int(flat[max(0, need - 1)]) + 1 if need > 0 else 1


def _mean_rows_read(hi: np.ndarray, lo: np.ndarray, sizes: np.ndarray, p: int) -> float:
    """Mean over queries of the rows in the union of their p best lists for each end."""
    n_lists = hi.shape[1]
    if p >= n_lists:
        return float(sizes.sum())
    top = np.argpartition(-hi, p - 1, axis=1)[:, :p]
    bottom = np.argpartition(lo, p - 1, axis=1)[:, :p]
    total = 0.0
    for a, b in zip(top, bottom):
        total += sizes[np.union1d(a, b)].sum()
    return total / max(1, len(hi))
