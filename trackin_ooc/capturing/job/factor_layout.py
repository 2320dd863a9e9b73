"""What a capture lays out for ``projection="factors"``: the per-layer choices and positions, from the data.

Positions per layer (tokens, pixels) come from forward passes over the data with the factor hooks on:
one batch when every example has the same shape (a ``TensorDataset``, or subsets of one, with the
default collate), else every batch, since examples of varying length are padded to the longest one
in the dataset (padded positions hold zeros and add nothing to any score). An exact (flat) capture
probes one batch and logs one line when its layers would be ≥ 10× cheaper as factors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ...store.layout import FACTOR_POSITIONS_ATTR, FactorArray
from ..per_example.batches import Inputs, split_batch, to_device
from ..projection import factors

log = logging.getLogger("trackin_ooc")


class StoreLayout(NamedTuple):
    """The spec a capture records, the width of its ``grads`` array and its factor arrays (if any)."""

    spec: ProjectionSpec
    feature_dim: int
    factors: tuple[FactorArray, ...] = ()
    attrs: dict | None = None  # store attributes: the positions probed per candidate layer

    @property
    def store_attrs(self) -> dict:
        return dict(self.attrs or {})


def fixed_shapes(loader: DataLoader) -> bool:
    """True when every example is known to have the same shape without reading them all."""
    if loader.collate_fn not in (None, default_collate) and not _is_default_collate(loader.collate_fn):
        return False
    ds = loader.dataset
    while isinstance(ds, Subset):
        ds = ds.dataset
    return isinstance(ds, TensorDataset)


def _is_default_collate(fn) -> bool:
    return getattr(fn, "__name__", "") == "default_collate" and getattr(fn, "__module__", "").startswith("torch.")


def _probe_batches(
    model: nn.Module, loader: DataLoader, device: torch.device, everything: bool, target_key: str
) -> Iterator[tuple[Inputs, int]]:
    """Model inputs (on ``device``) and batch sizes of the first or every batch; the model in eval mode
    meanwhile (as capture runs it: no dropout, no update of normalisation statistics)."""
    training = model.training
    model.eval()
    try:
        for item in loader:
            inputs, targets = split_batch(item, target_key)
            yield to_device(inputs, device), int(targets.shape[0])
            if not everything:
                return
    finally:
        model.train(training)


def _model_device(model: nn.Module, device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def store_layout(
    spec: ProjectionSpec,
    projection: str,
    model: nn.Module,
    names: Sequence[str],
    loader: DataLoader,
    device: torch.device | None,
    target_key: str = "labels",
) -> StoreLayout:
    """The layout of a capture's store: for ``projection="factors"`` the factors spec (replacing the exact
    ``spec``) and its factor arrays; otherwise ``spec`` as it is (an exact one may log a hint)."""
    if projection == "factors":
        if spec.kind != "exact":
            raise CaptureError("projection='factors' keeps gradients exact: leave projection_dim out (None)")
        dev = _model_device(model, device)
        model.to(dev)
        candidates = factors.candidate_layers(model, names)
        everything = not fixed_shapes(loader)
        batches = _probe_batches(model, loader, dev, everything, target_key)
        positions = factors.probe_positions(model, candidates, batches)
        spec = factors.factors_spec(model, names, positions)
        layout = tuple(factors.factor_arrays(spec, positions))
        log.info("projection='factors': %s", describe_choices(spec, positions))
        return StoreLayout(spec, factors.flat_width(spec), layout, {FACTOR_POSITIONS_ATTR: dict(positions)})
    if spec.kind == "exact":
        _log_factors_hint(model, names, loader, device, target_key)
    return StoreLayout(spec, spec.dim)


def describe_choices(spec: ProjectionSpec, positions) -> str:
    """One phrase per candidate layer: ``fc: factors (1 position)``, ``conv1: flat (36 positions)``."""
    plan = factors.plan_from_spec(spec)
    parts = [
        f"{x.module}: {x.store} ({positions.get(x.module, 0)} position{'' if positions.get(x.module, 0) == 1 else 's'})"
        for x in plan.layers
    ]
    if plan.flat:
        parts.append(f"{len(plan.flat)} parameter(s) flat")
    return "; ".join(parts) or "no layer with a factored form; every parameter flat"


def _log_factors_hint(model, names, loader, device, target_key) -> None:
    """Probe one batch; log one line if the exact capture would be ≥ 10× cheaper as factors."""
    try:
        dev = _model_device(model, device)
        candidates = factors.candidate_layers(model, names)
        if not candidates:
            return
        model.to(dev)
        positions = factors.probe_positions(model, candidates, _probe_batches(model, loader, dev, False, target_key))
        hint = factors.factors_hint(model, names, positions)
    except Exception as e:  # a hint only: the capture itself reports real problems
        log.debug("no factors hint: %s", e)
        return
    if hint:
        log.info("%s", hint)
