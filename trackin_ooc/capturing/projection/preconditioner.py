"""The square root of an Adam preconditioner applied to per-example gradients, before they are projected.

With P_c = diag(1 / (√v̂_c + ε)) from checkpoint c's bias-corrected second moments, every stored feature is
that of P_c^{1/2} g_c, so that influence = Σ_c η_c g'ᵀ P_c g and self-influence = Σ_c η_c gᵀ P_c g
(docs/preconditioning.md). Two forms of P^{1/2} per parameter:

- elementwise ("adam"): s = (√v̂ + ε)^{-1/2}, the parameter's gradient times s;
- rank-1 ("adafactor"), per layer: v̂ of the layer's weight (d_out × d_in, a Linear's bias its last input
  column: the layer's constant input 1) is replaced by its Adafactor factorisation r cᵀ / m (r, c: its row and
  column means, m its mean). ε does not factor through √v̂ + ε, so it is folded into the second moment
  first, as Adafactor folds its ε₁ into g²: the factorised moment is that of v̂ + ε²,

      P_ij = 1 / √((r_i + ε²)(c_j + ε²) / (m + ε²)),   P^{1/2}_ij = p_i q_j,
      p_i = (r_i + ε²)^{-1/4} (m + ε²)^{1/8},   q_j = (c_j + ε²)^{-1/4} (m + ε²)^{1/8}.

  On one entry √(x + ε²) lies between (√x + ε)/√2 and √x + ε; so where ε² is negligible beside the row and
  column means (any row and column that received gradients), P is 1/(√v̂₁ + ε) of the factorised moment
  v̂₁ = r cᵀ / m to within a factor in [1, √2], → 1 where √v̂₁ ≫ ε. A layer never updated (v̂ = 0) gets
  P = 1/ε, as the elementwise form does. It keeps the outer-product
  structure: a layer whose gradient is Σ_t δ_t a_tᵀ gets Σ_t (p ∘ δ_t)(q ∘ a_t)ᵀ, so the factored projection
  and ``factors`` stores scale a and δ. With a bias the bias column's q_b moves to the output side
  (a ∘ q / q_b, δ ∘ p q_b), which keeps the constant input 1. ε is the layer weight's.

Which parameters take which form is recorded in the spec (``preconditioner_layers``): under "adam" only the
layers the factored projection hooks, or a ``factors`` store keeps as factors; under "adafactor" every layer
with a factored form (its bias folded in as the factored projection does) and every other parameter of two
or more dimensions (as a matrix of its first dimension × the rest); one-dimensional parameters keep the
elementwise form (a vector's v̂ is its own rank-1 factorisation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ..checkpoints import Moments, ParamMoments

# Kind of a preconditioner layer that is a lone parameter of ≥ 2 dimensions (first dimension × the rest).
MATRIX = "matrix"


@dataclass(frozen=True)
class LayerScale:
    """A hooked layer's rank-1 P^{1/2}: ``inputs`` multiplies its inputs a (d_in without the bias; for an
    Embedding: per vocabulary row, applied to δ at each token), ``outputs`` its output gradients δ (d_out)."""

    inputs: torch.Tensor
    outputs: torch.Tensor

    def to(self, device: torch.device | str) -> LayerScale:
        return LayerScale(self.inputs.to(device), self.outputs.to(device))


@dataclass(frozen=True)
class KronScale:
    """A layer's K-FAC P^{1/2} = Q (Λ + λ)^{-1/2} Qᵀ, Q = Q_out ⊗ Q_in (``preconditioner="kfac"``,
    trackin_ooc.capturing.curvature): applied to its per-example gradient G (d_out × d_in: the weight's
    other dimensions flattened, the bias as the last input column) as Q_out [(Q_outᵀ G Q_in) ∘ R] Q_inᵀ."""

    params: tuple[str, ...]  # (weight,) or (weight, bias)
    q_out: torch.Tensor  # (d_out, d_out)
    q_in: torch.Tensor  # (d_in, d_in)
    inverse_root: torch.Tensor  # R = (Λ + λ)^{-1/2}, (d_out, d_in)

    def to(self, device: torch.device | str) -> KronScale:
        return KronScale(self.params, self.q_out.to(device), self.q_in.to(device), self.inverse_root.to(device))

    def apply(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = grads[self.params[0]].to(torch.float32)
        b, d_out = weight.shape[0], weight.shape[1]
        g = weight.reshape(b, d_out, -1)
        if len(self.params) == 2:
            g = torch.cat([g, grads[self.params[1]].to(torch.float32).reshape(b, d_out, 1)], dim=2)
        g = self.q_out @ (((self.q_out.T @ g @ self.q_in) * self.inverse_root) @ self.q_in.T)
        out = {self.params[0]: g[:, :, : weight[0].numel() // d_out].reshape(weight.shape)}
        if len(self.params) == 2:
            out[self.params[1]] = g[:, :, -1]
        return out


@dataclass(frozen=True)
class Scales:
    """P_c^{1/2} of one checkpoint: elementwise factors per parameter (its shape) for per-example gradients,
    the two factors of each hooked layer (by module name), and the K-FAC factors of each layer it
    preconditions as a whole (``kron``, by module name)."""

    params: dict[str, torch.Tensor]
    layers: dict[str, LayerScale]
    kron: dict[str, KronScale] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Scales:
        return Scales(
            {n: s.to(device) for n, s in self.params.items()},
            {m: s.to(device) for m, s in self.layers.items()},
            {m: s.to(device) for m, s in self.kron.items()},
        )

    def apply(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example gradients {name: (B, *shape)} times P^{1/2} (float32), in the order given."""
        scaled = {n: g.to(torch.float32) * self.params[n] for n, g in grads.items() if n in self.params}
        for k in self.kron.values():
            scaled.update(k.apply(grads))
        return {n: scaled[n] for n in grads}


