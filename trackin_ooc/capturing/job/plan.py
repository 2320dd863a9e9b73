"""What a capture will write, before it runs: ``plan_capture`` and the size line ``capture`` announces.

The size is that of the gradients as laid out (uncompressed): rows × checkpoints × features × dtype bytes,
plus the factor arrays of a ``factors`` store (``trackin_ooc.store.layout.gradient_bytes``), the same
number ``GradientStore.nbytes`` reports once the store exists.
"""

from __future__ import annotations

import html
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import ArgumentError, CaptureError
from ...progress import progress_enabled
from ...spec import ProjectionSpec
from ...store.layout import STORAGE_DTYPES, FactorArray, gradient_bytes
from ...summary import human_bytes
from ..checkpoints import load_checkpoints
from ..per_example.layers import select_parameters
from ..projection.dense import make_spec
from ..projection.factored import factored_spec
from .data import as_loader, dataset_length
from .factor_layout import store_layout
from .methods import probe_batch
from .preconditioning import check_preconditioner, resolve_preconditioner, with_preconditioner

# The line a capture announces goes to this logger; with no handler on it, it is also printed on stderr
# when progress bars are on (a terminal, Jupyter). The CLI puts a handler on it and prints it itself.
plan_log = logging.getLogger("trackin_ooc.plan")

# capture() options that change nothing in a plan (accepted so that one dict of options serves both).
_NOT_PLANNED = ("loss_fn", "overwrite", "chunk_rows", "storage_options", "progress", "nonfinite", "client")


def estimate_line(
    n_examples: int,
    n_checkpoints: int,
    feature_dim: int,
    factors: Sequence[FactorArray],
    dtype: str,
    path: str | os.PathLike | None = None,
) -> str:
    """One line: the bytes a capture of this shape writes, and the product they come from."""
    nbytes = gradient_bytes(n_checkpoints, n_examples, feature_dim, factors, dtype)
    width = f"{feature_dim:,} features"
    if factors:
        values = feature_dim + sum(f.row_values for f in factors)
        width = (
            f"{values:,} values ({feature_dim:,} flat + {len(factors)} factor layer{'' if len(factors) == 1 else 's'})"
        )
    where = f" into {os.fspath(path)}" if path is not None else ""
    return (
        f"capture: about {human_bytes(nbytes)} of gradients to write{where} "
        f"({n_examples:,} examples × {n_checkpoints:,} checkpoints × {width}, {dtype})"
    )


def announce(line: str, progress: bool | None = None) -> None:
    """Log ``line`` on ``trackin_ooc.plan``; print it on stderr too when no handler shows it and bars are on."""
    plan_log.info(line)
    if not _listened() and progress_enabled(progress):
        print(line, file=sys.stderr, flush=True)


