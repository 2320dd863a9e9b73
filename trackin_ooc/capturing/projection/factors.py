"""Exact gradients kept as per-layer factors (``projection="factors"``): the cost model, the spec, the featurizer.

For a Linear or Conv layer the per-example weight gradient is G = Σ_t δ_t a_tᵀ (a: the layer input at
position t with a 1 appended for the bias; δ: the gradient of the example's loss with respect to the
layer output there), so for two examples

    ⟨G, G'⟩ = Σ_{t,s} (a_t · a'_s)(δ_t · δ'_s)

exactly. Storing a and δ per position costs T·(d_in + d_out) values instead of d_in·d_out, and scoring
a pair costs T²·(d_in + d_out) multiply-adds instead of d_in·d_out. An Embedding stores token ids and δ
(a_t · a'_s = [id_t = id'_s]): T·(1 + d_out) values. A layer is stored as factors when both costs are
below the flat gradient's (:func:`prefer_factors`); everything else (layers with many positions,
normalisation parameters, shared parameters, anything without a factored form) is stored flat, as the
exact per-example gradient. The choice per layer is recorded in the spec (fingerprinted); the
positions per layer (the most any example of the dataset has) are the store's layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ...store.layout import FactorArray
from ..per_example import PerExampleGradients
from ..per_example.batches import Inputs, call_functional, call_model
from ..per_example.losses import LossFn, check_losses
from ..per_example.norms import dense_sq_norms, factored_sq_norms
from .factored import FactorLayer, layer_groups
from .featurizer import HookedFeaturizer
from .hooks import FactorTap
from .preconditioner import LayerScale, Scales

SPEC_KEY = "factors"
PLAN_VERSION = 1
STORE_FACTORS, STORE_FLAT = "factors", "flat"
# An exact (flat) capture whose layers would be this many times cheaper as factors says so in the log.
HINT_RATIO = 10.0


# ---- the cost model ------------------------------------------------------------------------------
def factor_costs(kind: str, d_in: int, d_out: int, positions: int) -> tuple[int, int]:
    """(values stored, multiply-adds per scored pair) of a layer kept as factors, per example and checkpoint."""
    side = 1 + d_out if kind == "embedding" else d_in + d_out
    return positions * side, positions * positions * side


def prefer_factors(kind: str, d_in: int, d_out: int, positions: int) -> bool:
    """Factors when both storing and scoring them cost less than the flat gradient's d_in·d_out."""
    if positions <= 0:  # never called: its gradient is zero, nothing to factor
        return False
    store, score = factor_costs(kind, d_in, d_out, positions)
    return store < d_in * d_out and score < d_in * d_out


@dataclass(frozen=True)
class LayerChoice:
    """One layer with a factored form and how it is stored: "factors" or "flat"."""

    kind: str
    module: str
    params: tuple[str, ...]
    d_in: int
    d_out: int
    store: str

    @property
    def has_bias(self) -> bool:
        return self.kind != "embedding" and len(self.params) == 2

    def tap_layer(self) -> FactorLayer:
        """The layer as the hooks see it (identity factors: nothing is projected)."""
        return FactorLayer(
            self.kind, self.module, self.params, self.d_in, self.d_out, self.d_in, self.d_out, self.d_in * self.d_out
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "module": self.module,
            "params": list(self.params),
            "d_in": self.d_in,
            "d_out": self.d_out,
            "store": self.store,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerChoice:
        return cls(
            str(d["kind"]), str(d["module"]), tuple(d["params"]), int(d["d_in"]), int(d["d_out"]), str(d["store"])
        )


@dataclass(frozen=True)
class FactorsPlan:
    """What a ``factors`` spec records: each candidate layer's choice and the parameters stored flat."""

    layers: tuple[LayerChoice, ...]
    flat: tuple[str, ...]

    @property
    def factored(self) -> tuple[LayerChoice, ...]:
        """The layers stored as factors, in store order (``factors_<i>`` is the i-th)."""
        return tuple(x for x in self.layers if x.store == STORE_FACTORS)


def candidate_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str, tuple[str, ...], int, int]]:
    """(kind, module, params, d_in, d_out) of every selected layer with a factored form (the factored
    projection's layer grouping: unshared Linear/Conv/Embedding weights, with their bias)."""
    return [g for g in layer_groups(model, names) if g[0] not in ("dense", "pad")]


