"""Building an index: the sample pass and quantizer, the layout, the assignment and gather passes, the
calibration and the seal, each pass a Dask graph (``ivf_graphs``) in bounded memory. ``build_index``
(trackin_ooc.indexing) checks its inputs and output, takes the lock and calls these."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..errors import ArgumentError
from ..store import GradientStore, layout
from ..store.backends import StorageOptions
from ..store.index_store import TopKIndex
from . import ivf, ivf_graphs
from .execute import compute

log = logging.getLogger("trackin_ooc")

# Re-ordered index rows per chunk (all checkpoints in one chunk): about one list, so that reading a list
# touches few chunks, but at least MIN_CHUNK_BYTES (zarr's cost per chunk read, ~1 ms, makes smaller chunks
# slow) and at most MAX_CHUNK_ROWS.
MIN_CHUNK_BYTES, MAX_CHUNK_ROWS = 256 << 10, 4096
WINDOW_BYTES = 32 << 20  # re-ordered rows written per pass-2 task (all checkpoints)


def _chunk_rows(n_rows: int, n_lists: int, row_bytes: int) -> int:
    mean = max(1, n_rows // max(1, n_lists))
    rows = max(1 << max(0, mean.bit_length() - 1), -(-MIN_CHUNK_BYTES // max(1, row_bytes)))
    return int(min(n_rows, MAX_CHUNK_ROWS, rows))


def _window_rows(n_rows: int, chunk_rows: int, row_bytes: int) -> int:
    return int(min(n_rows, chunk_rows * max(1, WINDOW_BYTES // max(1, chunk_rows * row_bytes))))


def lay_out_index(
    tr: GradientStore,
    out: str | os.PathLike[str],
    n_lists: int,
    normalize: bool,
    seed: int,
    params: dict[str, Any],
    memory_limit: int,
    progress: bool | None,
    client: Any,
    storage_options: StorageOptions,
) -> TopKIndex:
    """Sample, train the quantizer, pick the calibration queries, and lay out an empty index."""
    width = tr.n_checkpoints * tr.feature_dim
    n_sample = ivf.sample_size(tr.n_examples, n_lists, width, memory_limit)
    if n_lists > n_sample:
        raise ArgumentError(
            f"n_lists={n_lists} needs at least as many sampled rows, but the memory budget allows "
            f"{n_sample}; use fewer lists or a larger memory_limit"
        )
    block_rows = tr.chunk_rows
    (parts,) = compute(
        ivf_graphs.sample_graph(tr, block_rows, n_sample, seed, normalize),
        desc="index: sample",
        progress=progress,
        client=client,
    )
    positions = np.concatenate([p for p, _ in parts])
    sample = np.concatenate([x for _, x in parts])
    del parts
    # Calibration queries: sampled rows held out of the quantizer's fit, so that (like test examples) the
    # centroids were not pulled towards them. Where the sample is too small to spare them, they stay in.
    rng = np.random.default_rng(seed)
    n_q = min(ivf.CALIBRATION_QUERIES, len(positions))
    pick = np.sort(rng.choice(len(positions), size=n_q, replace=False))
    queries, query_rows = sample[pick].copy(), positions[pick]
    if len(positions) - n_q >= max(n_lists, ivf.SAMPLE_PER_LIST * n_lists // 2):
        sample = np.delete(sample, pick, axis=0)
    centroids, bands = ivf.train_quantizer(sample, n_lists, seed)
    samples, sample_offsets = ivf.list_samples(sample, centroids, bands, seed)
    del sample
    row_bytes = tr.n_checkpoints * tr.feature_dim * layout.itemsize(tr.dtype)
    chunk_rows = _chunk_rows(tr.n_examples, n_lists, row_bytes)
    return TopKIndex.create(
        out,
        train=tr,
        normalize=normalize,
        centroids=centroids,
        calibration_rows=query_rows,
        calibration_queries=queries,
        bands=bands,
        list_samples=samples,
        list_sample_offsets=sample_offsets,
        calibration_k=min(tr.n_examples, ivf.CALIBRATION_K + 1),
        block_rows=block_rows,
        chunk_rows=chunk_rows,
        window_rows=_window_rows(tr.n_examples, chunk_rows, row_bytes),
        params=params,
        storage_options=storage_options,
    )


def fill_index(
    tr: GradientStore, idx: TopKIndex, normalize: bool, target_recall: float, progress: bool | None, client: Any
) -> None:
    """Passes 1 and 2 (skipping what an earlier run finished), the calibration, then the seal."""
    windows_done = idx.windows_done()
    if not windows_done.all():
        done = idx.blocks_done()
        if not done.all():
            compute(
                ivf_graphs.assign_graph(tr, idx, normalize, done),
                desc="index: assign",
                progress=progress,
                client=client,
            )
        counts = idx.block_counts()
        offsets = np.concatenate([[0], np.cumsum(counts.sum(axis=0))]).astype(np.int64)
        idx.write_lists(offsets, idx.block_radius().max(axis=0))
        compute(
            ivf_graphs.gather_graph(idx, counts, offsets, windows_done),
            desc="index: gather",
            progress=progress,
            client=client,
        )
    idx = TopKIndex(idx.path, storage_options=idx.storage_options)
    cal = calibrate_index(idx, target_recall)
    verdict = ivf.verdict(cal, target_recall)
    if not cal.structured:
        log.warning("index of %s: %s", tr.path, verdict)
    idx.drop_staging()
    idx.mark_complete(
        rules=(cal.proponents, cal.opponents),
        structured=cal.structured,
        verdict=verdict,
        calibration={
            "k": ivf.CALIBRATION_K,
            "target_recall": target_recall,
            "margin": ivf.CALIBRATION_MARGIN,
            "queries": int(len(idx.calibration_data()["rows"])),
            "held_out": True,
            "recall": round(cal.recall, 4),
            "fraction_read": round(cal.fraction_read, 5),
            "by_n_probe": cal.table,
        },
    )


def calibrate_index(idx: TopKIndex, target_recall: float) -> ivf.Calibration:
    """Each end's probe rule and default n_probe from the held-out calibration queries."""
    data = idx.calibration_data()
    k = min(ivf.CALIBRATION_K, idx.n_examples - 1)
    if k < 1:
        every = ivf.EndRule("centroid", 0.0, idx.n_lists)
        return ivf.Calibration(proponents=every, opponents=every, table={}, fraction_read=1.0)
    best, worst = ivf.true_top(data, data["rows"], k)
    rows, where = np.unique(np.concatenate([best.ravel(), worst.ravel()]), return_inverse=True)
    lists = idx.assignment(rows).astype(np.int64)[where]
    best_lists, worst_lists = lists[: best.size].reshape(best.shape), lists[best.size :].reshape(worst.shape)
    return ivf.calibrate(data["queries"], best_lists, worst_lists, idx.quantizer(), target=target_recall)
