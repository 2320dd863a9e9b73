"""Inverted-file (IVF) arithmetic for maximum-inner-product top-k: the space, the quantizer, list ranking
and the calibration of the default ``n_probe``. Pure NumPy (and scikit-learn's k-means), no I/O.

Σ_c η_c ⟨g_c(z'), g_c(z)⟩ is one inner product of the checkpoint-concatenated vectors (√η_c g_c)_c, so
the index lives in that space (with ``normalize``, each g_c is divided by its norm first).

Lists are the cells of a k-means quantizer trained on a sample, rows weighted by their norm (the
scores of large-norm rows decide the top-k, so they get the finer cells), then balanced: no cell holds
more than BALANCE × the mean of the sample (:func:`balance_lists`), so a query probing one list never
reads a fat one. A row goes to its nearest centroid.

For a query q, each end ranks the lists by its own rule (:class:`EndRule`): proponents by the largest
inner product a list is expected to hold, opponents by the most negative, taken either from the
centroid (⟨q, c_L⟩) or from the list's sampled rows (the best ⟨q, s⟩: a list holding several clusters is
ranked by the one nearest q, not by their mean), plus λ‖q‖·r_L, where r_L is the largest distance of a
member from c_L (with the centroid and λ = 1 a true bound: ⟨q, x⟩ ≤ ⟨q, c_L⟩ + ‖q‖·r_L for every x in L).
The ranking, λ and the default ``n_probe`` of each end are chosen by :func:`calibrate` on held-out
queries (sampled rows the quantizer was not fit on). Where the target recall needs more than
MAX_USEFUL_FRACTION of the rows per query, the store has no structure an index can use (:func:`verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from ..store.index_records import Bands, EndRule, Quantizer
from .kernels import fold_checkpoints

BOUND_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)  # λ values the calibration tries (1.0: the true bound)
TARGET_RECALL = 0.95
# The calibration queries are sampled rows held out of the quantizer's fit; half choose each end's rule,
# the other half (512) measure its recall, within about ±0.01: calibrate with this margin.
CALIBRATION_MARGIN = 0.02
CALIBRATION_QUERIES = 1024
CALIBRATION_K = 10
# Where the calibrated n_probe reads more than this fraction of the rows per test example, an indexed
# query costs about what streaming every row costs: the store has no structure an index can use.
MAX_USEFUL_FRACTION = 0.25
BALANCE = 2.0  # no list holds more than this many times the mean (on the sample)
LIST_SAMPLE_BYTES = 64 << 20  # sampled rows kept in the index for ranking lists (read by every query)
NORM_BAND_SPREAD = 2.5  # norm bands where the sample's 99th-percentile norm exceeds this × the median
NORM_BAND_QUANTILES = (0.5, 0.8, 0.95)  # band edges: the largest-norm 5 % of rows get lists of their own
BALANCE_ROUNDS = 12
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


def norm_bands(sample: np.ndarray, n_lists: int) -> np.ndarray:
    """Norm edges of the bands (empty where the norms spread little, or too few lists to share out).

    With dot products and a norm spread, the top-k of a query is decided by the large-norm rows of
    every roughly aligned cluster, not by the rows of its own cluster: cells that mix norms make those
    rows sit in many lists. Bands put the large-norm rows in lists of their own (cut at sample norm
    quantiles NORM_BAND_QUANTILES, where the 99th percentile exceeds NORM_BAND_SPREAD × the median)."""
    if n_lists < 4 * (len(NORM_BAND_QUANTILES) + 1) or len(sample) < 2 * n_lists:
        return np.zeros(0, dtype=np.float32)
    norms = np.sqrt(np.einsum("rw,rw->r", sample, sample, dtype=np.float64))
    median, top = np.quantile(norms, [0.5, 0.99])
    if median <= 0 or top <= NORM_BAND_SPREAD * median:
        return np.zeros(0, dtype=np.float32)
    return np.unique(np.quantile(norms, NORM_BAND_QUANTILES)).astype(np.float32)


def train_quantizer(sample: np.ndarray, n_lists: int, seed: int = 0) -> tuple[np.ndarray, Bands]:
    """(n_lists, W) float32 centroids and their norm bands: k-means on the sample (per band, lists in
    proportion to the band's rows), rows weighted by their norm, cells balanced."""
    n = sample.shape[0]
    if n_lists > n:
        raise ArgumentError(f"n_lists={n_lists} is more than the {n} rows sampled; use n_lists <= {n}")
    edges = norm_bands(sample, n_lists)
    band = Bands(edges, np.zeros(0, np.int32)).band_of(sample)
    counts = np.bincount(band, minlength=len(edges) + 1)
    share = np.maximum(1, np.floor(n_lists * counts / n)).astype(int)
    share = np.minimum(share, np.maximum(counts, 1))
    while share.sum() < n_lists:  # the remainder to the bands with the most rows per list
        share[np.argmax(np.where(share < counts, counts / share, -1))] += 1
    while share.sum() > n_lists:
        share[np.argmax(np.where(share > 1, share, -1))] -= 1
    parts, band_of = [], []
    for b, k in enumerate(share):
        parts.append(_fit(sample[band == b], int(k), seed + b))
        band_of.append(np.full(int(k), b, dtype=np.int32))
    centroids, of_list = np.concatenate(parts), np.concatenate(band_of)
    order = order_lists(centroids, seed)
    return np.ascontiguousarray(centroids[order]), Bands(edges, of_list[order])


def _fit(sample: np.ndarray, n_lists: int, seed: int) -> np.ndarray:
    """Balanced, norm-weighted k-means centroids of ``sample``."""
    from sklearn.cluster import KMeans

    n = sample.shape[0]
    weights = np.sqrt(np.einsum("rw,rw->r", sample, sample, dtype=np.float64))
    if (weights > 0).sum() < n_lists:
        weights = weights + max(weights.max(), 1.0) * 1e-6  # keep every row in play when few are non-zero
    # Initial centroids: rows drawn in proportion to their weight (k-means++ seeding costs a pass over
    # the sample per centroid: minutes for thousands of lists).
    rng = np.random.default_rng(seed)
    init = sample[rng.choice(n, size=n_lists, replace=False, p=weights / weights.sum())]
    km = KMeans(n_clusters=n_lists, init=init, n_init=1, max_iter=KMEANS_ITERATIONS, random_state=seed)
    km.fit(sample, sample_weight=weights)
    return balance_lists(sample, np.ascontiguousarray(km.cluster_centers_, dtype=np.float32), seed)


def balance_lists(sample: np.ndarray, centroids: np.ndarray, seed: int = 0, balance: float = BALANCE) -> np.ndarray:
    """The same number of centroids, no cell holding more than ``balance`` × the mean of the sample.

    k-means cells follow the data's clusters, whose sizes can differ a hundredfold, and a query that
    probes one fat list reads it whole. Each round splits every oversized cell by a small k-means of
    its own rows (into as many parts as it holds means) and, to keep the number of lists, drops as many
    of the smallest cells (their rows go to their next-nearest centroids). Rows still go to their
    nearest centroid, so the out-of-core assignment is unchanged.
    """
    from sklearn.cluster import KMeans

    n, n_lists = sample.shape[0], centroids.shape[0]
    if n_lists < 4 or n < 2 * n_lists:
        return centroids
    mean = n / n_lists
    cap = balance * mean
    for r in range(BALANCE_ROUNDS):
        half_sq = 0.5 * np.einsum("lw,lw->l", centroids, centroids, dtype=np.float32)
        labels = np.concatenate([assign(sample[s : s + 65536], centroids, half_sq)[0] for s in range(0, n, 65536)])
        counts = np.bincount(labels, minlength=n_lists)
        big = np.flatnonzero(counts > cap)
        if not len(big):
            break
        parts = np.ceil(counts[big] / mean).astype(int)
        extra = int((parts - 1).sum())
        small = np.setdiff1d(np.argsort(counts, kind="stable"), big, assume_unique=True)
        small = small[counts[small] < mean][:extra]  # cells to drop: only those below the mean
        if len(small) < extra:  # not enough small cells to make room: split the biggest first
            order = np.argsort(-counts[big], kind="stable")
            budget, keep = len(small), []
            for i in order:
                if budget <= 0:
                    break
                p = min(int(parts[i]), budget + 1)
                keep.append((big[i], p))
                budget -= p - 1
        else:
            keep = list(zip(big, parts))
        if not keep:
            break
        new, used = [], 0
        for lst, p in keep:
            rows = sample[labels == lst]
            p = int(min(p, len(rows)))
            if p < 2:
                continue
            sub = KMeans(n_clusters=p, n_init=1, max_iter=10, random_state=seed + r).fit(rows)
            new.append((lst, sub.cluster_centers_.astype(np.float32)))
            used += p - 1
        if not new:
            break
        drop = set(small[:used].tolist()) | {lst for lst, _ in new}
        kept = [centroids[i][None] for i in range(n_lists) if i not in drop]
        centroids = np.ascontiguousarray(np.concatenate(kept + [c for _, c in new]), dtype=np.float32)
        assert centroids.shape[0] == n_lists
    return centroids


def list_samples(
    sample: np.ndarray, centroids: np.ndarray, bands: Bands, seed: int = 0, max_bytes: int = LIST_SAMPLE_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Sampled rows grouped by their list (at most ``max_bytes`` of them) and the (lists + 1,) offsets."""
    n_lists, width = centroids.shape
    keep = min(len(sample), max(n_lists, max_bytes // max(1, 4 * width)))
    rows = sample
    if keep < len(sample):
        rows = sample[np.sort(np.random.default_rng([seed, 1]).choice(len(sample), size=keep, replace=False))]
    half_sq = 0.5 * np.einsum("lw,lw->l", centroids, centroids, dtype=np.float32)
    labels = np.concatenate(
        [assign(rows[s : s + 65536], centroids, half_sq, bands)[0] for s in range(0, len(rows), 65536)]
    )
    order = np.argsort(labels, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_lists))]).astype(np.int64)
    return np.ascontiguousarray(rows[order], dtype=np.float32), offsets


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


def assign(
    rows: np.ndarray, centroids: np.ndarray, half_sq: np.ndarray, bands: Bands | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row (argmax ⟨x, c⟩ − ‖c‖²/2; among its norm band's, with ``bands``) and the
    row's distance to it."""
    scores = rows @ centroids.T
    scores -= half_sq
    if bands is not None and len(bands.edges):
        scores[bands.of_list[None, :] != bands.band_of(rows)[:, None]] = -np.inf
    lists = scores.argmax(axis=1)
    best = np.take_along_axis(scores, lists[:, None], axis=1)[:, 0]
    sq = np.einsum("rw,rw->r", rows, rows, dtype=np.float32) - 2.0 * best  # ‖x‖² − 2⟨x,c⟩ + ‖c‖²
    return lists.astype(np.int32), np.sqrt(np.maximum(sq, 0.0))


RANKINGS = ("centroid", "sample")
QUERY_TILE = 256  # queries ranked at once (bounds the queries × samples score tile)


def list_keys(queries: np.ndarray, qz: Quantizer, ranking: str, bound_weight: float, opponents: bool) -> np.ndarray:
    """(queries, lists) keys, higher first: for proponents the largest, for opponents the most negative,
    inner products a list is expected to hold."""
    sign = -1.0 if opponents else 1.0
    keys = sign * (queries @ qz.centroids.T)
    if ranking == "sample" and len(qz.samples):
        filled = np.flatnonzero(np.diff(qz.sample_offsets) > 0)
        scores = sign * (queries @ qz.samples.T)
        keys[:, filled] = np.maximum.reduceat(scores, qz.sample_offsets[filled], axis=1)
    if bound_weight:
        keys += bound_weight * np.sqrt(np.einsum("qw,qw->q", queries, queries))[:, None] * qz.radius[None, :]
    return keys


def probe(
    queries: np.ndarray, qz: Quantizer, rules: tuple[EndRule, EndRule], k: int, n_probe: int | None = None
) -> np.ndarray:
    """Sorted ids of the lists to read for a block of queries: for each query and end, its best lists
    by that end's rule (``n_probe`` lists, or the rule's own default; more where needed to hold at least
    ``k`` rows)."""
    n_lists = qz.n_lists
    chosen = np.zeros(n_lists, dtype=bool)
    for t in range(0, len(queries), QUERY_TILE):
        block = queries[t : t + QUERY_TILE]
        for opponents, rule in enumerate(rules):
            p = min(n_lists, rule.n_probe if n_probe is None else n_probe)
            if p >= n_lists:
                return np.arange(n_lists)
            keys = list_keys(block, qz, rule.ranking, rule.bound_weight, bool(opponents))
            order = np.argsort(-keys, axis=1, kind="stable")
            take = np.full(len(block), p)
            # where the first p lists hold fewer than k rows, take lists until they do
            held = np.cumsum(qz.sizes[order], axis=1)
            short = held[:, p - 1] < k
            if short.any():
                take[short] = np.minimum(n_lists, 1 + np.argmax(held[short] >= k, axis=1))
            chosen[order[np.arange(n_lists)[None, :] < take[:, None]]] = True
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
    proponents: EndRule
    opponents: EndRule
    table: dict  # n_probe -> recall (proponents, opponents) and mean fraction of rows read per query
    fraction_read: float = 1.0  # at the rules' own n_probe, per query
    recall: float = 1.0  # the lower of the two ends there

    @property
    def n_probe(self) -> int:
        return max(self.proponents.n_probe, self.opponents.n_probe)

    @property
    def structured(self) -> bool:
        """Whether an indexed query reads little enough to beat streaming every row."""
        return self.fraction_read <= MAX_USEFUL_FRACTION


def verdict(cal: Calibration, target: float) -> str:
    """One line saying what the calibration found (recorded in the index; logged when there is no structure)."""
    reach = f"recall@{CALIBRATION_K} {cal.recall:.3f} (target {target:.2f} + {CALIBRATION_MARGIN:.2f})"
    probes = f"n_probe {cal.proponents.n_probe} (proponents) and {cal.opponents.n_probe} (opponents)"
    if cal.structured:
        return (
            f"{probes} reach {reach} on held-out queries reading {100 * cal.fraction_read:.2f} % of rows per "
            "test example"
        )
    return (
        f"no structure an index can use: {reach} on held-out queries needs {probes}, "
        f"{100 * cal.fraction_read:.0f} % of rows per test example (more than "
        f"{100 * MAX_USEFUL_FRACTION:.0f} %); top_k(index=...) streams exact top-k instead"
    )


def true_top(parts: dict[str, np.ndarray], query_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (train positions) of each calibration query from the per-block partials, itself excluded."""
    from .kernels import TopK, merge_topk

    names = ("calibration_best_score", "calibration_best_index", "calibration_worst_score", "calibration_worst_index")
    blocks = [TopK(*(parts[n][b] for n in names)) for b in range(parts[names[0]].shape[0])]
    merged = merge_topk(blocks, parts[names[0]].shape[2])

    def drop_self(index):
        keep = index != query_rows[:, None]
        out = np.empty((len(index), k), dtype=np.int64)
        for i in range(len(index)):
            out[i] = index[i][keep[i]][:k]
        return out

    return drop_self(merged.best_index), drop_self(merged.worst_index)


def calibrate(
    queries: np.ndarray, best_lists: np.ndarray, worst_lists: np.ndarray, qz: Quantizer, target: float = TARGET_RECALL
) -> Calibration:
    """Per end, the ranking, λ and smallest ``n_probe`` whose recall@k on held-out queries reaches
    ``target`` (plus CALIBRATION_MARGIN), chosen to read the fewest rows. ``best_lists``/``worst_lists``:
    the lists of the queries' exact top-k rows at each end.

    Recall is counted conservatively: a query finds a row only through its own probed lists.
    """
    target = min(1.0, target + CALIBRATION_MARGIN)
    n_lists = qz.n_lists
    n_rows = max(1, int(qz.sizes.sum()))
    # Choosing the cheapest of several rules on the queries that then measure it would flatter it: the
    # rule is chosen on half of the queries, its n_probe (and the table) measured on the other half.
    choose, measure = np.arange(0, len(queries), 2), np.arange(1, len(queries), 2)
    if len(measure) == 0:
        choose = measure = np.arange(len(queries))
    rules, ranks = [], []
    for opponents, true_lists in enumerate((best_lists, worst_lists)):
        choice = None
        for ranking in RANKINGS:
            if ranking == "sample" and not len(qz.samples):
                continue
            for lam in BOUND_WEIGHTS:
                keys = list_keys(queries[choose], qz, ranking, lam, bool(opponents))
                need = _smallest_probe(_found_ranks(keys, true_lists[choose]), target)
                read = _mean_rows_read([keys], qz.sizes, [need])
                if choice is None or read < choice[0] - 1e-12:
                    choice = (read, ranking, float(lam))
        assert choice is not None  # at least one ranking was tried
        _, ranking, lam = choice
        keys = list_keys(queries[measure], qz, ranking, lam, bool(opponents))
        found = _found_ranks(keys, true_lists[measure])
        rules.append(EndRule(ranking, lam, _smallest_probe(found, target)))
        ranks.append((keys, found))
    (hi, found_hi), (lo, found_lo) = ranks
    probes = sorted(
        set((2 ** np.arange(0, int(np.log2(max(1, n_lists))) + 1)).tolist()) | {n_lists} | {r.n_probe for r in rules}
    )
    table = {}
    for p in probes:
        table[str(p)] = {
            "proponent_recall": round(float((found_hi < p).mean()), 4),
            "opponent_recall": round(float((found_lo < p).mean()), 4),
            "fraction_read": round(_mean_rows_read([hi, lo], qz.sizes, [p, p]) / n_rows, 5),
        }
    read = _mean_rows_read([hi, lo], qz.sizes, [r.n_probe for r in rules]) / n_rows
    reached = min(float((found_hi < rules[0].n_probe).mean()), float((found_lo < rules[1].n_probe).mean()))
    return Calibration(proponents=rules[0], opponents=rules[1], table=table, fraction_read=float(read), recall=reached)


def _found_ranks(keys: np.ndarray, true_lists: np.ndarray) -> np.ndarray:
    """The rank (0 = probed first) of the list of each true top-k row, per query."""
    rank = np.argsort(np.argsort(-keys, axis=1, kind="stable"), axis=1)
    return np.take_along_axis(rank, true_lists, axis=1)


def _smallest_probe(found_rank: np.ndarray, target: float) -> int:
    """Smallest p with mean(found_rank < p) ≥ target."""
    flat = np.sort(found_rank.ravel())
    need = int(np.ceil(target * flat.size - 1e-9))
    return int(flat[max(0, need - 1)]) + 1 if need > 0 else 1


def _mean_rows_read(keys: list[np.ndarray], sizes: np.ndarray, probes: list[int]) -> float:
    """Mean over queries of the rows in the union of their best ``probes[i]`` lists by each ``keys[i]``."""
    n_lists = keys[0].shape[1]
    if max(probes) >= n_lists:
        return float(sizes.sum())
    tops = [np.argpartition(-key, p - 1, axis=1)[:, :p] for key, p in zip(keys, probes)]
    total = 0.0
    for q in range(keys[0].shape[0]):
        lists = tops[0][q] if len(tops) == 1 else np.unique(np.concatenate([t[q] for t in tops]))
        total += sizes[lists].sum()
    return total / max(1, keys[0].shape[0])