# ---- positions per layer (a forward pass with the hooks on) ---------------------------------------
def probe_positions(
    model: nn.Module, candidates: Sequence[tuple], inputs: Iterable[tuple[Inputs, int]]
) -> dict[str, int]:
    """The most positions any example has at each candidate layer (summed over the layer's calls), from
    forward passes (no gradients) over ``inputs``: (model inputs, batch size) pairs."""
    modules = dict(model.named_modules())
    taps = [FactorTap(FactorLayer(k, m, p, di, do, di, do, di * do), modules[m]) for k, m, p, di, do in candidates]
    most = {t.layer.module: 0 for t in taps}
    try:
        for x, batch in inputs:
            for t in taps:
                t.calls.clear()
                t.batch = batch  # a tap expands outputs shared by the batch (position ids (1, T))
                t.active = True
            try:
                with torch.no_grad():
                    call_model(model, x)
            finally:
                for t in taps:
                    t.active = False
            for t in taps:  # a layer's output has its δ's shape: (B, T, d_out) once per example
                n = sum(int(_call_parts(t, a, o, batch)[1].shape[1]) for a, o in t.calls)
                most[t.layer.module] = max(most[t.layer.module], n)
                t.calls.clear()
    finally:
        for t in taps:
            t.handle.remove()
    return most


# ---- the spec ------------------------------------------------------------------------------------
def factors_spec(model: nn.Module, names: Sequence[str], positions: Mapping[str, int]) -> ProjectionSpec:
    """A ``factors`` spec: exact gradients of ``names``, each candidate layer's choice in ``extra``."""
    params = dict(model.named_parameters())
    layers = tuple((n, tuple(int(v) for v in params[n].shape)) for n in names)
    choices = []
    for kind, module, group, d_in, d_out in candidate_layers(model, names):
        store = STORE_FACTORS if prefer_factors(kind, d_in, d_out, int(positions.get(module, 0))) else STORE_FLAT
        choices.append(LayerChoice(kind, module, tuple(group), int(d_in), int(d_out), store))
    factored = {p for c in choices if c.store == STORE_FACTORS for p in c.params}
    flat = [n for n in names if n not in factored]
    extra = {"version": PLAN_VERSION, "layers": [c.to_dict() for c in choices], "flat": flat}
    return ProjectionSpec(
        kind="factors", dim=sum(math.prod(s) for _, s in layers), layers=layers, extra=((SPEC_KEY, extra),)
    )


def plan_from_spec(spec: ProjectionSpec) -> FactorsPlan:
    extra = dict(spec.extra).get(SPEC_KEY)
    if spec.kind != "factors" or not extra:
        raise CaptureError(f"{spec.describe()} is not a factors spec with per-layer choices")
    if extra.get("version") != PLAN_VERSION:
        raise CaptureError(
            f"factors plan version {extra.get('version')} is not the one this trackin-ooc makes "
            f"(version {PLAN_VERSION}); re-capture with this version"
        )
    return FactorsPlan(tuple(LayerChoice.from_dict(d) for d in extra["layers"]), tuple(extra["flat"]))


def flat_width(spec: ProjectionSpec) -> int:
    """Values of the flat part (the exact gradients of the parameters not stored as factors)."""
    shapes = dict(spec.layers)
    return sum(math.prod(shapes[n]) for n in plan_from_spec(spec).flat)


def factor_arrays(spec: ProjectionSpec, positions: Mapping[str, int]) -> list[FactorArray]:
    """The store layout of a ``factors`` spec: one factor array per layer stored as factors."""
    return [
        FactorArray(
            index=i,
            module=x.module,
            kind=x.kind,
            positions=int(positions[x.module]),
            d_in=x.d_in,
            d_out=x.d_out,
            tokens=x.kind == "embedding",
        )
        for i, x in enumerate(plan_from_spec(spec).factored)
    ]


def factors_hint(model: nn.Module, names: Sequence[str], positions: Mapping[str, int]) -> str | None:
    """One line for an exact (flat) capture whose layers would be ≥ HINT_RATIO× cheaper as factors, else None."""
    spec = factors_spec(model, names, positions)
    total = spec.dim
    store = score = flat_width(spec)
    for x in plan_from_spec(spec).factored:
        s, c = factor_costs(x.kind, x.d_in, x.d_out, int(positions[x.module]))
        store, score = store + s, score + c
    smaller, cheaper = total / max(store, 1), total / max(score, 1)
    if min(smaller, cheaper) < HINT_RATIO:
        return None
    n = len(plan_from_spec(spec).factored)
    return (
        f"exact capture: storing {n} of its layers as per-layer factors would make the store {smaller:.0f}x "
        f"smaller ({total:,} → {store:,} values per example and checkpoint) and scoring {cheaper:.0f}x cheaper, "
        "with the same exact scores: pass projection='factors' (--projection factors)"
    )


# ---- the featurizer ------------------------------------------------------------------------------
@dataclass
class FactorFeatures:
    """A batch's features at every checkpoint: the flat part (C, B, F) and each factor layer's rows
    (C, B, T, width) and token ids (B, T), by store array name."""

    flat: torch.Tensor
    values: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]

    def to_host(self):
        """(flat float32 numpy, {array name: numpy}) for the block writer."""
        parts = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in self.values.items()}
        parts.update({k: v.detach().to("cpu", torch.int64).numpy() for k, v in self.tokens.items()})
        return self.flat.detach().to("cpu", torch.float32).numpy(), parts


