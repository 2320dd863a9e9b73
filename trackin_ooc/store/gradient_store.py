"""GradientStore: the one class that reads and writes the on-disk layout (docs/store-format.md)."""

from __future__ import annotations

import datetime as _dt
import os
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .._version import __version__
from ..errors import IncompleteStoreError, StoreError, StoreExistsError
from ..spec import ProjectionSpec
from . import backends, guard, layout
from .backends import StorageOptions
from .group import ZarrGroup, create_group, short
from .integrity import checked_read
from .rows import RowBlock

if TYPE_CHECKING:
    import xarray as xr

    from .index_store import TopKIndex


class GradientStore(ZarrGroup):
    """A per-checkpoint matrix of per-example gradient features, in a Zarr v3 group.

    Open one with :func:`open_store`; make one with :func:`trackin_ooc.capture` or :func:`from_arrays`.
    Reading never loads more than the rows asked for.

    Parameters
    ----------
    path : str or path
        The store's location (local or fsspec URL).
    storage_options : dict, optional
        fsspec options for a remote store.

    Raises
    ------
    StoreError
        Nothing is at ``path``, or it is not a gradient store this version reads.
    """

    _open_errors = (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError)

    def __init__(
        self, path: str | os.PathLike[str], *, storage_options: StorageOptions = None, _group: zarr.Group | None = None
    ) -> None:
        super().__init__(path, storage_options=storage_options, group=_group)

    def _missing(self, error: BaseException) -> str:
        return f"no gradient store at {self.path}: {short(error)}; give the path a capture wrote"

    def _check_meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        if meta is None:
            raise StoreError(
                f"{self.path} is a Zarr group but not a trackin-ooc gradient store (no '{layout.ATTRS_KEY}' "
                "attributes); give a store made by trackin_ooc.capture or from_arrays"
            )
        if meta.get("kind", "gradients") != "gradients":
            raise StoreError(
                f"{self.path} is a trackin-ooc {meta.get('kind')} output, not a gradient store; "
                "give the path of a store made by capture or from_arrays"
            )
        version = meta.get("format_version")
        if version not in layout.READABLE_VERSIONS:
            raise StoreError(
                f"{self.path} has store format version {version}; this trackin-ooc reads versions "
                f"{', '.join(map(str, layout.READABLE_VERSIONS))}: re-capture it or use a matching trackin-ooc"
            )
        return meta

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        n_checkpoints: int,
        n_examples: int,
        spec: ProjectionSpec,
        learning_rates: Sequence[float] | np.ndarray,
        dtype: str = "float32",
        checkpoint_names: Sequence[str] | None = None,
        checkpoint_hashes: Sequence[str | None] | None = None,
        loss_name: str | None = None,
        label_dtype: str | np.dtype | None = None,
        example_ids: np.ndarray | None = None,
        chunk_rows: int | None = None,
        overwrite: bool = False,
        storage_options: StorageOptions = None,
        extra_attrs: dict[str, Any] | None = None,
        with_norms: bool = False,
        factors: Sequence[layout.FactorArray] = (),
        feature_dim: int | None = None,
        checked: guard.Existing | None = None,
    ) -> GradientStore:
        """Lay out an empty, incomplete store (every row block still to be written).

        The output rule (``store.guard``) is applied here, unless the caller applied it already and gives
        what it found as ``checked`` (capture checks before loading any checkpoint): then what the check
        allowed replacing is removed.
        ``with_norms``: also an array for the exact squared gradient norms a capture measures.
        ``factors``: per-layer factor arrays (layout version 2, ``projection="factors"``); ``grads`` then
        holds the flat part, ``feature_dim`` values wide (default ``spec.dim``; 0 is allowed with factors).
        """
        if n_examples <= 0:
            raise StoreError("a gradient store needs at least one example")
        if len(learning_rates) != n_checkpoints:
            raise StoreError(f"{len(learning_rates)} learning rates for {n_checkpoints} checkpoints")
        if checked is None:
            guard.prepare_output(path, kind="gradients", overwrite=overwrite, storage_options=storage_options)
        else:
            guard.clear_output(path, checked, storage_options)
        on_disk = layout.on_disk_dtype(dtype)
        factors = list(factors)
        feature_dim = spec.dim if feature_dim is None else int(feature_dim)
        if feature_dim < (0 if factors else 1):
            raise StoreError(f"a gradient store needs a positive feature width, got {feature_dim}")
        row_width = feature_dim + sum(f.row_values for f in factors)
        rows = chunk_rows or layout.default_chunk_rows(row_width, n_checkpoints, dtype, n_examples)
        rows = max(1, min(int(rows), n_examples))
        n_blocks = len(layout.row_blocks(n_examples, rows))

        group = create_group(path, storage_options)
        codecs = layout.checksum_codecs()

        def make(
            name: str,
            shape: tuple[int, ...],
            chunks: tuple[int, ...],
            dt: Any,
            fill: Any = 0,
            dims: Sequence[str] | None = None,
        ) -> zarr.Array[Any]:
            return group.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dt,
                compressors=codecs,
                dimension_names=list(dims or layout.DIMS[name]),
                fill_value=fill,
            )

        grads = make(layout.GRADS, (n_checkpoints, n_examples, feature_dim), (1, rows, max(1, feature_dim)), on_disk)
        if dtype == "bfloat16":
            grads.attrs["trackin_ooc_dtype"] = "bfloat16"  # raw bits; GradientStore decodes to float32
        for f in factors:  # chunked like grads: one (checkpoint, row block) chunk holds all positions
            arr = make(
                f.name,
                (n_checkpoints, n_examples, f.positions, f.width),
                (1, rows, f.positions, f.width),
                on_disk,
                dims=f.dims,
            )
            arr.attrs.update({"module": f.module, "layer_kind": f.kind, "d_in": f.d_in, "d_out": f.d_out})
            if dtype == "bfloat16":
                arr.attrs["trackin_ooc_dtype"] = "bfloat16"
            if f.tokens_name is not None:
                ids = make(
                    f.tokens_name,
                    (n_examples, f.positions),
                    (rows, f.positions),
                    "int64",
                    fill=layout.NO_TOKEN,
                    dims=f.token_dims,
                )
                ids.attrs.update({"module": f.module, "layer_kind": f.kind})
        make(layout.LOSS, (n_checkpoints, n_examples), (1, rows), "float32", fill=np.nan)
        lr = make(layout.LEARNING_RATE, (n_checkpoints,), (n_checkpoints,), "float64")
        lr[:] = np.asarray(learning_rates, dtype=np.float64)
        id_rows = max(rows, min(n_examples, 1 << 20))
        ex = make(layout.EXAMPLE, (n_examples,), (id_rows,), "int64")
        ex[:] = np.arange(n_examples) if example_ids is None else np.asarray(example_ids, dtype=np.int64)
        # Per-row arrays written with the row blocks share their chunking: writers of different
        # blocks (Dask tasks of a scaled-out capture) never touch the same chunk.
        if label_dtype is not None:
            make(layout.LABEL, (n_examples,), (rows,), np.dtype(label_dtype))
        make(layout.NONFINITE, (n_examples,), (rows,), "uint8")
        if with_norms:
            make(layout.GRAD_SQ_NORM, (n_checkpoints, n_examples), (1, rows), "float32", fill=np.nan)
        make(layout.BLOCK_COMPLETE, (n_blocks,), (1,), "uint8")

        meta = {
            "format_version": layout.FACTORS_FORMAT_VERSION if factors else layout.FORMAT_VERSION,
            "package_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "store_id": uuid.uuid4().hex,
            "dtype": dtype,
            "n_checkpoints": n_checkpoints,
            "n_examples": n_examples,
            "feature_dim": feature_dim,
            "chunk_rows": rows,
            "projection": spec.to_dict(),
            "fingerprint": spec.fingerprint,
            "learning_rates": [float(x) for x in learning_rates],
            "checkpoint_names": list(checkpoint_names or [f"checkpoint_{i}" for i in range(n_checkpoints)]),
            "checkpoint_sha256": list(checkpoint_hashes or [None] * n_checkpoints),
            "loss": loss_name,
            "complete": False,
            **({layout.FACTORS_ATTR: [f.to_dict() for f in factors]} if factors else {}),
            **(extra_attrs or {}),
        }
        group.attrs[layout.ATTRS_KEY] = meta
        return cls(path, storage_options=storage_options, _group=group)

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def n_checkpoints(self) -> int:
        return int(self._meta["n_checkpoints"])

    @property
    def n_examples(self) -> int:
        return int(self._meta["n_examples"])

    @property
    def feature_dim(self) -> int:
        """Width of ``grads``: the features; in a factor store, the flat part only (see ``row_width``)."""
        return int(self._meta["feature_dim"])

    @property
    def learning_rates(self) -> np.ndarray:
        return np.asarray(self._meta["learning_rates"], dtype=np.float64)

    @property
    def dtype(self) -> str:
        """Storage dtype: float32, float16 or bfloat16 (reads always return float32)."""
        return str(self._meta["dtype"])

    @property
    def chunk_rows(self) -> int:
        return int(self._meta["chunk_rows"])

    @property
    def spec(self) -> ProjectionSpec:
        return ProjectionSpec.from_dict(self._meta["projection"])

    @property
    def fingerprint(self) -> str:
        return str(self._meta["fingerprint"])

    @property
    def store_id(self) -> str:
        """Random id given at creation: tells a re-created store at the same path from the old one."""
        return str(self._meta.get("store_id", ""))

    @property
    def checkpoint_names(self) -> list[str]:
        return list(self._meta["checkpoint_names"])

    @property
    def checkpoint_hashes(self) -> list[str | None]:
        return list(self._meta["checkpoint_sha256"])

    @property
    def loss_name(self) -> str | None:
        return self._meta.get("loss")

    @property
    def has_labels(self) -> bool:
        return layout.LABEL in self._array_names()

    @property
    def nbytes(self) -> int:
        """Bytes of the gradient matrix as stored (uncompressed; with its factor arrays, if any)."""
        return layout.gradient_bytes(
            self.n_checkpoints, self.n_examples, self.feature_dim, self.factor_arrays, self.dtype
        )

    @property
    def factor_arrays(self) -> list[layout.FactorArray]:
        """The layers stored as factors (layout version 2), in the spec's order; empty for a flat store."""
        return [layout.FactorArray.from_dict(d) for d in self._meta.get(layout.FACTORS_ATTR) or []]

    @property
    def has_factors(self) -> bool:
        """Whether some layers are stored as per-layer factors (``projection="factors"``, version 2)."""
        return bool(self._meta.get(layout.FACTORS_ATTR))

    @property
    def row_width(self) -> int:
        """Values stored per example and checkpoint: the flat features plus every factor array's."""
        return self.feature_dim + sum(f.row_values for f in self.factor_arrays)

    @property
    def n_nonfinite(self) -> int:
        """Examples stored as zeros because their gradients or loss were NaN/inf (counted when sealed)."""
        return int(self._meta.get("n_nonfinite", 0))

    @property
    def label_dtype(self) -> np.dtype | None:
        return self._array(layout.LABEL).dtype if self.has_labels else None

    def nonfinite_examples(self) -> np.ndarray:
        """Example ids whose gradients or loss were NaN/inf, stored as zeros (captured with nonfinite='flag')."""
        if layout.NONFINITE not in self._array_names():
            return np.zeros(0, dtype=np.int64)
        flags = checked_read(self._array(layout.NONFINITE), layout.NONFINITE, slice(None), self.path)
        return self.example_ids()[np.flatnonzero(flags)]

    @property
    def has_exact_norms(self) -> bool:
        """Whether the capture stored exact squared gradient norms (for exact self-influence)."""
        return layout.GRAD_SQ_NORM in self._array_names()

    @property
    def index(self) -> TopKIndex | None:
        """The top-k index saved in this store's folder (``trackin_ooc.build_index``), or None."""
        from .index_store import find_index

        return find_index(self)

    def require_exact_norms(self) -> GradientStore:
        """Raise :class:`StoreError` unless the capture stored exact gradient norms."""
        if not self.has_exact_norms:
            raise StoreError(
                f"{self.path} holds no exact gradient norms (made by from_arrays or an older trackin-ooc); "
                "use the projected self-influence (exact_norms=False) or re-capture it"
            )
        return self

    def read_sq_norms(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Exact ‖g_c‖² of rows [start, stop) before projection: (checkpoint, rows) float32."""
        self.require_exact_norms()
        sel = (slice(None), slice(start, stop))
        return np.asarray(
            checked_read(self._array(layout.GRAD_SQ_NORM), layout.GRAD_SQ_NORM, sel, self.path), dtype=np.float32
        )

    def row_blocks(self) -> list[tuple[int, int]]:
        """The stored row blocks, [start, stop), one chunk of rows each."""
        return layout.row_blocks(self.n_examples, self.chunk_rows)

    def blocks_done(self) -> np.ndarray:
        """Boolean per row block: fully written (all checkpoints, losses and labels)."""
        return np.asarray(self._array(layout.BLOCK_COMPLETE)[:]).astype(bool)

    def require_complete(self) -> GradientStore:
        """Raise :class:`IncompleteStoreError` unless every block was written and the store sealed."""
        if not self.complete:
            done = int(self.blocks_done().sum())
            raise IncompleteStoreError(
                f"store {self.path} is incomplete ({done} of {len(self.row_blocks())} row blocks written); "
                "rerun the same capture to resume it (or with overwrite=True, --overwrite, to start over)"
            )
        return self

    # ---- reading --------------------------------------------------------------------------------
    def _array_names(self) -> set[str]:
        """Arrays in the group (listed once: a store's arrays are all made when it is laid out)."""
        names = self.__dict__.get("_names")
        if names is None:
            names = self._names = {name for name, _ in self._group.arrays()}
        return names

    def read_grads(self, start: int = 0, stop: int | None = None, checkpoint: int | None = None) -> np.ndarray:
        """float32 gradient features of rows [start, stop): shape (checkpoint, rows, feature).

        With ``checkpoint`` given, one checkpoint's (rows, feature) block. A store with per-layer
        factors holds no such matrix (its gradients would be ``row_width`` → parameters wide): read its
        parts with :meth:`read_flat` and :meth:`read_factors`.
        """
        if self.has_factors:
            raise StoreError(
                f"{self.path} stores per-layer factors (projection='factors'), not one gradient matrix; "
                "score it with influence/top_k/self_influence, or read read_flat() and read_factors()"
            )
        return self.read_flat(start, stop, checkpoint)

    def read_flat(self, start: int = 0, stop: int | None = None, checkpoint: int | None = None) -> np.ndarray:
        """float32 ``grads`` of rows [start, stop), (checkpoint, rows, feature): the whole features of a flat
        store, the flat part (layers not stored as factors; maybe 0 wide) of a factor store."""
        stop = self.n_examples if stop is None else stop
        arr = self._array(layout.GRADS)
        sel = (slice(None) if checkpoint is None else checkpoint, slice(start, stop), slice(None))
        return layout.decode(checked_read(arr, layout.GRADS, sel, self.path), self.dtype)

    def read_factors(
        self, start: int = 0, stop: int | None = None
    ) -> list[tuple[layout.FactorArray, np.ndarray, np.ndarray | None]]:
        """Per factor layer of rows [start, stop): (layout, float32 values (checkpoint, rows, positions,
        width), int64 token ids (rows, positions) for an Embedding or None)."""
        stop = self.n_examples if stop is None else stop
        out = []
        for f in self.factor_arrays:
            sel = (slice(None), slice(start, stop), slice(None), slice(None))
            values = layout.decode(checked_read(self._array(f.name), f.name, sel, self.path), self.dtype)
            ids = None
            if f.tokens_name is not None:
                ids = np.asarray(
                    checked_read(
                        self._array(f.tokens_name), f.tokens_name, (slice(start, stop), slice(None)), self.path
                    ),
                    dtype=np.int64,
                )
            out.append((f, values, ids))
        return out

    def read_losses(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        sel = (slice(None), slice(start, stop))
        return np.asarray(checked_read(self._array(layout.LOSS), layout.LOSS, sel, self.path), dtype=np.float32)

    def example_ids(self) -> np.ndarray:
        return np.asarray(self._array(layout.EXAMPLE)[:])

    def labels(self, rows: np.ndarray | None = None) -> np.ndarray | None:
        """The labels of every row, or of ``rows`` (any shape of row indices; only their chunks are read)."""
        if not self.has_labels:
            return None
        array = self._array(layout.LABEL)
        if rows is None:
            return np.asarray(array[:])
        rows = np.asarray(rows, dtype=np.int64)
        wanted, where = np.unique(rows, return_inverse=True)
        got = np.asarray(array.get_orthogonal_selection(wanted)) if wanted.size else np.empty(0, array.dtype)
        return got[where].reshape(rows.shape)

    def to_xarray(self) -> xr.Dataset:
        """An ``xarray.Dataset`` of the whole store, lazily backed by dask (nothing is read)."""
        import xarray as xr

        ds: xr.Dataset = xr.open_zarr(
            backends.zarr_store(self.path, storage_options=self.storage_options, read_only=True),
            consolidated=False,
            chunks={},
        )
        ds = ds.drop_vars(layout.BLOCK_COMPLETE, errors="ignore")
        if self.dtype != "float32":  # reads are float32 whatever the storage dtype
            dtype = self.dtype
            for name in [layout.GRADS, *(f.name for f in self.factor_arrays)]:
                ds[name] = ds[name].copy(data=ds[name].data.map_blocks(layout.decode, dtype, dtype=np.float32))
        ds = ds.assign_coords(
            checkpoint=np.arange(self.n_checkpoints),
            checkpoint_name=("checkpoint", self.checkpoint_names),
        )
        ds = ds.set_coords([layout.LEARNING_RATE])
        ds.attrs = {
            "projection": self.spec.describe(),
            "fingerprint": self.fingerprint,
            "storage_dtype": self.dtype,
            "complete": self.complete,
            "path": self.path,
        }
        return ds

    # ---- writing --------------------------------------------------------------------------------
    def write_block(self, start: int, block: RowBlock) -> None:
        """Write one whole row block at ``start`` and then flag it written.

        ``block``: the rows (:class:`~trackin_ooc.store.rows.RowBlock`): features (C, rows, F), and where
        given their losses, labels, non-finite flags (examples stored as zeros because they were NaN/inf),
        exact squared gradient norms (written where the store keeps them) and, for a factor store, every
        one of its factor arrays for these rows.
        """
        grads, losses, labels, nonfinite = block.grads, block.losses, block.labels, block.nonfinite
        sq_norms, factors = block.sq_norms, block.factors
        self._writable()
        blocks = self.row_blocks()
        index = start // self.chunk_rows
        if start % self.chunk_rows or index >= len(blocks) or blocks[index][1] - start != grads.shape[1]:
            raise StoreError(f"row block at {start} with {grads.shape[1]} rows is not one of the store's row blocks")
        if grads.shape[0] != self.n_checkpoints or grads.shape[2] != self.feature_dim:
            raise StoreError(
                f"block of shape {grads.shape} does not fit a store of "
                f"({self.n_checkpoints}, {self.n_examples}, {self.feature_dim})"
            )
        stop = start + grads.shape[1]
        parts = self._factor_parts(factors or {}, grads.shape[1])
        arr = self._array(layout.GRADS)
        if self.feature_dim:
            arr[:, start:stop, :] = layout.encode(grads, self.dtype)
        for name, values in parts:
            if name.startswith(layout.TOKENS_PREFIX):
                self._array(name)[start:stop, :] = np.asarray(values, dtype=np.int64)
            else:
                self._array(name)[:, start:stop, :, :] = layout.encode(values, self.dtype)
        if losses is not None:
            self._array(layout.LOSS)[:, start:stop] = np.asarray(losses, dtype=np.float32)
        if labels is not None and self.has_labels:
            self._array(layout.LABEL)[start:stop] = labels
        if nonfinite is not None:
            self._array(layout.NONFINITE)[start:stop] = np.asarray(nonfinite, dtype=np.uint8)
        if sq_norms is not None and self.has_exact_norms:
            self._array(layout.GRAD_SQ_NORM)[:, start:stop] = np.asarray(sq_norms, dtype=np.float32)
        self._array(layout.BLOCK_COMPLETE)[index] = 1

    def _factor_parts(self, factors: dict[str, np.ndarray], rows: int) -> list[tuple[str, np.ndarray]]:
        """The factor arrays of one row block, checked against the layout: every one, each its shape."""
        want: dict[str, tuple[int, ...]] = {}
        for f in self.factor_arrays:
            want[f.name] = (self.n_checkpoints, rows, f.positions, f.width)
            if f.tokens_name is not None:
                want[f.tokens_name] = (rows, f.positions)
        if set(factors) != set(want):
            raise StoreError(f"row block has factor arrays {sorted(factors)}; the store's layout needs {sorted(want)}")
        for name, shape in want.items():
            if tuple(factors[name].shape) != shape:
                raise StoreError(f"{name} block of shape {tuple(factors[name].shape)} does not fit the layout {shape}")
        return [(name, factors[name]) for name in want]

    def mark_complete(self) -> GradientStore:
        """Seal the store once every block is written (the last write of a capture)."""
        done = self.blocks_done()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise IncompleteStoreError(
                f"cannot mark {self.path} complete: {len(missing)} row blocks unwritten "
                f"(first at row {int(missing[0]) * self.chunk_rows})"
            )
        self._seal(n_nonfinite=int(len(self.nonfinite_examples())))
        return self

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        width = f"{self.feature_dim} features"
        if self.has_factors:
            width = f"({self.feature_dim} flat features + {len(self.factor_arrays)} factor layers)"
        return (
            f"<GradientStore {self.path!r}: {self.n_checkpoints} checkpoints × {self.n_examples} examples × "
            f"{width}, {self.dtype}, {self.spec.describe()}, {state}>"
        )

    def _repr_html_(self) -> str:
        """A table of what the store holds, for Jupyter (metadata only; trackin_ooc.views.reprs)."""
        from ..views.reprs import store_html

        return store_html(self)


def store_kind(path: str | os.PathLike[str], *, storage_options: StorageOptions = None) -> str | None:
    """The kind of trackin-ooc output at ``path`` ("gradients", "influence", "table", "index"), or None
    when it holds no trackin-ooc group (reads metadata only)."""
    meta = guard.output_meta(path, storage_options)
    return None if meta is None else guard.meta_kind(meta)


def is_unfinished(path: str | os.PathLike[str], kind: str, *, storage_options: StorageOptions = None) -> bool:
    """Whether ``path`` holds a ``kind`` output ("gradients" or "influence") that a killed or failed run
    left incomplete: rerunning the same job resumes it."""
    meta = guard.output_meta(path, storage_options)
    return meta is not None and guard.meta_kind(meta) == kind and not meta.get("complete", False)


def existing_store(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> GradientStore | None:
    """The incomplete gradient store at ``path`` that a capture may resume, None when nothing is there.

    Raises :class:`StoreExistsError` for anything else at ``path`` (a complete store, another file).
    """
    if not backends.exists(path, storage_options):
        return None
    where = backends.normalize_path(path)
    if store_kind(path, storage_options=storage_options) != "gradients":
        raise StoreExistsError(
            f"gradient store {where} already exists and is not a gradient store a capture can resume; "
            "pass overwrite=True (--overwrite) to replace it, or choose another path"
        )
    try:
        store = GradientStore(path, storage_options=storage_options)
    except StoreError as e:
        raise StoreExistsError(f"{e}; or pass overwrite=True (--overwrite) to replace it") from None
    if store.complete:
        raise StoreExistsError(
            f"gradient store {where} already exists and is complete; pass overwrite=True (--overwrite) "
            "to replace it, or choose another path"
        )
    return store


# What the scoring functions take for a store: an open one, or its path or URL.
StoreLike = GradientStore | str | os.PathLike[str]


def open_store(
    path: str | os.PathLike[str] | GradientStore, *, storage_options: StorageOptions = None
) -> GradientStore:
    """Open an existing gradient store (a local path or fsspec URL).

    Parameters
    ----------
    path : str, path or GradientStore
        The store (an open store is returned as it is).
    storage_options : dict, optional
        fsspec options for a remote store.

    Returns
    -------
    GradientStore

    Raises
    ------
    StoreError
        Nothing is at ``path``, or it is not a gradient store this version reads.
    """
    if isinstance(path, GradientStore):
        return path
    if not backends.is_remote(path) and not os.path.exists(backends.normalize_path(path)):
        raise StoreError(f"no gradient store at {backends.normalize_path(path)}: the path does not exist")
    return GradientStore(path, storage_options=storage_options)
