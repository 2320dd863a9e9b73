"""The on-disk layout of a top-k index: train rows re-ordered by inverted list, in a Zarr v3 group.

An index (``trackin_ooc.build_index``) lives by default inside its train store's folder, as the
subgroup ``index`` (``index_cosine`` for ``normalize=True`` queries), and records the train store's
``store_id`` and fingerprint: an index of an older version of the store is refused, never used.

| array | shape | meaning |
|---|---|---|
| ``grads`` | (checkpoint, row, feature) | the train store's features re-ordered so each list is one run |
| ``train_index`` | (row,) | train position (0..N-1) of each re-ordered row |
| ``list_offsets`` | (list + 1,) | list L is rows ``list_offsets[L]:list_offsets[L+1]`` |
| ``centroids`` | (list, C·F) | the coarse quantizer, in the √η_c-weighted concatenated space |
| ``list_radius`` | (list,) | max distance of a list's rows from its centroid |
| ``band_edges``, ``list_band`` | (band − 1,), (list,) | norm bands: a row goes to its band's nearest centroid |
| ``list_samples`` | (sample, C·F) | sampled rows grouped by list (ranking a list by its best sampled row) |
| ``list_sample_offsets`` | (list + 1,) | list L's sampled rows are ``list_sample_offsets[L]:[L+1]`` |
| ``window_complete`` | (window,) | which row windows of ``grads`` are written |

Format version 2 (version 1 indexes are refused: rebuild them) records whether the calibration found
structure an index can use (``structured``, with its one-line ``verdict``), the calibration's held-out
queries and margin, and keeps every list within twice the mean size.

Build state kept for resuming and calibrating: ``assignment`` (list of every train row, in train order),
``block_counts``/``block_radius``/``block_complete`` per source block, the calibration queries and their
exact top-k per source block, and a temporary ``staging`` subgroup (rows sorted by list within each
source block), removed before the index is marked complete.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import uuid
from typing import Any

import numpy as np
import zarr
from zarr.core.metadata import ArrayV3Metadata

from .._version import __version__
from ..errors import CorruptChunkError, IncompleteStoreError, StaleIndexError, StoreError
from . import backends, layout
from .backends import StorageOptions
from .gradient_store import GradientStore
from .group import ZarrGroup, open_group, short
from .index_records import Bands, EndRule, Quantizer
from .integrity import checked_read

INDEX_FORMAT_VERSION = 2
KIND = "index"
DEFAULT_NAME = "index"
COSINE_NAME = "index_cosine"
STAGING = "staging"

GRADS = "grads"
TRAIN_INDEX = "train_index"
LIST_OFFSETS = "list_offsets"
CENTROIDS = "centroids"
LIST_RADIUS = "list_radius"
WINDOW_COMPLETE = "window_complete"
ASSIGNMENT = "assignment"
BLOCK_COUNTS = "block_counts"
BLOCK_RADIUS = "block_radius"
BLOCK_COMPLETE = "block_complete"
BAND_EDGES = "band_edges"
LIST_BAND = "list_band"
LIST_SAMPLES = "list_samples"
LIST_SAMPLE_OFFSETS = "list_sample_offsets"
CALIB_ROWS = "calibration_rows"
CALIB_QUERIES = "calibration_queries"
CALIB_PARTS = ("calibration_best_score", "calibration_best_index", "calibration_worst_score", "calibration_worst_index")


def default_index_path(store: GradientStore, normalize: bool = False) -> str:
    """Where ``build_index`` saves an index of ``store`` by default: a subgroup of the store's folder."""
    name = COSINE_NAME if normalize else DEFAULT_NAME
    return f"{store.path}/{name}" if backends.is_remote(store.path) else os.path.join(store.path, name)


def _open_group(path: str | os.PathLike[str], storage_options: StorageOptions, read_only: bool) -> zarr.Group:
    return open_group(path, storage_options, read_only=read_only)


