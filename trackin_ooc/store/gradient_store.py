"""GradientStore: the one class that reads and writes the on-disk layout (docs/store-format.md)."""

from __future__ import annotations

import datetime as _dt
import os
import threading
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from .._version import __version__
from ..errors import IncompleteStoreError, StoreError
from ..spec import ProjectionSpec
from . import backends, guard, layout
from .backends import StorageOptions
from .integrity import BadChunk, checked_read, verify_group


class GradientStore:
    """A per-checkpoint matrix of per-example gradient features, in a Zarr v3 group.

    Open one with :func:`open_store`; make one with :func:`trackin_ooc.capture` or :func:`from_arrays`.
    Reading never loads more than the rows asked for.
    """

    def __init__(self, path: str | os.PathLike, *, storage_options: StorageOptions = None, _group=None):
        self.path = backends.normalize_path(path)
        self.storage_options = dict(storage_options or {})
        if _group is None:
            try:
                _group = zarr.open_group(
                    store=backends.zarr_store(path, storage_options=storage_options, read_only=True),
                    mode="r",
                    use_consolidated=False,
                )
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError) as e:
                raise StoreError(
                    f"no gradient store at {self.path}: {_short(e)}; give the path a capture wrote"
                ) from None
        self._group = _group
        attrs = dict(_group.attrs)
        if layout.ATTRS_KEY not in attrs:
            raise StoreError(
                f"{self.path} is a Zarr group but not a trackin-ooc gradient store (no '{layout.ATTRS_KEY}' "
                "attributes); give a store made by trackin_ooc.capture or from_arrays"
            )
        self._meta: dict[str, Any] = attrs[layout.ATTRS_KEY]
        if self._meta.get("kind", "gradients") != "gradients":
            raise StoreError(
                f"{self.path} is a trackin-ooc {self._meta.get('kind')} output, not a gradient store; "
                "give the path of a store made by capture or from_arrays"
            )
        version = self._meta.get("format_version")
        if version != layout.FORMAT_VERSION:
            raise StoreError(
                f"{self.path} has store format version {version}; this trackin-ooc reads version "
                f"{layout.FORMAT_VERSION}: re-capture it or use a matching trackin-ooc"
            )
        self._lock = threading.Lock()
        self._arrays: dict[str, zarr.Array] = {}

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        n_checkpoints: int,
        n_examples: int,
        spec: ProjectionSpec,
        learning_rates: Sequence[float],
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
    ) -> GradientStore:
        """Lay out an empty, incomplete store (every row block still to be written).

        ``with_norms``: also an array for the exact squared gradient norms a capture measures.
        """
        if n_examples <= 0:
            raise StoreError("a gradient store needs at least one example")
        if len(learning_rates) != n_checkpoints:
            raise StoreError(f"{len(learning_rates)} learning rates for {n_checkpoints} checkpoints")
        prepare_output(path, overwrite=overwrite, storage_options=storage_options, what="gradient store")
        on_disk = layout.on_disk_dtype(dtype)
        feature_dim = spec.dim
        rows = chunk_rows or layout.default_chunk_rows(feature_dim, n_checkpoints, dtype, n_examples)
        rows = max(1, min(int(rows), n_examples))
        n_blocks = len(layout.row_blocks(n_examples, rows))

        zstore = backends.zarr_store(path, storage_options=storage_options)
        group = zarr.open_group(store=zstore, mode="w", zarr_format=3)
        codecs = layout.checksum_codecs()

        def make(name, shape, chunks, dt, fill=0):
            return group.create_array(
                name, shape=shape, chunks=chunks, dtype=dt, compressors=codecs,
                dimension_names=list(layout.DIMS[name]), fill_value=fill,
            )

        grads = make(layout.GRADS, (n_checkpoints, n_examples, feature_dim), (1, rows, feature_dim), on_disk)
        if dtype == "bfloat16":
            grads.attrs["trackin_ooc_dtype"] = "bfloat16"  # raw bits; GradientStore decodes to float32
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
            "format_version": layout.FORMAT_VERSION,
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
            **(extra_attrs or {}),
        }
        group.attrs[layout.ATTRS_KEY] = meta
        return cls(path, storage_options=storage_options, _group=group)

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        """The store's ``trackin_ooc`` attributes (a copy)."""
        return dict(self._meta)

    @property
    def n_checkpoints(self) -> int:
        return int(self._meta["n_checkpoints"])

    @property
    def n_examples(self) -> int:
        return int(self._meta["n_examples"])

    @property
    def feature_dim(self) -> int:
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
    def complete(self) -> bool:
        return bool(self._meta.get("complete", False))

    @property
    def has_labels(self) -> bool:
        return layout.LABEL in self._array_names()

    @property
    def nbytes(self) -> int:
        """Bytes of the gradient matrix as stored (uncompressed)."""
        return self.n_checkpoints * self.n_examples * self.feature_dim * layout.itemsize(self.dtype)

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
        return np.asarray(checked_read(self._array(layout.GRAD_SQ_NORM), layout.GRAD_SQ_NORM, sel, self.path),
                          dtype=np.float32)

    def row_blocks(self) -> list[tuple[int, int]]:
        """The stored row blocks, [start, stop), one chunk of rows each."""
        return layout.row_blocks(self.n_examples, self.chunk_rows)

    def blocks_done(self) -> np.ndarray:
        """Boolean per row block: fully written (all checkpoints, losses and labels)."""
        return self._array(layout.BLOCK_COMPLETE)[:].astype(bool)

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

    def _array(self, name: str) -> zarr.Array:
        with self._lock:
            arr = self._arrays.get(name)
            if arr is None:
                arr = self._arrays[name] = self._group[name]
            return arr

    def read_grads(self, start: int = 0, stop: int | None = None, checkpoint: int | None = None) -> np.ndarray:
        """float32 gradient features of rows [start, stop): shape (checkpoint, rows, feature).

        With ``checkpoint`` given, one checkpoint's (rows, feature) block.
        """
        stop = self.n_examples if stop is None else stop
        arr = self._array(layout.GRADS)
        sel = (slice(None) if checkpoint is None else checkpoint, slice(start, stop), slice(None))
        return layout.decode(checked_read(arr, layout.GRADS, sel, self.path), self.dtype)

    def read_losses(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        sel = (slice(None), slice(start, stop))
        return np.asarray(checked_read(self._array(layout.LOSS), layout.LOSS, sel, self.path), dtype=np.float32)

    def example_ids(self) -> np.ndarray:
        return np.asarray(self._array(layout.EXAMPLE)[:])

    def labels(self) -> np.ndarray | None:
        return np.asarray(self._array(layout.LABEL)[:]) if self.has_labels else None

    def verify(self) -> list[BadChunk]:
        """Read every chunk of every array; return the ones failing their checksum (empty: intact)."""
        return verify_group(self._group)

    def to_xarray(self):
        """An ``xarray.Dataset`` of the whole store, lazily backed by dask (nothing is read)."""
        import xarray as xr

        ds = xr.open_zarr(
            backends.zarr_store(self.path, storage_options=self.storage_options, read_only=True),
            consolidated=False,
            chunks={},
        )
        ds = ds.drop_vars(layout.BLOCK_COMPLETE, errors="ignore")
        if self.dtype != "float32":  # reads are float32 whatever the storage dtype
            dtype = self.dtype
            ds[layout.GRADS] = ds[layout.GRADS].copy(
                data=ds[layout.GRADS].data.map_blocks(layout.decode, dtype, dtype=np.float32)
            )
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
    def _writable(self) -> zarr.Group:
        if self._group.read_only:
            self._group = zarr.open_group(
                store=backends.zarr_store(self.path, storage_options=self.storage_options),
                mode="r+",
                use_consolidated=False,
            )
            self._arrays.clear()
        return self._group

    def write_block(
        self,
        start: int,
        grads: np.ndarray,
        losses: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        nonfinite: np.ndarray | None = None,
        sq_norms: np.ndarray | None = None,
    ) -> None:
        """Write one whole row block (C, rows, F) at ``start`` and then flag it written.

        ``nonfinite``: per-row flags of examples stored as zeros because they were NaN/inf;
        ``sq_norms``: (C, rows) exact squared gradient norms, where the store keeps them.
        """
        self._writable()
        blocks = self.row_blocks()
        index = start // self.chunk_rows
        if start % self.chunk_rows or index >= len(blocks) or blocks[index][1] - start != grads.shape[1]:
            raise StoreError(
                f"row block at {start} with {grads.shape[1]} rows is not one of the store's row blocks"
            )
        if grads.shape[0] != self.n_checkpoints or grads.shape[2] != self.feature_dim:
            raise StoreError(
                f"block of shape {grads.shape} does not fit a store of "
                f"({self.n_checkpoints}, {self.n_examples}, {self.feature_dim})"
            )
        stop = start + grads.shape[1]
        arr = self._array(layout.GRADS)
        arr[:, start:stop, :] = layout.encode(grads, self.dtype)
        if losses is not None:
            self._array(layout.LOSS)[:, start:stop] = np.asarray(losses, dtype=np.float32)
        if labels is not None and self.has_labels:
            self._array(layout.LABEL)[start:stop] = labels
        if nonfinite is not None:
            self._array(layout.NONFINITE)[start:stop] = np.asarray(nonfinite, dtype=np.uint8)
        if sq_norms is not None and self.has_exact_norms:
            self._array(layout.GRAD_SQ_NORM)[:, start:stop] = np.asarray(sq_norms, dtype=np.float32)
        self._array(layout.BLOCK_COMPLETE)[index] = 1

    def mark_complete(self) -> GradientStore:
        """Seal the store once every block is written (the last write of a capture)."""
        group = self._writable()
        done = self.blocks_done()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise IncompleteStoreError(
                f"cannot mark {self.path} complete: {len(missing)} row blocks unwritten "
                f"(first at row {int(missing[0]) * self.chunk_rows})"
            )
        meta = dict(self._meta, complete=True, n_nonfinite=int(len(self.nonfinite_examples())))
        group.attrs[layout.ATTRS_KEY] = meta
        self._meta = meta
        _consolidate(group)
        return self

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return (
            f"<GradientStore {self.path!r}: {self.n_checkpoints} checkpoints × {self.n_examples} examples × "
            f"{self.feature_dim} features, {self.dtype}, {self.spec.describe()}, {state}>"
        )


def _consolidate(group: zarr.Group) -> None:
    """Consolidate metadata so plain ``xarray.open_zarr(path)`` opens quietly and in one read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(group.store)


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def prepare_output(
    path,
    *,
    overwrite: bool,
    storage_options: StorageOptions = None,
    what: str = "output",
    kind: str | None = None,
    inputs: Sequence = (),
):
    """Apply the output rule (``guard.check_output_location``), then remove what ``overwrite`` replaces.

    ``kind``: the kind of output about to be written ("gradients", "influence", ...; by default read
    from ``what``, e.g. "gradient store"); only an earlier output of that kind, an empty folder, or
    nothing is ever removed. Refuses an unwritable location.
    """
    backends.check_writable(path)
    if kind is None:
        kind = {name: k for k, name in guard.KIND_NAMES.items()}.get(what, what)
    existing = guard.check_output_location(path, inputs, kind=kind, overwrite=overwrite,
                                           storage_options=storage_options)
    if existing.exists:
        backends.remove(path, storage_options)


def store_kind(path: str | os.PathLike, *, storage_options: StorageOptions = None) -> str | None:
    """The kind of trackin-ooc output at ``path`` ("gradients", "influence", "table", "index"), or None
    when it holds no trackin-ooc group (reads metadata only)."""
    meta = guard.output_meta(path, storage_options)
    return None if meta is None else guard.meta_kind(meta)


def is_unfinished(path: str | os.PathLike, kind: str, *, storage_options: StorageOptions = None) -> bool:
    """Whether ``path`` holds a ``kind`` output ("gradients" or "influence") that a killed or failed run
    left incomplete: rerunning the same job resumes it."""
    meta = guard.output_meta(path, storage_options)
    return meta is not None and guard.meta_kind(meta) == kind and not meta.get("complete", False)


def open_store(
    path: str | os.PathLike | GradientStore, *, storage_options: StorageOptions = None
) -> GradientStore:
    """Open an existing gradient store (a local path or fsspec URL)."""
    if isinstance(path, GradientStore):
        return path
    if not backends.is_remote(path) and not os.path.exists(backends.normalize_path(path)):
        raise StoreError(f"no gradient store at {backends.normalize_path(path)}: the path does not exist")
    return GradientStore(path, storage_options=storage_options)