class FactorsFeatures(HookedFeaturizer):
    """Per-example exact gradients of a batch as per-layer factors plus a flat part, at each checkpoint.

    Forward hooks (:class:`~.hooks.FactorTap`) on the factor layers collect their inputs during one batched
    forward; one backward of the summed loss gives every δ (in eval mode examples do not interact).
    The flat part's per-example gradients come from :class:`PerExampleGradients` (with these taps off).
    With a preconditioner, a factor layer stores its scaled a and δ (rank-1 P^{1/2}, :mod:`.preconditioner`)
    and the flat part its elementwise-scaled gradients.
    """

    method = "factor hooks"

    def __init__(
        self,
        model: nn.Module,
        spec: ProjectionSpec,
        loss_fn: LossFn | None = None,
        device: torch.device | str = "cpu",
        methods: Mapping[str, str] | None = None,
    ):
        super().__init__(model, spec, loss_fn, device)
        self.plan = plan_from_spec(spec)
        modules = dict(model.named_modules())
        with self._opening():
            for x in self.plan.factored:
                self.taps.append(FactorTap(x.tap_layer(), modules[x.module]))
        self.choices = list(self.plan.factored)
        self._weights = [x.params[0] for x in self.choices]
        self._flat = None
        if self.plan.flat:  # per-example methods chosen before the capture ({name: method}), for the flat part
            chosen = {n: methods[n] for n in self.plan.flat if methods and n in methods}
            kw: dict[str, Any] = {"methods": chosen} if len(chosen) == len(self.plan.flat) else {}
            self._flat = PerExampleGradients(model, list(self.plan.flat), self.loss_fn, **kw)

    def to_host(self, features: FactorFeatures) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return features.to_host()

    def prepare(self, state: dict[str, torch.Tensor], scales: Scales | None = None):
        """Per checkpoint, once: (state whose factor-layer weights require grad, the plain state, the
        checkpoint's preconditioner scales or None)."""
        hooked = set(self._weights)
        return {k: (v.detach().requires_grad_(True) if k in hooked else v) for k, v in state.items()}, state, scales

    def __call__(self, states, inputs, targets: torch.Tensor) -> tuple[FactorFeatures, torch.Tensor, torch.Tensor]:
        """Features at every prepared checkpoint, losses (C, B) and exact squared gradient norms (C, B)."""
        n, batch = len(states), targets.shape[0]
        feats = FactorFeatures(torch.zeros(n, batch, 0, device=self.device), {}, {})
        losses = torch.empty(n, batch, dtype=torch.float32, device=self.device)
        sq = torch.zeros(n, batch, dtype=torch.float32, device=self.device)
        for c, prepared in enumerate(states):
            losses[c] = self.one(prepared, inputs, targets, c, n, feats, sq[c])
        for i, x in enumerate(self.choices):  # one position: ‖a‖²‖δ‖², every checkpoint at once
            v = feats.values[f"factors_{i}"]
            if x.kind != "embedding" and v.shape[2] == 1:
                a, d = v[:, :, 0, : x.d_in], v[:, :, 0, x.d_in :]
                sq += torch.einsum("cbk,cbk->cb", a, a) * torch.einsum("cbk,cbk->cb", d, d)
        return feats, losses, sq

    def one(
        self,
        prepared,
        inputs,
        targets: torch.Tensor,
        c: int,
        n_checkpoints: int,
        feats: FactorFeatures,
        sq: torch.Tensor,
    ) -> torch.Tensor:
        """Checkpoint ``c``: one batched forward and backward (plus the flat part's per-example gradients)
        written into ``feats`` (its arrays made at the first checkpoint) and the squared norms into ``sq``
        (B,); returns the losses (B,)."""
        state, plain, scales = prepared
        batch = targets.shape[0]
        for t in self.taps:
            t.calls.clear()
            t.batch = batch  # a tap expands outputs shared by the batch (position ids (1, T))
            t.active = True
        try:
            with torch.enable_grad():
                out = call_functional(self.model, state, inputs)
        finally:
            for t in self.taps:
                t.active = False
        losses = check_losses(self.loss_fn(out, targets), batch)
        outputs = [o for t in self.taps for _, o in t.calls]
        check = not self._checked and bool(outputs)
        wrt = outputs + ([state[w] for w in self._weights] if check else [])
        grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True) if wrt else ()
        if check:
            self._check_hooks(grads[: len(outputs)], grads[len(outputs) :])
        self._checked = True
        deltas = iter(grads[: len(outputs)])
        for i, (t, x) in enumerate(zip(self.taps, self.choices)):
            ins, outs = self._positions(t, x, deltas, batch, None if scales is None else scales.layers[x.module])
            t.calls.clear()
            name = f"factors_{i}"
            if c == 0:  # positions are known now: the batch's arrays at every checkpoint
                positions = sum(int(d.shape[1]) for d in outs)
                width = x.d_out if x.kind == "embedding" else x.d_in + x.d_out
                # every value is written below (each call's positions in turn), the bias's 1 here
                feats.values[name] = torch.empty(n_checkpoints, batch, positions, width, device=self.device)
                if x.has_bias:
                    feats.values[name][..., x.d_in - 1] = 1.0
                if x.kind == "embedding":
                    feats.tokens[f"tokens_{i}"] = (
                        torch.cat(ins, 1).to(torch.int64)
                        if ins
                        else torch.zeros(batch, 0, dtype=torch.int64, device=self.device)
                    )
            v = feats.values[name][c]
            start = 0
            for a, d in zip(ins, outs):  # each call's positions in turn: [a | 1 | δ] (δ alone for an Embedding)
                stop = start + d.shape[1]
                if x.kind == "embedding":
                    v[:, start:stop] = d
                else:
                    v[:, start:stop, : a.shape[-1]] = a
                    v[:, start:stop, x.d_in :] = d
                start = stop
            if ins and (x.kind == "embedding" or v.shape[1] != 1):  # one position: in __call__
                sq += factored_sq_norms(ins, outs, bias=x.has_bias, embedding=x.kind == "embedding")
        if self._flat is not None:
            g, _ = self._flat(plain, inputs, targets)
            if scales is not None:
                g = scales.apply(g)
            sq += dense_sq_norms({n: g[n] for n in self.plan.flat}, batch)
            flat = torch.cat([g[n].reshape(batch, -1).to(torch.float32) for n in self.plan.flat], dim=1)
            if c == 0:
                feats.flat = torch.empty(n_checkpoints, batch, flat.shape[1], device=self.device)
            feats.flat[c] = flat
        return losses.detach()

    @staticmethod
    def _positions(t: FactorTap, x: LayerChoice, deltas, batch: int, scale: LayerScale | None = None):
        """A layer's inputs (B, T, d) or token ids (B, T) and output gradients (B, T, d_out), per call (those
        of the preconditioned layer with ``scale``)."""
        ins, outs = [], []
        for a, o in t.calls:
            delta = next(deltas)
            unused = delta is None  # this call's output did not reach the loss: δ = 0
            x_in, d_out = _call_parts(t, a, torch.zeros_like(o) if unused else delta, batch, scale)
            ins.append(x_in if x.kind == "embedding" else x_in.to(torch.float32))
            outs.append(d_out.to(torch.float32))
        return ins, outs

    def _check_hooks(self, deltas, wgrads) -> None:
        """Once: each factor weight's batch gradient must equal Σ_examples Σ_t δ_t a_tᵀ, or the hooks miss
        a use of the weight (tied or functional uses) and the factors would not be the gradient."""
        it = iter(deltas)
        for t, x, wg in zip(self.taps, self.choices, wgrads):
            ins, outs = self._positions(t, x, it, t.batch)
            if not ins:
                continue
            d = torch.cat(outs, 1).reshape(-1, x.d_out)
            if x.kind == "embedding":
                ids = torch.cat(ins, 1).reshape(-1)
                have = torch.zeros(x.d_in, x.d_out, device=d.device).index_add_(0, ids, d)
                want = wg
            else:
                a = torch.cat(ins, 1).reshape(d.shape[0], -1)
                have = d.T @ a  # (d_out, d_in without bias)
                want = None if wg is None else _out_in(t.module, wg, x.d_out)
            want = torch.zeros_like(have) if want is None else want.to(torch.float32).reshape(have.shape)
            self._require_batch_gradient(
                have,
                want,
                f"projection='factors' does not see all of {x.params[0]!r}'s gradient (the weight is used "
                "outside its module's forward, or the layer's batch dimension is not first); leave it out "
                "of layers, or capture flat exact gradients (projection_dim=None without projection=)",
            )


def _call_parts(
    t: FactorTap, x: torch.Tensor, delta: torch.Tensor, batch: int, scale: LayerScale | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hooked call as (input rows (B, T, d_in without bias) or token ids (B, T), δ (B, T, d_out))."""
    c = t.call(x, delta, batch, scale)
    return c.rows(), c.delta


def _out_in(module: nn.Module, wg: torch.Tensor, d_out: int) -> torch.Tensor:
    """A weight gradient as (d_out, d_in): Hugging Face's ``Conv1D`` keeps its weight as (d_in, d_out)."""
    if type(module).__name__ == "Conv1D":
        return wg.reshape(-1, d_out).T
    return wg.reshape(d_out, -1)
