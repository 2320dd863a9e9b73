"""Scores as tables: self-influence and top-k results → pandas / xarray → .csv, .parquet or .zarr.

Tables carry example ids, scores, ranks (1 = strongest) and labels where the stores have them.
Writers follow the output rule of ``store.guard`` (never an input store, and ``overwrite=True``
replaces only an earlier table: a .csv/.parquet file, or a .zarr table marked with ``trackin_ooc``
attributes of kind "table"), and write local outputs to a hidden sibling first, so a failed or
killed write never leaves a half-written table, nor no table, under the real name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ._version import __version__
from .errors import OutputFormatError
from .store import GradientStore, open_store, replace
from .store.backends import is_remote, normalize_path
from .store.guard import check_output_location
from .store.layout import ATTRS_KEY

TABLE_FORMATS = (".csv", ".parquet", ".zarr")


def output_format(path: str | os.PathLike[str], allowed: tuple[str, ...] = TABLE_FORMATS) -> str:
    """The format of ``path`` from its extension (``.csv``, ``.parquet`` or ``.zarr``)."""
    suffix = Path(os.fspath(path).rstrip("/")).suffix.lower()
    if suffix not in allowed:
        given = f"'{suffix}'" if suffix else "no extension"
        raise OutputFormatError(
            f"cannot tell the output format of {os.fspath(path)} ({given}); end the name in "
            f"{', '.join(allowed[:-1]) + ' or ' + allowed[-1] if len(allowed) > 1 else allowed[0]}"
        )
    if suffix == ".parquet":
        _require_pyarrow()
    return suffix


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise OutputFormatError(
            "writing .parquet needs pyarrow: pip install 'trackin-ooc[io]' (or write .csv / .zarr)"
        ) from None


def check_output(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    allowed: tuple[str, ...] | None = TABLE_FORMATS,
    kind: str | None = None,
    inputs: Sequence[Any] = (),
    resumable: bool = False,
) -> str | None:
    """Fail early, before any work: unknown format, unwritable location, or the output rule of
    ``store.guard`` (an output on, in or around one of ``inputs``; an existing output without
    ``overwrite``; with it, anything but an earlier output of the same ``kind``).

    ``kind``: "table" by default; "gradients" when ``allowed=None`` (which accepts any name, as for a
    gradient store's folder) and returns None. ``resumable``: an unfinished output of ``kind`` is left
    for the writer to resume.
    """
    fmt = None if allowed is None else output_format(path, allowed)
    if kind is None:
        kind = "gradients" if allowed is None else "table"
    check_output_location(path, inputs, kind=kind, overwrite=overwrite, resumable=resumable)
    if not is_remote(path):
        parent = os.path.dirname(normalize_path(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OutputFormatError(f"cannot write {os.fspath(path)}: {parent} is a file, not a folder")
    return fmt


# ---- building tables ---------------------------------------------------------------------------
def _ranks_descending(values: np.ndarray) -> np.ndarray:
    """1 for the largest value; ties keep the lower position first."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def self_influence_dataset(si: xr.DataArray) -> xr.Dataset:
    """Self-influence with its rank (1 = most self-influential) per example, labels as a coordinate."""
    values = np.asarray(si.values)
    ds = xr.Dataset(
        {"self_influence": si.copy(data=values), "rank": ("example", _ranks_descending(values))},
        attrs={k: v for k, v in si.attrs.items() if isinstance(v, (str, int, float, bool))},
    )
    ds["rank"].attrs["description"] = "1 = highest self-influence (check these labels first)"
    return ds


def self_influence_frame(si: xr.DataArray) -> pd.DataFrame:
    """One row per example, most self-influential first: rank, example, label (if any), self_influence."""
    ds = self_influence_dataset(si)
    cols = {"rank": ds["rank"].values, "example": ds["example"].values}
    if "label" in ds.coords:
        cols["label"] = ds["label"].values
    cols["self_influence"] = ds["self_influence"].values
    return pd.DataFrame(cols).sort_values("rank", kind="stable").reset_index(drop=True)


def _as_store(store: Any) -> GradientStore | None:
    if store is None:
        return None
    return open_store(store)


def top_k_dataset(result: xr.Dataset, test: Any = None, train: Any = None) -> xr.Dataset:
    """A ``to.top_k`` result with train example ids, labels where the stores have them, ranks from 1.

    Adds ``proponent``/``opponent`` (train example ids), ``proponent_label``/``opponent_label`` and
    a ``test_label`` coordinate; keeps the scores and the train positions (``*_index``).
    """
    te, tr = _as_store(test), _as_store(train)
    ds = result.copy()
    k = ds.sizes["rank"]
    ds = ds.assign_coords(rank=np.arange(1, k + 1))
    ds["rank"].attrs["description"] = "1 = strongest proponent (highest score) / opponent (lowest score)"
    if tr is not None:
        ids = tr.example_ids()
        labels = tr.labels()
        for side in ("proponent", "opponent"):
            idx = np.asarray(ds[f"{side}_index"].values)
            ds[side] = (("test", "rank"), ids[idx])
            if labels is not None:
                ds[f"{side}_label"] = (("test", "rank"), labels[idx])
    if te is not None and te.has_labels:
        ds = ds.assign_coords(test_label=("test", te.labels()))
    return ds


def top_k_frame(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (test example, rank): the proponent and the opponent at that rank, with labels."""
    n_test, k = ds.sizes["test"], ds.sizes["rank"]
    cols: dict[str, np.ndarray] = {"test": np.repeat(ds["test"].values, k)}
    if "test_label" in ds.coords:
        cols["test_label"] = np.repeat(ds["test_label"].values, k)
    cols["rank"] = np.tile(ds["rank"].values, n_test)
    for side in ("proponent", "opponent"):
        key = side if side in ds else f"{side}_index"
        cols[side] = ds[key].values.reshape(-1)
        if f"{side}_label" in ds:
            cols[f"{side}_label"] = ds[f"{side}_label"].values.reshape(-1)
        cols[f"{side}_score"] = ds[f"{side}_score"].values.reshape(-1)
    return pd.DataFrame(cols)


# ---- writing -----------------------------------------------------------------------------------
def _write_local(obj: pd.DataFrame | xr.Dataset, fmt: str, target: str) -> None:
    if fmt == ".csv":
        _frame(obj).to_csv(target, index=False)
    elif fmt == ".parquet":
        _frame(obj).to_parquet(target, index=False, engine="pyarrow")
    else:
        with warnings.catch_warnings():  # zarr warns that consolidated metadata is not in the v3 spec
            warnings.simplefilter("ignore", category=UserWarning)
            _marked(_dataset(obj)).to_zarr(target, mode="w-", zarr_format=3, consolidated=True)


def _marked(ds: xr.Dataset) -> xr.Dataset:
    """The dataset with ``trackin_ooc`` attributes of kind "table", so that a later overwrite knows it."""
    ds = ds.copy()
    ds.attrs[ATTRS_KEY] = {"kind": "table", "complete": True, "package_version": __version__}
    return ds


def _frame(obj: Any) -> pd.DataFrame:
    if isinstance(obj, pd.DataFrame):
        return obj
    raise TypeError("a .csv or .parquet output needs a pandas DataFrame")


def _dataset(obj: Any) -> xr.Dataset:
    if isinstance(obj, xr.Dataset):
        return obj
    return xr.Dataset.from_dataframe(obj)


# ---- net influence --------------------------------------------------------------------------------
def net_influence_dataset(net: xr.DataArray) -> xr.Dataset:
    """Net influence with its rank (1 = most helpful) per train example (and group)."""
    values = np.asarray(net.values)
    order = np.argsort(-values, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(1, values.shape[-1] + 1), axis=-1)
    ds = xr.Dataset(
        {"net_influence": net.copy(data=values), "rank": (net.dims, rank)},
        attrs={k: v for k, v in net.attrs.items() if isinstance(v, (str, int, float, bool))},
    )
    ds["rank"].attrs["description"] = "1 = most helpful (highest net influence); the last ranks hurt most"
    return ds


def net_influence_frame(net: xr.DataArray) -> pd.DataFrame:
    """One row per train example (per group with ``by``), most helpful first: [test_label,] rank, train,
    label (if any), net_influence."""
    ds = net_influence_dataset(net)
    grouped = "group" in ds.dims
    n_groups = ds.sizes["group"] if grouped else 1
    n_train = ds.sizes["train"]
    cols: dict[str, np.ndarray] = {}
    if grouped:
        cols["test_label"] = np.repeat(ds["group"].values, n_train)
    cols["rank"] = ds["rank"].values.reshape(-1)
    cols["train"] = np.tile(ds["train"].values, n_groups)
    if "label" in ds.coords:
        cols["label"] = np.tile(ds["label"].values, n_groups)
    cols["net_influence"] = ds["net_influence"].values.reshape(-1)
    keys = ["test_label", "rank"] if grouped else ["rank"]
    return pd.DataFrame(cols).sort_values(keys, kind="stable").reset_index(drop=True)


def write(
    obj: pd.DataFrame | xr.Dataset, path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Sequence[Any] = ()
) -> str:
    """Write a table (.csv, .parquet) or dataset (.zarr) to ``path``; returns the normalized path.

    ``inputs``: the stores the table was computed from (never replaced, see :func:`check_output`).
    A local table is written under a hidden sibling name and then put in place of an earlier one
    (``store.replace``): killed at any point, the earlier table or the new one is there.
    """
    return _write_checked(obj, path, _check_table(path, overwrite, inputs), overwrite=overwrite)


def _check_table(path: str | os.PathLike[str], overwrite: bool, inputs: Sequence[Any]) -> str:
    """:func:`check_output` for a table: its format (one of TABLE_FORMATS, or OutputFormatError)."""
    fmt = check_output(path, overwrite=overwrite, inputs=inputs)
    if fmt is None:  # pragma: no cover - TABLE_FORMATS always gives one
        raise OutputFormatError(f"{os.fspath(path)} names no table format")
    return fmt


def _write_checked(obj: pd.DataFrame | xr.Dataset, path: str | os.PathLike[str], fmt: str, *, overwrite: bool) -> str:
    """Write ``obj`` where :func:`check_output` allowed it (the output rule is not applied again)."""
    if is_remote(path):
        if overwrite and _exists(path):
            from .store.backends import remove

            remove(path)
        _write_local(obj, fmt, os.fspath(path))
        return normalize_path(path)
    final = normalize_path(path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = replace.sibling(final, "tmp")
    try:
        _write_local(obj, fmt, tmp)
        replace.swap_into_place(tmp, final)
    finally:
        replace.remove(tmp)
    return final


def _exists(path: str | os.PathLike[str]) -> bool:
    if is_remote(path):
        from .store.backends import exists

        return exists(path)
    return os.path.lexists(normalize_path(path))


def write_self_influence(si: xr.DataArray, path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """``to.self_influence`` result → ``path`` (.csv/.parquet: rows sorted by rank; .zarr: a Dataset)."""
    inputs = [si.attrs.get("store")]
    fmt = _check_table(path, overwrite, inputs)
    obj = self_influence_dataset(si) if fmt == ".zarr" else self_influence_frame(si)
    return _write_checked(obj, path, fmt, overwrite=overwrite)


def write_top_k(
    result: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    test: Any = None,
    train: Any = None,
    overwrite: bool = False,
) -> str:
    """``to.top_k`` result → ``path``, with example ids and labels from the ``test``/``train`` stores."""
    inputs = [test, train, result.attrs.get("test_store"), result.attrs.get("train_store")]
    fmt = _check_table(path, overwrite, inputs)
    ds = top_k_dataset(result, test, train)
    return _write_checked(ds if fmt == ".zarr" else top_k_frame(ds), path, fmt, overwrite=overwrite)


def read(path: str | os.PathLike[str]) -> pd.DataFrame | xr.Dataset:
    """Read back what :func:`write` wrote: a DataFrame for .csv/.parquet, a Dataset for .zarr."""
    fmt = output_format(path)
    if fmt == ".csv":
        return pd.read_csv(path)
    if fmt == ".parquet":
        return pd.read_parquet(path)
    ds: xr.Dataset = xr.open_zarr(path, consolidated=True).load()
    return ds