def _listened() -> bool:
    """Whether some handler shows INFO lines of ``trackin_ooc.plan`` (the CLI's, or a user's logging setup)."""
    if not plan_log.isEnabledFor(logging.INFO):
        return False
    logger: logging.Logger | None = plan_log
    while logger is not None:
        if any(h.level <= logging.INFO for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


@dataclass(frozen=True)
class LayerPlan:
    """One selected parameter: its shape and how the capture stores its gradient."""

    name: str
    shape: tuple[int, ...]
    stored_as: str  # "exact", "gaussian projection", "factored (linear, width 88)", "factors (conv2d)", "flat"

    @property
    def n_parameters(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


@dataclass(frozen=True)
class CapturePlan:
    """What ``capture`` with the same arguments will write: sizes, per-layer plan, checkpoints and learning
    rates. ``nbytes`` is the gradients' size as laid out (uncompressed)."""

    n_examples: int
    checkpoints: tuple[str, ...]
    learning_rates: tuple[float, ...]
    projection: str
    projection_dim: int | None
    seed: int | None
    dtype: str
    feature_dim: int
    layers: tuple[LayerPlan, ...]
    factors: tuple[FactorArray, ...] = ()
    preconditioner: str = "none"
    spec: ProjectionSpec | None = field(default=None, repr=False, compare=False)

    @property
    def n_checkpoints(self) -> int:
        return len(self.checkpoints)

    @property
    def nbytes(self) -> int:
        return gradient_bytes(self.n_checkpoints, self.n_examples, self.feature_dim, self.factors, self.dtype)

    @property
    def n_parameters(self) -> int:
        return sum(x.n_parameters for x in self.layers)

    def describe(self) -> str:
        """The one-line estimate ``capture`` prints before it starts."""
        return estimate_line(self.n_examples, self.n_checkpoints, self.feature_dim, self.factors, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, and the estimate."""
        return {
            "n_examples": self.n_examples,
            "n_checkpoints": self.n_checkpoints,
            "checkpoints": list(self.checkpoints),
            "learning_rates": list(self.learning_rates),
            "projection": self.projection,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
            "preconditioner": self.preconditioner,
            "dtype": self.dtype,
            "feature_dim": self.feature_dim,
            "n_parameters": self.n_parameters,
            "nbytes": self.nbytes,
            "size": human_bytes(self.nbytes),
            "layers": [
                {"name": x.name, "shape": list(x.shape), "parameters": x.n_parameters, "stored_as": x.stored_as}
                for x in self.layers
            ],
            "factors": [f.to_dict() for f in self.factors],
        }

    def _rows(self) -> list[tuple[str, str]]:
        how = self.projection if self.projection_dim is not None else "exact"
        if self.projection == "factors":
            how = "exact, per-layer factors where cheaper"
        elif self.projection_dim is not None:
            how = f"{self.projection} to {self.projection_dim:,} dims (seed {self.seed})"
        return [
            ("size", f"about {human_bytes(self.nbytes)} of gradients (uncompressed)"),
            ("examples", f"{self.n_examples:,}"),
            ("checkpoints", ", ".join(f"{c} (lr {lr:g})" for c, lr in zip(self.checkpoints, self.learning_rates))),
            ("projection", how),
            ("preconditioner", self.preconditioner),
            (
                "features",
                f"{self.feature_dim:,} per example and checkpoint"
                + (
                    f" + {len(self.factors)} factor layer{'' if len(self.factors) == 1 else 's'}"
                    if self.factors
                    else ""
                ),
            ),
            ("dtype", self.dtype),
            ("parameters", f"{self.n_parameters:,} in {len(self.layers)} tensors"),
        ]

    def __repr__(self) -> str:
        lines = [f"<CapturePlan: {self.describe()}>"]
        lines += [f"  {k:<15}{v}" for k, v in self._rows()]
        lines.append("  layers:")
        lines += [f"    {x.name:<32}{'×'.join(map(str, x.shape)) or 'scalar':<16}{x.stored_as}" for x in self.layers]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        try:  # the shared table style of the package's views, where that module exists
            from ...views.reprs import plan_table_html
        except ImportError:  # pragma: no cover - a build without the views
            return plan_html(self)
        # The summary as text entries (listed above the table), then one row per parameter.
        return plan_table_html({**dict(self._rows()), "layers": self.to_dict()["layers"]})


def plan_html(plan: CapturePlan) -> str:
    """A plain HTML table of a plan (every value escaped)."""
    e = html.escape
    head = "".join(
        f"<tr><th style='text-align:left'>{e(k)}</th><td style='text-align:left'>{e(v)}</td></tr>"
        for k, v in plan._rows()
    )
    layers = "".join(
        f"<tr><td>{e(x.name)}</td><td>{e('×'.join(map(str, x.shape)))}</td>"
        f"<td style='text-align:right'>{x.n_parameters:,}</td><td>{e(x.stored_as)}</td></tr>"
        for x in plan.layers
    )
    return (
        f"<div><b>CapturePlan</b>: {e(plan.describe())}<table>{head}</table>"
        "<table><tr><th>parameter</th><th>shape</th><th>values</th><th>stored as</th></tr>"
        f"{layers}</table></div>"
    )


def _stored_as(spec: ProjectionSpec, projection_dim: int | None) -> dict[str, str]:
    """How each parameter's gradient is stored, by parameter name."""
    names = [n for n, _ in spec.layers]
    extra = dict(spec.extra)
    if spec.kind == "factored":
        out = {}
        for layer in (extra.get("factored") or {}).get("layers", []):
            what = (
                f"factored ({layer['kind']}, width {layer['width']})"
                if layer.get("kind") != "dense"
                else f"dense projection (width {layer.get('width')})"
            )
            if layer.get("mix"):  # plan version 2: every layer maps into the shared dims
                what = (
                    f"factored ({layer['kind']}, {'dense map' if layer.get('method') == 'formed' else 'hashed'} "
                    f"into {layer['mix']})"
                )
            out.update({p: what for p in layer.get("params", [])})
        return {n: out.get(n, "dense projection") for n in names}
    if spec.kind == "factors":
        plan = extra.get("factors") or {}
        out = {n: "exact, flat" for n in plan.get("flat", [])}
        for layer in plan.get("layers", []):
            if layer.get("store") == "factors":
                out.update({p: f"exact, as factors ({layer['kind']})" for p in layer.get("params", [])})
        return {n: out.get(n, "exact, flat") for n in names}
    if projection_dim is None:
        return {n: "exact" for n in names}
    return {n: f"{spec.kind} projection (all {len(names)} together)" for n in names}


def plan_capture(
    model: nn.Module,
    checkpoints,
    data,
    *,
    learning_rates: Sequence[float] | None = None,
    layers: Sequence[str] | str | None = None,
    projection_dim: int | None = None,
    projection: str = "gaussian",
    seed: int = 0,
    batch_size: int = 256,
    dtype: str = "float32",
    target_key: str = "labels",
    preconditioner: str | None = "auto",
    device: str | torch.device | None = "cpu",
    **options: Any,
) -> CapturePlan:
    """What ``to.capture(model, checkpoints, data, path, **the same options)`` would write, without writing.

    Reads the checkpoints (for their learning rates and to check they fit the model) and, for
    ``projection="factored"`` or ``"factors"``, runs the model on one batch (or every batch, for examples
    of varying shape) to count each layer's positions. Computes no gradients.

    Parameters
    ----------
    model, checkpoints, data
        As for :func:`trackin_ooc.capture`.
    learning_rates, layers, projection_dim, projection, seed, batch_size, dtype, target_key, preconditioner
        As for :func:`trackin_ooc.capture`.
    device : str or torch.device, optional
        Where the probe batch runs (``"cpu"`` by default).
    **options
        The other options of :func:`trackin_ooc.capture` (``loss_fn``, ``overwrite``, ``chunk_rows``, ...):
        accepted and ignored, since they change nothing in the plan.

    Returns
    -------
    CapturePlan
        ``nbytes`` (gradients as laid out), ``layers`` (per parameter: shape, how stored), ``checkpoints``,
        ``learning_rates``; a text repr and an HTML table in Jupyter.

    Raises
    ------
    ArgumentError
        An option ``capture`` does not take.
    CaptureError
        What ``capture`` would refuse before its first gradient: a bad dtype or projection, a checkpoint
        that does not fit, a missing learning rate, an unknown layer.
    """
    unknown = sorted(set(options) - set(_NOT_PLANNED))
    if unknown:
        raise ArgumentError(f"plan_capture() got unknown option(s) {', '.join(unknown)}; it takes capture()'s options")
    if dtype not in STORAGE_DTYPES:
        raise CaptureError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if projection == "factors" and projection_dim is not None:
        raise CaptureError("projection='factors' keeps gradients exact: leave projection_dim out (None)")
    preconditioner = check_preconditioner(preconditioner)
    names = select_parameters(model, layers)
    ckpts = load_checkpoints(
        model, checkpoints, learning_rates, moments_for=None if preconditioner == "none" else names
    )
    params = dict(model.named_parameters())
    loader = as_loader(data, batch_size)
    n = dataset_length(loader)
    dev = torch.device("cpu") if device in (None, "auto") else torch.device(device)
    if projection == "factored" and projection_dim is not None:
        example, _ = probe_batch(loader.dataset, loader.collate_fn, target_key, 1, torch.device("cpu"))
        spec = factored_spec(model, names, projection_dim, seed, example=example)
    else:
        spec = make_spec(projection, projection_dim, seed, [(n_, tuple(params[n_].shape)) for n_ in names])
    layout = store_layout(spec, projection, model, names, loader, dev, target_key)
    kind = resolve_preconditioner(preconditioner, ckpts, names)
    spec = with_preconditioner(layout.spec, kind, model)
    how = _stored_as(spec, projection_dim)
    return CapturePlan(
        n_examples=n,
        checkpoints=tuple(ck.name for ck in ckpts),
        learning_rates=tuple(float(ck.learning_rate) for ck in ckpts),
        projection=projection,
        projection_dim=projection_dim,
        seed=None if projection_dim is None else int(seed),
        dtype=dtype,
        feature_dim=layout.feature_dim,
        layers=tuple(LayerPlan(nm, tuple(shape), how[nm]) for nm, shape in spec.layers),
        factors=tuple(layout.factors),
        preconditioner=kind,
        spec=spec,
    )