def index_meta(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> dict[str, Any] | None:
    """The ``trackin_ooc`` attributes of an index at ``path``; None when there is no index there."""
    try:
        meta = dict(_open_group(path, storage_options, True).attrs).get(layout.ATTRS_KEY)
    except Exception:
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == KIND else None


class TopKIndex(ZarrGroup):
    """An out-of-core inverted-file index of a gradient store, for fast top-k queries with exact scores.

    Made by :func:`trackin_ooc.build_index`; passed to ``top_k(test, train, index=...)``. Only the
    coarse quantizer (centroids, list offsets and radii) is held in memory; rows are read per query.

    Parameters
    ----------
    path : str or path
        The index's location (``open_index`` finds it from its train store).
    storage_options : dict, optional
        fsspec options for a remote index.

    Raises
    ------
    StoreError
        Nothing is at ``path``, it is not an index, or its format version is not this one's.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, storage_options: StorageOptions = None, _group: zarr.Group | None = None
    ) -> None:
        super().__init__(path, storage_options=storage_options, group=_group)

    def _missing(self, error: BaseException) -> str:
        return (
            f"no index at {self.path}: {short(error)}; build one with trackin_ooc.build_index (trackin-ooc index STORE)"
        )

    def _check_meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        if meta is None or meta.get("kind") != KIND:
            raise StoreError(f"{self.path} is not a trackin-ooc index; build one with trackin_ooc.build_index")
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise StoreError(
                f"index {self.path} has format version {meta.get('format_version')}; this trackin-ooc "
                f"reads version {INDEX_FORMAT_VERSION}: rebuild it with build_index(train, "
                f"overwrite=True) (trackin-ooc index TRAIN --overwrite)"
            )
        return meta

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        train: GradientStore,
        normalize: bool,
        centroids: np.ndarray,
        calibration_rows: np.ndarray,
        calibration_queries: np.ndarray,
        bands: Any,  # store.index_records.Bands (the store does not import the engine)
        list_samples: np.ndarray,
        list_sample_offsets: np.ndarray,
        calibration_k: int,
        block_rows: int,
        chunk_rows: int,
        window_rows: int,
        params: dict[str, Any],
        storage_options: StorageOptions = None,
    ) -> TopKIndex:
        """Lay out an empty, incomplete index (every block and window still to be written)."""
        n, c, f = train.n_examples, train.n_checkpoints, train.feature_dim
        k_lists, width = centroids.shape
        n_blocks = len(layout.row_blocks(n, block_rows))
        n_windows = len(layout.row_blocks(n, window_rows))
        on_disk = layout.on_disk_dtype(train.dtype)
        n_q, kc = calibration_queries.shape[0], calibration_k
        group = zarr.open_group(
            store=backends.zarr_store(path, storage_options=storage_options), mode="w", zarr_format=3
        )
        # The attributes first: a build killed while laying out leaves a recognisable (unfinished) index.
        group.attrs[layout.ATTRS_KEY] = {
            "kind": KIND,
            "format_version": INDEX_FORMAT_VERSION,
            "package_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "index_id": uuid.uuid4().hex,
            "train_store": train.path,
            "train_store_id": train.store_id,
            "train_fingerprint": train.fingerprint,
            "n_examples": n,
            "n_checkpoints": c,
            "feature_dim": f,
            "dtype": train.dtype,
            "learning_rates": [float(x) for x in train.learning_rates],
            "normalize": bool(normalize),
            "n_lists": int(k_lists),
            "block_rows": int(block_rows),
            "chunk_rows": int(chunk_rows),
            "window_rows": int(window_rows),
            "calibration_k": int(kc),
            "params": params,
            "complete": False,
        }
        codecs = layout.checksum_codecs()

        def make(
            g: zarr.Group,
            name: str,
            shape: tuple[int, ...],
            chunks: tuple[int, ...],
            dtype: Any,
            dims: tuple[str, ...],
            fill: Any = 0,
        ) -> zarr.Array[Any]:
            # Chunk files side by side ("c.0.12.0"), not one folder per chunk row: removing thousands of
            # folders costs seconds on some file systems, and the staging copy is removed at the end.
            return g.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                compressors=codecs,
                dimension_names=list(dims),
                fill_value=fill,
                chunk_key_encoding={"name": "default", "separator": "."},
            )

        # Chunks hold every checkpoint of their rows: a query reads all of them, in half the chunk reads.
        make(group, GRADS, (c, n, f), (c, chunk_rows, f), on_disk, ("checkpoint", "row", "feature"))
        # One chunk of train positions per window (as many bytes as a features chunk; one writer each).
        make(group, TRAIN_INDEX, (n,), (window_rows,), "int64", ("row",), fill=-1)
        make(group, LIST_OFFSETS, (k_lists + 1,), (k_lists + 1,), "int64", ("list_edge",))
        make(group, CENTROIDS, (k_lists, width), (k_lists, width), "float32", ("list", "width"))[:] = centroids
        make(group, LIST_RADIUS, (k_lists,), (k_lists,), "float32", ("list",))
        n_e = len(bands.edges)
        make(group, BAND_EDGES, (n_e,), (max(1, n_e),), "float32", ("band_edge",))[:] = bands.edges
        make(group, LIST_BAND, (k_lists,), (k_lists,), "int32", ("list",))[:] = bands.of_list
        n_s = max(1, list_samples.shape[0])
        make(group, LIST_SAMPLES, (list_samples.shape[0], width), (n_s, width), "float32", ("sample", "width"))[:] = (
            list_samples
        )
        make(group, LIST_SAMPLE_OFFSETS, (k_lists + 1,), (k_lists + 1,), "int64", ("list_edge",))[:] = (
            list_sample_offsets
        )
        make(group, WINDOW_COMPLETE, (n_windows,), (1,), "uint8", ("window",))
        make(group, ASSIGNMENT, (n,), (block_rows,), "int32", ("example",), fill=-1)
        make(group, BLOCK_COUNTS, (n_blocks, k_lists), (1, k_lists), "int64", ("block", "list"))
        make(group, BLOCK_RADIUS, (n_blocks, k_lists), (1, k_lists), "float32", ("block", "list"))
        make(group, BLOCK_COMPLETE, (n_blocks,), (1,), "uint8", ("block",))
        make(group, CALIB_ROWS, (n_q,), (max(1, n_q),), "int64", ("query",))[:] = calibration_rows
        make(group, CALIB_QUERIES, calibration_queries.shape, calibration_queries.shape, "float32", ("query", "width"))[
            :
        ] = calibration_queries
        for name in CALIB_PARTS:
            dtype = "float32" if name.endswith("score") else "int64"
            make(group, name, (n_blocks, n_q, kc), (1, n_q, kc), dtype, ("block", "query", "rank"))
        staging = group.create_group(STAGING)
        make(
            staging,
            GRADS,
            (c, n, f),
            (c, _staging_chunk_rows(block_rows, chunk_rows), f),
            on_disk,
            ("checkpoint", "row", "feature"),
        )
        make(staging, TRAIN_INDEX, (n,), (_staging_chunk_rows(block_rows, chunk_rows),), "int64", ("row",))
        return cls(path, storage_options=storage_options, _group=group)

    @classmethod
    def resumable(
        cls,
        path: str | os.PathLike[str],
        train: GradientStore,
        params: dict[str, Any],
        storage_options: StorageOptions = None,
    ) -> TopKIndex | None:
        """The unfinished index at ``path`` if a killed build of this very job left it, else None."""
        meta = index_meta(path, storage_options)
        if meta is None or meta.get("complete") or meta.get("format_version") != INDEX_FORMAT_VERSION:
            return None
        if meta.get("train_store_id") != train.store_id or meta.get("params") != params:
            return None
        try:  # every array a resumed build needs must be there (a kill while laying out leaves some out)
            idx = cls(path, storage_options=storage_options)
            idx.blocks_done(), idx.centroids(), idx._read(CALIB_QUERIES), idx._read(CALIB_ROWS)
            if not idx.windows_done().all():
                idx._array(f"{STAGING}/{GRADS}"), idx._array(f"{STAGING}/{TRAIN_INDEX}")
            for name in (
                GRADS,
                TRAIN_INDEX,
                LIST_OFFSETS,
                LIST_RADIUS,
                ASSIGNMENT,
                BLOCK_COUNTS,
                BLOCK_RADIUS,
                LIST_SAMPLES,
                LIST_SAMPLE_OFFSETS,
                BAND_EDGES,
                LIST_BAND,
                *CALIB_PARTS,
            ):
                idx._array(name)
        except (KeyError, FileNotFoundError, StoreError, ValueError):
            return None
        return idx

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def index_id(self) -> str:
        return str(self._meta["index_id"])

    @property
    def n_lists(self) -> int:
        return int(self._meta["n_lists"])

    @property
    def n_examples(self) -> int:
        return int(self._meta["n_examples"])

    @property
    def n_checkpoints(self) -> int:
        return int(self._meta["n_checkpoints"])

    @property
    def feature_dim(self) -> int:
        return int(self._meta["feature_dim"])

    @property
    def dtype(self) -> str:
        return str(self._meta["dtype"])

    @property
    def normalize(self) -> bool:
        """Whether the lists were made for cosine (``normalize=True``) queries."""
        return bool(self._meta["normalize"])

    @property
    def n_probe(self) -> int:
        """Default lists probed per test example (the larger of the two ends' own defaults, calibrated at
        build time for the target recall)."""
        return int(self._meta.get("n_probe") or self.n_lists)

    def rules(self) -> tuple[EndRule, ...]:
        """The calibrated (proponent, opponent) rules (:class:`~trackin_ooc.store.index_records.EndRule`):
        ranking, λ, n_probe."""
        probe = self._meta.get("probe") or {}
        return tuple(
            EndRule(**probe[end]) if end in probe else EndRule("centroid", 0.0, self.n_lists)
            for end in ("proponent", "opponent")
        )

    def bands(self) -> Bands:
        """The norm bands of the lists (:class:`~trackin_ooc.store.index_records.Bands`; no edges: one band)."""
        return Bands(self._read(BAND_EDGES).astype(np.float32), self._read(LIST_BAND))

    def quantizer(self) -> Quantizer:
        """What a query ranks lists with (:class:`~trackin_ooc.store.index_records.Quantizer`), read once."""
        return self._quantizer

    @functools.cached_property
    def _quantizer(self) -> Quantizer:
        return Quantizer(
            centroids=self.centroids(),
            radius=self.list_radius(),
            sizes=self.list_sizes(),
            samples=self._read(LIST_SAMPLES).astype(np.float32, copy=False),
            sample_offsets=self._read(LIST_SAMPLE_OFFSETS),
        )

    @property
    def structured(self) -> bool:
        """Whether the calibration found structure an index can use; where not, ``top_k(index=...)`` at the
        default ``n_probe`` streams exact top-k (an explicit ``n_probe`` still reads the lists)."""
        return bool(self._meta.get("structured", False))

    @property
    def verdict(self) -> str:
        """The calibration's finding in one line (recall and rows read at the default ``n_probe``)."""
        return str(self._meta.get("verdict", ""))

    @property
    def bound_weight(self) -> float:
        """λ in the proponents' list ranking (key ± λ‖q‖·r_L), chosen by the calibration."""
        return float(self.rules()[0].bound_weight)

    @property
    def calibration(self) -> dict[str, Any]:
        """What the build measured on held-out queries: recall@k and fraction read for several ``n_probe``."""
        return dict(self._meta.get("calibration") or {})

    @property
    def train_store(self) -> str:
        return str(self._meta["train_store"])

    @property
    def train_store_id(self) -> str:
        return str(self._meta["train_store_id"])

    @property
    def block_rows(self) -> int:
        return int(self._meta["block_rows"])

    @property
    def window_rows(self) -> int:
        return int(self._meta["window_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self._meta["chunk_rows"])

    @property
    def calibration_k(self) -> int:
        return int(self._meta["calibration_k"])

    @property
    def nbytes(self) -> int:
        """Bytes of the re-ordered features (the index's bulk; uncompressed)."""
        return self.n_checkpoints * self.n_examples * self.feature_dim * layout.itemsize(self.dtype)

    def require_complete(self) -> TopKIndex:
        if not self.complete:
            raise IncompleteStoreError(
                f"index {self.path} is incomplete (its build was interrupted); rerun the same build_index call "
                "(trackin-ooc index ...) to resume it"
            )
        return self

    def check_for(self, train: GradientStore) -> TopKIndex:
        """Refuse (``StaleIndexError``) unless this index was built for exactly this version of ``train``."""
        self.require_complete()
        if self.train_store_id != train.store_id:
            raise StaleIndexError(
                f"index {self.path} was built for another version of the train store (store id "
                f"{self.train_store_id[:8]}…, now {train.store_id[:8]}… at {train.path}: the store was rewritten "
                f"or is another one); rebuild it: build_index(train, overwrite=True) (trackin-ooc index "
                f"{train.path} --overwrite)"
            )
        if (
            self._meta.get("train_fingerprint") != train.fingerprint
            or self.n_examples != train.n_examples
            or self.feature_dim != train.feature_dim
        ):
            raise StaleIndexError(
                f"index {self.path} does not fit the train store {train.path} (fingerprint, examples or features "
                "differ); rebuild it with build_index(train, overwrite=True)"
            )
        return self

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        kind = "cosine" if self.normalize else "dot-product"
        probe = (
            f"n_probe={self.n_probe} by default" if self.structured or not self.complete else "no structure: streams"
        )
        return f"<TopKIndex {self.path!r}: {self.n_lists} lists over {self.n_examples} rows, {kind}, {probe}, {state}>"

    def _repr_html_(self) -> str:
        """A table of the index and its calibration, for Jupyter (trackin_ooc.views.reprs)."""
        from ..views.reprs import index_html

        return index_html(self)

    # ---- reading --------------------------------------------------------------------------------
    def _has(self, name: str) -> bool:
        try:
            self._group[name]
        except KeyError:
            return False
        return True

    def _read(self, name: str, sel: Any = slice(None)) -> np.ndarray:
        return np.asarray(checked_read(self._array(name), name, sel, f"index {self.path}"))

    @functools.cached_property
    def _centroids(self) -> np.ndarray:
        return self._read(CENTROIDS).astype(np.float32, copy=False)

    def centroids(self) -> np.ndarray:
        """(n_lists, C·F) float32 list centroids in the √η_c-weighted space (held in memory once read)."""
        return self._centroids

    def list_offsets(self) -> np.ndarray:
        return self._read(LIST_OFFSETS)

    def list_radius(self) -> np.ndarray:
        return self._read(LIST_RADIUS).astype(np.float32, copy=False)

    def list_sizes(self) -> np.ndarray:
        return np.diff(self.list_offsets())

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-ordered rows at positions ``rows`` (sorted): float32 features (C, n, F) and their train positions."""
        raw, ids = self.read_raw_rows(rows)
        return layout.decode(raw, self.dtype), ids

    def read_raw_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`read_rows`, with the features as stored (the store's on-disk dtype)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._plain_local_chunks(GRADS) and self._plain_local_chunks(TRAIN_INDEX):
            return self._gather_local(GRADS, rows), self._gather_local(TRAIN_INDEX, rows)
        return self._oindex(GRADS, rows, 3), self._oindex(TRAIN_INDEX, rows, 1)

    # A query reads a few hundred scattered chunks. zarr's read path costs ~1-3 ms per chunk here (its
    # event loop, the orthogonal indexer), ten times reading the files: for local indexes, whose arrays this
    # module lays out itself with the plainest Zarr v3 encoding (little-endian bytes, then a crc32c
    # checksum; chunk keys "c.i.j.k"), chunks are read as files and their checksums checked here.
    _PLAIN_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]

    def _plain_local_chunks(self, name: str) -> bool:
        if backends.is_remote(self.path):
            return False
        meta = self._array(name).metadata
        codecs = [c.to_dict() for c in getattr(meta, "codecs", ())]
        if not isinstance(meta, ArrayV3Metadata):  # indexes are Zarr v3
            return False
        configuration = meta.chunk_key_encoding.to_dict().get("configuration")
        separator = configuration.get("separator") if isinstance(configuration, dict) else None
        return codecs == self._PLAIN_CODECS and separator == "."

    def _gather_local(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted positions ``rows`` (the row axis: 0 of 1-d arrays, 1 of 3-d ones), chunk file by file."""
        import google_crc32c

        arr = self._array(name)
        meta = arr.metadata
        chunk_rows = arr.chunks[0 if arr.ndim == 1 else 1]
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        size = int(np.prod(arr.chunks)) * dtype.itemsize
        out_shape = (len(rows),) if arr.ndim == 1 else (arr.shape[0], len(rows), arr.shape[2])
        out = np.empty(out_shape, dtype=arr.dtype)
        chunk_of = rows // chunk_rows
        starts = np.flatnonzero(np.diff(chunk_of, prepend=-1))
        for i, first in enumerate(starts):
            last = starts[i + 1] if i + 1 < len(starts) else len(rows)
            j = int(chunk_of[first])
            key = meta.encode_chunk_key((j,) if arr.ndim == 1 else (0, j, 0))
            file = os.path.join(self.path, name, key)
            try:
                with open(file, "rb") as f:
                    data = f.read()
            except FileNotFoundError:  # a chunk of fill values is not written
                chunk = np.full(arr.chunks, meta.fill_value, dtype=arr.dtype)
            else:
                if len(data) != size + 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
                    raise CorruptChunkError(
                        f"index {self.path}: array {name!r} chunk {key} failed its crc32c checksum: the data on "
                        "disk is damaged; rebuild the index (build_index(train, overwrite=True))"
                    )
                chunk = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize).reshape(arr.chunks)
            local = rows[first:last] - j * chunk_rows
            if arr.ndim == 1:
                out[first:last] = chunk[local]
            else:
                out[:, first:last] = chunk[:, local]
        return out

    def _oindex(self, name: str, rows: np.ndarray, ndim: int) -> np.ndarray:
        """Rows at sorted positions ``rows`` along the row axis (axis 1 of 3-d arrays), reading only their chunks."""
        sel = (slice(None), rows, slice(None)) if ndim == 3 else (rows,)
        try:
            return np.asarray(self._array(name).oindex[sel])
        except ValueError as e:
            if "checksum" not in str(e).lower() or not len(rows):
                raise
            # name the damaged chunk (raises CorruptChunkError)
            span = slice(int(rows.min()), int(rows.max()) + 1)
            checked_read(self._array(name), name, (slice(None), span) if ndim == 3 else span, f"index {self.path}")
            raise

    def windows_done(self) -> np.ndarray:
        return self._read(WINDOW_COMPLETE).astype(bool)

    def blocks_done(self) -> np.ndarray:
        return self._read(BLOCK_COMPLETE).astype(bool)

    def block_counts(self) -> np.ndarray:
        return self._read(BLOCK_COUNTS)

    def calibration_data(self) -> dict[str, np.ndarray]:
        """The calibration queries, their train positions, and their exact top-k partials per source block."""
        out = {"rows": self._read(CALIB_ROWS), "queries": self._read(CALIB_QUERIES)}
        for name in CALIB_PARTS:
            out[name] = self._read(name)
        return out

    def assignment(self, rows: np.ndarray) -> np.ndarray:
        """The list of each train position in ``rows``."""
        return self._oindex(ASSIGNMENT, np.asarray(rows, dtype=np.int64), 1)

    # ---- writing (the build) --------------------------------------------------------------------
    def write_source_block(
        self,
        block: int,
        start: int,
        *,
        assignment: np.ndarray,
        counts: np.ndarray,
        radius: np.ndarray,
        calibration: tuple[np.ndarray, ...],
        sorted_grads: np.ndarray,
        sorted_rows: np.ndarray,
    ) -> None:
        """Pass 1 for one source block: its lists, counts and radii, calibration partials, and its rows sorted
        by list into the staging arrays (this block's own chunks only); then flag the block."""
        self._writable()
        arr = self._array
        stop = start + len(assignment)
        arr(ASSIGNMENT)[start:stop] = assignment.astype(np.int32)
        arr(BLOCK_COUNTS)[block] = counts
        arr(BLOCK_RADIUS)[block] = radius
        for name, part in zip(CALIB_PARTS, calibration):
            arr(name)[block] = part
        arr(f"{STAGING}/{GRADS}")[:, start:stop] = layout.encode(sorted_grads, self.dtype)
        arr(f"{STAGING}/{TRAIN_INDEX}")[start:stop] = sorted_rows
        arr(BLOCK_COMPLETE)[block] = 1

    def read_staging(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Staging rows [start, stop) as stored (on-disk dtype) and their train positions."""
        where = f"index {self.path}"
        grads, ids = f"{STAGING}/{GRADS}", f"{STAGING}/{TRAIN_INDEX}"
        raw = checked_read(self._array(grads), grads, (slice(None), slice(start, stop)), where)
        return np.asarray(raw), np.asarray(checked_read(self._array(ids), ids, slice(start, stop), where))

    def write_lists(self, offsets: np.ndarray, radius: np.ndarray) -> None:
        self._writable()
        self._array(LIST_OFFSETS)[:] = offsets
        self._array(LIST_RADIUS)[:] = radius

    def write_window(self, window: int, start: int, raw: np.ndarray, rows: np.ndarray) -> None:
        """Pass 2: one window of re-ordered rows (on-disk dtype) as whole chunks, then its flag."""
        self._writable()
        stop = start + raw.shape[1]
        self._array(GRADS)[:, start:stop] = raw
        self._array(TRAIN_INDEX)[start:stop] = rows
        self._array(WINDOW_COMPLETE)[window] = 1

    def block_radius(self) -> np.ndarray:
        return self._read(BLOCK_RADIUS)

    def drop_staging(self) -> None:
        """Remove the temporary staging copy (every window is written)."""
        if self._has(STAGING):
            backends.remove(
                f"{self.path}/{STAGING}" if backends.is_remote(self.path) else os.path.join(self.path, STAGING),
                self.storage_options,
            )
            self._group = _open_group(self.path, self.storage_options, False)
            self._arrays.clear()

    def mark_complete(
        self, *, rules: tuple[Any, ...], calibration: dict[str, Any], structured: bool, verdict: str
    ) -> TopKIndex:
        """Seal the index: every window written, staging removed, the calibrated defaults recorded."""
        done = self.windows_done()
        if not done.all():
            raise IncompleteStoreError(
                f"cannot mark index {self.path} complete: {int((~done).sum())} windows unwritten"
            )
        probe = {end: rule.as_dict() for end, rule in zip(("proponent", "opponent"), rules)}
        self._seal(
            n_probe=max(r.n_probe for r in rules),
            probe=probe,
            calibration=json.loads(json.dumps(calibration)),
            structured=bool(structured),
            verdict=verdict,
        )
        return self


def _staging_chunk_rows(block_rows: int, chunk_rows: int) -> int:
    """Staging chunks: the largest divisor of ``block_rows`` up to ``chunk_rows`` (so that source blocks
    never share a staging chunk), or the whole block when no divisor is near ``chunk_rows``."""
    for d in range(min(block_rows, chunk_rows), 0, -1):
        if block_rows % d == 0:
            return d if d * 8 >= min(block_rows, chunk_rows) else block_rows
    return block_rows


def open_index(path: str | os.PathLike[str], *, storage_options: StorageOptions = None) -> TopKIndex:
    """Open the index at ``path`` (a folder a build wrote)."""
    if not backends.is_remote(path) and not os.path.exists(backends.normalize_path(path)):
        raise StoreError(
            f"no index at {backends.normalize_path(path)}: the path does not exist; build one with "
            "trackin_ooc.build_index (trackin-ooc index STORE)"
        )
    return TopKIndex(path, storage_options=storage_options)


def find_index(store: GradientStore, normalize: bool = False) -> TopKIndex | None:
    """The index saved in ``store``'s folder (complete or not), or None when there is none."""
    path = default_index_path(store, normalize)
    if index_meta(path, store.storage_options) is None:
        return None
    return TopKIndex(path, storage_options=store.storage_options)