# ---- the two forms ---------------------------------------------------------------------------------
def elementwise(m: ParamMoments) -> torch.Tensor:
    """(√v̂ + ε)^{-1/2}, the parameter's shape."""
    return torch.rsqrt(m.v_hat.to(torch.float64).sqrt() + m.eps).to(torch.float32)


def out_in(kind: str, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (d_out, d_in) the way the factored layers see it (inputs as columns)."""
    if kind in ("hf_conv1d", "embedding"):  # stored (in, out) and (vocabulary, width)
        return t.T
    return t.reshape(t.shape[0], -1)


def from_out_in(kind: str, m: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`out_in`."""
    if kind in ("hf_conv1d", "embedding"):
        return m.T.contiguous()
    return m.reshape(tuple(shape))


def rank1_factors(
    kind: str, params: Sequence[str], moments: Mapping[str, ParamMoments]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p (d_out,), q (d_in,)) with P^{1/2}_ij = p_i q_j for a layer's weight (and bias, the last column of q)."""
    weight = moments[params[0]]
    cols = [out_in(kind, weight.v_hat.to(torch.float64))]
    if len(params) == 2:
        cols.append(moments[params[1]].v_hat.to(torch.float64).reshape(-1, 1))
    v = torch.cat(cols, dim=1) if len(cols) == 2 else cols[0]
    tiny = float(weight.eps) ** 2  # ε folded into the moment: the factorisation of v̂ + ε²
    r, c, mean = v.mean(1) + tiny, v.mean(0) + tiny, v.mean() + tiny
    root = mean.pow(0.125)
    return (r.pow(-0.25) * root).to(torch.float32), (c.pow(-0.25) * root).to(torch.float32)


# ---- which parameters take which form ----------------------------------------------------------------
def hooked_layers(spec: ProjectionSpec) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, module, params) of the layers whose per-example gradients a spec's featurizer never forms
    (the factored projection's hooked layers; a factors store's layers kept as factors)."""
    if spec.kind == "factored":
        from .factored import HOOKED_KINDS, plan_from_spec

        return [(x.kind, x.module, tuple(x.params)) for x in plan_from_spec(spec) if x.kind in HOOKED_KINDS]
    if spec.kind == "factors":
        from .factors import plan_from_spec as factors_plan

        return [(x.kind, x.module, tuple(x.params)) for x in factors_plan(spec).factored]
    return []


def preconditioner_layers(
    preconditioner: str, spec: ProjectionSpec, model: nn.Module
) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """The layers whose v̂ takes the rank-1 form for ``preconditioner`` ("adam" or "adafactor") on ``spec``."""
    from .factored import layer_groups

    layers = hooked_layers(spec)
    if preconditioner == "adafactor":
        taken = {p for _, _, params in layers for p in params}
        rest = [n for n, _ in spec.layers if n not in taken]
        shapes = dict(spec.layers)
        for kind, module, params, _, _ in layer_groups(model, rest):
            if kind in ("dense", "pad"):
                layers += [(MATRIX, n, (n,)) for n in params if len(shapes[n]) >= 2]
            else:
                layers.append((kind, module, tuple(params)))
    return tuple(layers)


def preconditioner_scales(spec: ProjectionSpec, moments: Moments, device: torch.device | str = "cpu") -> Scales:
    """P^{1/2} of one checkpoint for ``spec`` (a preconditioned spec), on ``device``."""
    if spec.preconditioner == "none":
        raise CaptureError("a spec without a preconditioner has no preconditioner scales")
    have = moments.params
    missing = [n for n, _ in spec.layers if n not in have]
    if missing:
        raise CaptureError(
            f"the moments read from {moments.where} lack parameter {missing[0]}; "
            "re-capture, or pass preconditioner=None (--preconditioner none)"
        )
    hooked = {module for _, module, _ in hooked_layers(spec)}
    shapes = dict(spec.layers)
    params: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerScale] = {}
    for kind, module, names in spec.preconditioner_layers:
        p, q = rank1_factors(kind, names, have)
        if kind != MATRIX and module in hooked:
            if len(names) == 2:  # the bias column's factor moves to the output side: the constant input stays 1
                layers[module] = LayerScale(q[:-1] / q[-1], p * q[-1])
            else:
                layers[module] = LayerScale(q, p)
            continue
        d_in = q.shape[0] - (len(names) == 2)
        params[names[0]] = from_out_in(kind, p[:, None] * q[None, :d_in], shapes[names[0]])
        if len(names) == 2:
            params[names[1]] = (p * q[-1]).reshape(shapes[names[1]])
    covered = {p for _, _, names in spec.preconditioner_layers for p in names}
    for n, _ in spec.layers:
        if n not in covered:
            params[n] = elementwise(have[n])
    return Scales(params, layers).to(device)


def kfac_scales(curvature, checkpoint: int, device: torch.device | str = "cpu") -> Scales:
    """P^{1/2} of checkpoint ``checkpoint`` (its index) from a fitted ``curvature`` (``preconditioner="kfac"``)."""
    kron = {}
    for m, layer in curvature.layers[checkpoint].items():
        kron[m] = KronScale(
            layer.params,
            layer.q_out.to(torch.float32),
            layer.q_in.to(torch.float32),
            layer.inverse_root(curvature.damping).to(torch.float32),
        )
    return Scales({}, {}, kron).to(device)
