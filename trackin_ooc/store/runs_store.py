"""The retraining output: which training examples each retraining kept, and the test losses it produced.

A Zarr v3 group (``to.retrain(..., out=...)``) that ``xarray.open_zarr`` can read:

| array | dims | meaning |
|---|---|---|
| ``subset`` | (subset, train) | bool: train example kept in that retraining (written when the group is laid out) |
| ``seed`` | (subset,) | the seed that retraining was given |
| ``output`` | (subset, test) | its test losses (NaN until that retraining is done; made with the first one) |
| ``subset_complete`` | (subset,) | 1 once that retraining's row of ``output`` is written |

Group attributes under ``trackin_ooc``: kind ``"retraining"``, the parameters that fix the subsets
(``n_train``, ``n_subsets``, ``fraction``, ``seed``, ``subset_size``), ``n_test`` once known, the name of the
training function, and ``complete`` (true only once every retraining is written).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .._version import __version__
from ..errors import IncompleteStoreError, StoreError
from . import backends, guard, layout
from .backends import StorageOptions
from .group import ZarrGroup, create_group, short
from .integrity import checked_read

if TYPE_CHECKING:
    import xarray as xr

KIND = "retraining"
FORMAT_VERSION = 1
SUBSET, SEED, OUTPUT, SUBSET_COMPLETE = "subset", "seed", "output", "subset_complete"
TRAIN, TEST = "train", "test"
# Train columns per chunk of ``subset``: one chunk read serves one scoring block of train rows.
SUBSET_CHUNK_COLUMNS = 1 << 16
# What makes two retraining jobs the same one (a rerun resumes only the same job).
JOB_KEYS = ("n_train", "n_subsets", "fraction", "seed", "subset_size")


def job_difference(have: dict[str, Any], want: dict[str, Any]) -> str:
    """The parameters in which ``want`` differs from ``have``, as 'name=old (now new)'; '' when none."""
    parts = [f"{k}={have.get(k)!r} (now {want[k]!r})" for k in JOB_KEYS if k in want and have.get(k) != want[k]]
    return ", ".join(parts)


class RunsStore(ZarrGroup):
    """A retraining output on disk: laid out once, then one ``output`` row per finished retraining."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        storage_options: StorageOptions = None,
        group: zarr.Group | None = None,
        read_only: bool = False,
    ) -> None:
        super().__init__(path, storage_options=storage_options, group=group, read_only=read_only)

    def _missing(self, error: BaseException) -> str:
        return f"no retraining output at {self.path}: {short(error)}; give the out= of to.retrain"

    def _check_meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        if meta is None or guard.meta_kind(meta) != KIND:
            what = guard.kind_name(guard.meta_kind(meta)) if meta is not None else "not a trackin-ooc output"
            raise StoreError(f"{self.path} is not a retraining output ({what}); give the out= of to.retrain")
        return meta

    # ---- making one ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        job: dict[str, Any],
        subsets: np.ndarray,
        seeds: np.ndarray,
        train_fn: str,
        overwrite: bool = False,
        storage_options: StorageOptions = None,
    ) -> RunsStore:
        """Lay out an empty, unfinished output at ``path`` (the output rule applies; with ``overwrite`` an
        earlier retraining output is replaced, locally by exchanging it with the new layout in one rename)."""
        existing = guard.check_output_location(
            path, (), kind=KIND, overwrite=overwrite, storage_options=storage_options
        )
        group = guard.lay_out_output(
            path,
            existing,
            functools.partial(_lay_out, job=job, subsets=subsets, seeds=seeds, train_fn=train_fn),
            storage_options,
        )
        return cls(path, storage_options=storage_options, group=group)

    # ---- reading ---------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """The attributes as stored now (a rerun's writes included)."""
        return dict(self._read_meta() or {})

    @property
    def job(self) -> dict[str, Any]:
        meta = self.meta
        return {k: meta.get(k) for k in JOB_KEYS}

    @property
    def n_train(self) -> int:
        return int(self.meta["n_train"])

    @property
    def n_subsets(self) -> int:
        return int(self.meta["n_subsets"])

    @property
    def n_test(self) -> int | None:
        n = self.meta.get("n_test")
        return None if n is None else int(n)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    def done(self) -> np.ndarray:
        """bool (subset,): which retrainings are written."""
        return np.asarray(self._array(SUBSET_COMPLETE)[:]).astype(bool)

    def seeds(self) -> np.ndarray:
        return np.asarray(self._array(SEED)[:], dtype=np.int64)

    def subsets(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """bool (subset, train columns [start, stop))."""
        arr = self._array(SUBSET)
        return np.asarray(checked_read(arr, SUBSET, (slice(None), slice(start, stop)), self.path), dtype=bool)

    def outputs(self) -> np.ndarray:
        """float64 (subset, test); NaN rows for retrainings not yet done (empty before the first is)."""
        if OUTPUT not in self._array_names():
            return np.full((self.n_subsets, 0), np.nan)
        return np.asarray(
            checked_read(self._array(OUTPUT), OUTPUT, (slice(None), slice(None)), self.path), dtype=np.float64
        )

    def require_complete(self) -> RunsStore:
        if not self.complete:
            done = self.done()
            raise IncompleteStoreError(
                f"retraining output {self.path} is unfinished ({int(done.sum())} of {len(done)} retrainings "
                "done); rerun the same to.retrain(..., out=...) (or trackin-ooc retrain) to finish it"
            )
        return self

    def to_xarray(self) -> xr.Dataset:
        """The runs as an ``xarray.Dataset``: ``subset`` (subset, train), ``output`` (subset, test), ``seed``."""
        import xarray as xr

        meta = self.meta
        outputs = self.outputs()
        ds = xr.Dataset(
            {
                SUBSET: ((SUBSET, TRAIN), self.subsets()),
                OUTPUT: ((SUBSET, TEST), outputs),
                SEED: ((SUBSET,), self.seeds()),
            },
            attrs={k: v for k, v in meta.items() if k != "kind" and isinstance(v, (str, int, float, bool))},
        )
        ds.attrs["path"] = self.path
        ds[OUTPUT].attrs["description"] = "test losses of the model retrained on that subset"
        return ds

    # ---- writing ---------------------------------------------------------------------------------
    def write_output(self, index: int, losses: np.ndarray) -> None:
        """Write retraining ``index``'s test losses, then flag it done (a kill in between leaves it undone)."""
        losses = np.asarray(losses, dtype=np.float64)
        n_test = self.n_test
        if n_test is None:
            self._group.create_array(
                OUTPUT,
                shape=(self.n_subsets, len(losses)),
                chunks=(1, max(1, len(losses))),
                dtype="float64",
                compressors=layout.checksum_codecs(),
                dimension_names=[SUBSET, TEST],
                fill_value=np.nan,
            )
            self._set_meta(n_test=len(losses))
        elif n_test != len(losses):
            raise StoreError(
                f"retraining {index} returned {len(losses)} test losses and earlier ones in {self.path} returned "
                f"{n_test}; train_fn must return one loss per test example, the same test set every time"
            )
        self._array(OUTPUT)[index, :] = losses
        self._array(SUBSET_COMPLETE)[index] = 1

    def mark_complete(self) -> RunsStore:
        done = self.done()
        if not done.all():
            raise IncompleteStoreError(
                f"retraining output {self.path}: {int((~done).sum())} retrainings unwritten; rerun to finish it"
            )
        self._seal()
        return self


def _lay_out(
    path: str | os.PathLike[str],
    storage_options: StorageOptions,
    *,
    job: dict[str, Any],
    subsets: np.ndarray,
    seeds: np.ndarray,
    train_fn: str,
) -> zarr.Group:
    group = create_group(path, storage_options)
    codecs = layout.checksum_codecs()
    n_subsets, n_train = subsets.shape
    columns = max(1, min(n_train, SUBSET_CHUNK_COLUMNS))
    group.create_array(
        SUBSET,
        shape=subsets.shape,
        chunks=(max(1, n_subsets), columns),
        dtype="bool",
        compressors=codecs,
        dimension_names=[SUBSET, TRAIN],
    )[:] = subsets
    group.create_array(
        SEED,
        shape=(n_subsets,),
        chunks=(max(1, n_subsets),),
        dtype="int64",
        compressors=codecs,
        dimension_names=[SUBSET],
    )[:] = seeds
    group.create_array(
        SUBSET_COMPLETE,
        shape=(n_subsets,),
        chunks=(1,),
        dtype="uint8",
        compressors=codecs,
        dimension_names=[SUBSET],
        fill_value=0,
    )
    group.attrs[layout.ATTRS_KEY] = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "complete": False,
        "train_fn": train_fn,
        "n_test": None,
        **job,
    }
    return group


def open_runs_store(
    path: str | os.PathLike[str], *, storage_options: StorageOptions = None, read_only: bool = True
) -> RunsStore:
    """The retraining output at ``path`` (a one-line StoreError when there is none)."""
    if not backends.is_remote(path) and not os.path.exists(backends.normalize_path(path)):
        raise StoreError(f"no retraining output at {backends.normalize_path(path)}: the path does not exist")
    return RunsStore(path, storage_options=storage_options, read_only=read_only)
