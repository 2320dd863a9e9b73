"""Factored projection: the model's layers, the spec, and the per-layer feature math.

For a Linear, Conv2d or Hugging Face ``Conv1D`` layer the per-example weight gradient is
G = Σ_t δ_t a_tᵀ (a: the layer's input at position t with a constant 1 appended for the bias, δ: the
gradient of the example's loss with respect to the layer's output there); an Embedding's is
Σ_t e_{token_t} δ_tᵀ. The plan (:mod:`.factored_plan`) maps each layer's G to a wide vector (vec(G)
itself, or for a very large layer its outer-product projection P_inᵀ Gᵀ P_out) and hashes all wide vectors
into the k stored dims with one seeded sparse JL map: a fixed linear map of the gradient, data independent,
so stores captured separately agree. Here: which modules are factored (:func:`layer_groups`), the spec
(:func:`factored_spec`), the factor matrices and hash tables (:class:`Factors`), and the math that turns a
layer's inputs and output gradients, or its formed G, into its features. G is formed the cheap way for its
layer type (one batched product, a grouped convolution backward; :mod:`.calls`); an Embedding's δ_t is
added at its token's buckets without forming G. Parameters of other layer types (the dense group) have
their per-example gradients hashed the same way. The hooks that collect a and δ live in :mod:`.hooks`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ..per_example.batches import Inputs, call_model, to_device
from .dense import _CACHE, BLOCK_ELEMENTS, Projector, _BlockCache, block_seed, projection_matrix
from .factored_plan import (
    FACTOR_KIND,
    HOOKED_KINDS,
    PLAN_VERSION,
    SPARSITY,
    SPEC_KEY,
    FactorLayer,
    LayerGroup,
    describe_plan,
    plan_extra,
    plan_from_extra,
    plan_groups,
    stored_dim,
)

__all__ = [
    "FACTOR_KIND",
    "HOOKED_KINDS",
    "PLAN_VERSION",
    "SPEC_KEY",
    "FactorLayer",
    "Factors",
    "combine",
    "conv_positions",
    "dense_features",
    "describe_plan",
    "factor_kind",
    "factored_spec",
    "features_from_formed",
    "layer_groups",
    "plan_from_spec",
    "plan_layers",
    "project_gradients",
    "project_input",
    "project_output",
]


# ---- which layers are factored ------------------------------------------------------------------
def _join(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): y = x @ W + b with W of shape (in, out). Matched by class name
    and module, so transformers stays optional."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__.split(".")[0] == "transformers"


def factor_kind(module: nn.Module) -> str | None:
    """The factored kind of a module, or None when its parameters take the dense path.

    Exact types only: a subclass (say MultiheadAttention's out_proj) may use its weight outside its
    own forward, where the hooks would not see it.
    """
    t = type(module)
    if t is nn.Linear:
        return "linear"
    if t is nn.Conv2d and module.groups == 1:
        return "conv2d"
    if t is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq:
        return "embedding"
    if is_hf_conv1d(module):
        return "hf_conv1d"
    return None


def layer_groups(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str, tuple[str, ...], int, int]]:
    """(kind, module, params, d_in, d_out) per factored layer in model order, then the dense rest.

    A layer is factored when its weight is selected; its bias is folded in when selected too.
    A parameter shared by several modules is never factored (one module's hooks would miss the
    other's uses).
    """
    selected = list(names)
    chosen = set(selected)
    owners: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    params = dict(model.named_parameters())
    out: list[tuple[str, str, tuple[str, ...], int, int]] = []
    taken: set[str] = set()
    for mname, mod in model.named_modules():
        kind = factor_kind(mod)
        wname = _join(mname, "weight")
        if kind is None or wname not in chosen or owners.get(id(mod.weight), 0) != 1:
            continue
        group = [wname]
        bname = _join(mname, "bias")
        if kind != "embedding" and mod.bias is not None and bname in chosen and owners.get(id(mod.bias)) == 1:
            group.append(bname)
        w = params[wname]
        if kind == "embedding":
            d_in, d_out = w.shape[0], w.shape[1]
        elif kind == "hf_conv1d":
            d_in, d_out = w.shape[0] + (len(group) == 2), w.shape[1]
        else:
            d_in, d_out = math.prod(w.shape[1:]) + (len(group) == 2), w.shape[0]
        out.append((kind, mname, tuple(group), int(d_in), int(d_out)))
        taken.update(group)
    rest = tuple(n for n in selected if n not in taken)
    if rest:
        out.append(("dense", "", rest, 1, sum(math.prod(params[n].shape) for n in rest)))
    return out


def conv_positions(model: nn.Module, inputs: Inputs) -> dict[str, int]:
    """Output positions per example of every Conv2d, from one forward pass (no gradients) on ``inputs``.

    Only convolutions: their positions are fixed by the input resolution, so train and test stores
    agree. A sequence's length varies from batch to batch, so Linear-like layers are planned as if
    T = 1 (their computation still picks the cheaper way per batch; see the hooks).
    """
    found: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if factor_kind(mod) == "conv2d":

            def hook(m, args, out, name=name):
                if isinstance(out, torch.Tensor) and out.ndim == 4:
                    found[name] = max(found.get(name, 0), int(out.shape[2] * out.shape[3]))

            handles.append(mod.register_forward_hook(hook))
    if not handles:
        return found
    was_training = model.training
    first = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, inputs if first is None else to_device(inputs, first.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


# ---- spec ---------------------------------------------------------------------------------------
def plan_layers(
    model: nn.Module, names: Sequence[str], dim: int, positions: Mapping[str, int] | None = None
) -> list[FactorLayer]:
    """The factored plan (version 2) for the selected parameters of ``model`` at ``dim`` stored values.

    ``positions``: output positions per example by module name (:func:`conv_positions`); 1 for the rest.
    """
    positions = positions or {}
    groups = [
        LayerGroup(k, m, p, d_in, d_out, int(positions.get(m, 1)) if k != "dense" else 1)
        for k, m, p, d_in, d_out in layer_groups(model, names)
    ]
    return plan_groups(groups, int(dim))


def factored_spec(
    model: nn.Module,
    names: Sequence[str],
    dim: int,
    seed: int,
    *,
    positions: Mapping[str, int] | None = None,
    example: Inputs | None = None,
) -> ProjectionSpec:
    """A ``factored`` spec whose ``extra`` records the per-layer plan (so the fingerprint covers it).

    ``example``: the model inputs of one batch (a tensor, a tuple or a dict), run once to count each
    convolution's output positions, which size the blocks of a layer too large to hash whole
    (``positions`` gives them directly). Without either, every layer is planned as if it had one position.
    """
    if int(dim) <= 0:
        raise CaptureError(f"projection_dim must be a positive integer, got {dim}")
    if positions is None and example is not None:
        positions = conv_positions(model, example)
    params = dict(model.named_parameters())
    layers = tuple((n, tuple(int(v) for v in params[n].shape)) for n in names)
    plan = plan_layers(model, names, int(dim), positions)
    return ProjectionSpec(
        kind="factored",
        dim=stored_dim(plan),
        seed=int(seed),
        layers=layers,
        extra=((SPEC_KEY, plan_extra(plan, int(dim))),),
    )


def plan_from_spec(spec: ProjectionSpec) -> list[FactorLayer]:
    """The per-layer plan a factored spec records (plan versions 1 and 2)."""
    if spec.kind != "factored":
        raise CaptureError(f"{spec.describe()} is not a factored spec with a layer plan")
    return plan_from_extra(dict(spec.extra).get(SPEC_KEY), spec.describe())


# ---- factors, hash tables and per-layer features -------------------------------------------------
class Factors:
    """The Gaussian factor matrices and hash tables of a plan, generated once per process and device
    (cached)."""

    def __init__(self, seed: int | None, device: torch.device | str = "cpu", cache: _BlockCache | None = None):
        if seed is None:
            raise ValueError("a factored projection needs its seed (the spec records it)")
        self.seed = int(seed)
        self.device = torch.device(device)
        self.cache = cache

    def matrix(self, layer: FactorLayer, side: str) -> torch.Tensor | None:
        """``d × n`` factor (n = k·blocks, scaled by 1/√n) for side "in" or "out"; None for the identity.

        Side "formed": the D × width dense map of a formed layer (version-1 plans; rows in the order of
        vec(G), G as d_in × d_out).
        """
        if side == "formed":
            return projection_matrix(
                FACTOR_KIND,
                self.seed,
                f"{layer.weight}#formed",
                layer.exact_width,
                layer.width,
                self.device,
                self.cache,
            )
        if layer.in_identity if side == "in" else layer.out_identity:
            return None
        d, k = (layer.d_in, layer.n_in) if side == "in" else (layer.d_out, layer.n_out)
        return projection_matrix(FACTOR_KIND, self.seed, f"{layer.weight}#{side}", d, k, self.device, self.cache)

    def buckets(self, layer: FactorLayer) -> torch.Tensor:
        """The sparse JL table of a hashed layer, (SPARSITY, width) int64 in [0, 2·mix): each wide value is
        added at SPARSITY buckets ``b mod mix``, with sign + below ``mix`` and − from it (and 1/√SPARSITY).
        Seeded per layer (the weight's name) and row, in blocks of the dense generator's size, so it depends
        only on (seed, name, width, mix)."""
        width, mix = layer.width, layer.mix
        cache = _CACHE if self.cache is None else self.cache

        def make() -> torch.Tensor:
            rows = []
            for r in range(SPARSITY):
                parts = []
                for block, start in enumerate(range(0, width, BLOCK_ELEMENTS)):
                    gen = torch.Generator(device="cpu").manual_seed(
                        block_seed(self.seed, f"{layer.weight}#mix{r}", block)
                    )
                    parts.append(torch.randint(0, 2 * mix, (min(BLOCK_ELEMENTS, width - start),), generator=gen))
                rows.append(torch.cat(parts))
            return torch.stack(rows).to(self.device)

        return cache.get(("mix", SPARSITY, self.seed, layer.weight, width, mix, str(self.device)), make)


def _signed(layer: FactorLayer, out: torch.Tensor) -> torch.Tensor:
    """(B, mix) from the (B, 2·mix) sums at positive and negative buckets."""
    return (out[:, : layer.mix] - out[:, layer.mix :]).mul_(1.0 / math.sqrt(SPARSITY))


def hash_values(layer: FactorLayer, wide: torch.Tensor, factors: Factors) -> torch.Tensor:
    """(B, mix): the sparse JL map of a hashed layer's wide values (B, width)."""
    b = wide.shape[0]
    wide = wide.to(torch.float32)
    out = torch.zeros(b, 2 * layer.mix, dtype=torch.float32, device=wide.device)
    for row in factors.buckets(layer):
        out.index_add_(1, row, wide)
    return _signed(layer, out)


def _hash_tokens(layer: FactorLayer, buckets: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B, mix): an Embedding's δ_t (B, T, d_out) added at its tokens' buckets (SPARSITY, B, T, d_out), G never
    formed."""
    b = delta.shape[0]
    d = delta.to(torch.float32).reshape(b, -1)
    out = torch.zeros(b, 2 * layer.mix, dtype=torch.float32, device=delta.device)
    for row in buckets:
        out.scatter_add_(1, row.reshape(b, -1), d)
    return _signed(layer, out)


def project_input(layer: FactorLayer, a: torch.Tensor, factors: Factors) -> torch.Tensor:
    """(B, T, k_in) input factor of a Linear/Conv2d/Conv1D input (B, T, I) (bias row appended) or of
    token ids (B, T) for an Embedding (for an Embedding hashed whole: its tokens' buckets, (B, T, d_out))."""
    if layer.kind == "embedding" and layer.hashed_whole:
        return factors.buckets(layer).view(-1, layer.d_in, layer.d_out)[:, a]
    p = factors.matrix(layer, "in")
    if layer.kind == "embedding":
        if p is None:
            return nn.functional.one_hot(a, layer.d_in).to(torch.float32)
        return p[a]
    a = a.to(torch.float32)
    if p is None:
        if layer.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a
    if layer.has_bias:
        return torch.matmul(a, p[:-1]).add_(p[-1])
    return torch.matmul(a, p)


def project_output(layer: FactorLayer, delta: torch.Tensor, factors: Factors) -> torch.Tensor:
    """(B, T, k_out) output factor of the output gradients (B, T, O)."""
    p = factors.matrix(layer, "out")
    delta = delta.to(torch.float32)
    return delta if p is None else torch.matmul(delta, p)


def combine(
    layer: FactorLayer, a_proj: torch.Tensor, d_proj: torch.Tensor, factors: Factors | None = None
) -> torch.Tensor:
    """Σ_t vec(a_t d_tᵀ) per example and block, the first ``width`` values, scaled: (B, width); for a
    hashed layer, those values hashed into the shared dims (B, mix)."""
    if layer.mix and layer.kind == "embedding" and layer.hashed_whole:
        return _hash_tokens(layer, a_proj, d_proj)
    b, t = a_proj.shape[:2]
    r = layer.blocks
    if r == 1:
        f = torch.bmm(a_proj.transpose(1, 2), d_proj).reshape(b, -1)
    elif layer.k_in == layer.k_out == 1:
        f = (a_proj * d_proj).sum(1) if t > 1 else (a_proj * d_proj).reshape(b, -1)
    else:
        a4 = a_proj.reshape(b, t, r, layer.k_in)
        d4 = d_proj.reshape(b, t, r, layer.k_out)
        f = torch.einsum("btri,btro->brio", a4, d4).reshape(b, -1)
    if layer.width < f.shape[1]:
        f = f[:, : layer.width]
    if layer.scale != 1.0:
        f = f * layer.scale
    return _mixed(layer, f, factors)


def _mixed(layer: FactorLayer, f: torch.Tensor, factors: Factors | None) -> torch.Tensor:
    if not layer.mix or layer.direct:
        return f
    if factors is None:
        raise CaptureError(f"layer {layer.module!r} is hashed into shared dims: its tables (Factors) are needed")
    return hash_values(layer, f, factors)


def features_from_formed(layer: FactorLayer, g: torch.Tensor, factors: Factors) -> torch.Tensor:
    """A layer's features from its per-example gradients G as (B, d_in, d_out): the same numbers as
    :func:`combine` of the projected factors (or the dense map of a formed layer); (B, out_width)."""
    b = g.shape[0]
    g = g.to(torch.float32)
    if layer.method == "formed":
        dense = factors.matrix(layer, "formed")
        assert dense is not None  # a formed layer always has its dense map
        return torch.matmul(g.reshape(b, -1), dense)
    p_in, p_out = factors.matrix(layer, "in"), factors.matrix(layer, "out")
    y = g if p_out is None else torch.matmul(g, p_out)  # (B, d_in, n_out)
    if p_in is None:
        f = y.reshape(b, -1)
    elif layer.k_in == layer.k_out == 1:  # 1×1 blocks: column j of P_in against column j of G P_out
        f = (y * p_in).sum(1)
    else:
        r = layer.blocks
        p4 = p_in.reshape(layer.d_in, r, layer.k_in)
        y4 = y.reshape(b, layer.d_in, r, layer.k_out)
        f = torch.einsum("dri,bdro->brio", p4, y4).reshape(b, -1)  # the diagonal blocks only
    f = f[:, : layer.width]
    f = f * layer.scale if layer.scale != 1.0 else f
    return _mixed(layer, f, factors)


def assemble(
    plan: Sequence[FactorLayer], parts: Sequence[torch.Tensor | None], batch: int, device: torch.device | str
) -> torch.Tensor:
    """The stored features (B, dim) from each plan entry's part (None: zeros): layers of their own
    concatenated in plan order, then the shared dims (the sum of every hashed layer's part)."""
    own, shared = [], None
    for x, part in zip(plan, parts):
        if part is None:
            part = torch.zeros(batch, x.out_width, device=device)
        if x.mix:
            shared = part.clone() if shared is None else shared.add_(part)
        else:
            own.append(part)
    if shared is not None:
        own.append(shared)
    return torch.cat(own, dim=1)


def gradient_matrix(layer: FactorLayer, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example gradients {name: (B, *shape)} of a hooked layer as G (B, d_in, d_out), bias row last
    (vocabulary rows for an Embedding)."""
    w = grads[layer.weight].to(torch.float32)
    b = w.shape[0]
    if layer.kind == "embedding":
        return w  # (B, V, E): rows are the vocabulary (input side)
    if layer.kind == "hf_conv1d":
        g = w  # (B, in, out)
        if layer.has_bias:
            g = torch.cat([g, grads[layer.params[1]].to(torch.float32).reshape(b, 1, layer.d_out)], dim=1)
        return g
    g = w.reshape(b, layer.d_out, -1)
    if layer.has_bias:
        g = torch.cat([g, grads[layer.params[1]].to(torch.float32).reshape(b, layer.d_out, 1)], dim=2)
    return g.transpose(1, 2)


def project_gradients(
    spec: ProjectionSpec,
    grads: Mapping[str, torch.Tensor],
    device: torch.device | str | None = None,
    cache: _BlockCache | None = None,
) -> torch.Tensor:
    """Factored features from exact per-example gradients {name: (B, *shape)}: (B, spec.dim).

    The reference path (tests, and models whose hooks cannot be used): the same linear map of the
    gradient as the hooks compute (each layer's wide vector, hashed into the shared dims).
    """
    plan = plan_from_spec(spec)
    first = next(iter(grads.values()))
    device = first.device if device is None else torch.device(device)
    factors = Factors(spec.seed, device, cache)
    b = first.shape[0]
    parts: list[torch.Tensor | None] = []
    for layer in plan:
        if layer.kind == "dense":
            parts.append(dense_features(spec, layer, grads, device, factors))
        elif layer.kind == "pad":
            parts.append(None)
        else:
            parts.append(features_from_formed(layer, gradient_matrix(layer, grads), factors))
    return assemble(plan, parts, b, device)


def dense_spec(spec: ProjectionSpec, layer: FactorLayer) -> ProjectionSpec:
    """The dense (or exact) sub-spec the fallback parameters are projected with."""
    shapes = dict(spec.layers)
    layers = tuple((n, shapes[n]) for n in layer.params)
    if layer.out_identity and not layer.direct:
        return ProjectionSpec(kind="exact", dim=layer.width, layers=layers)
    return ProjectionSpec(kind=FACTOR_KIND, dim=layer.width, seed=spec.seed, layers=layers)


def dense_features(
    spec: ProjectionSpec,
    layer: FactorLayer,
    grads: Mapping[str, torch.Tensor],
    device: torch.device,
    factors: Factors | None = None,
) -> torch.Tensor:
    """The dense group's features: its per-example gradients (concatenated in plan order) projected by its
    sub-spec, and for a hashed group hashed into the shared dims; (B, out_width)."""
    sub = dense_spec(spec, layer)
    f = Projector(sub, device=device)({n: grads[n] for n in layer.params})
    return _mixed(layer, f, factors if factors is not None else Factors(spec.seed, device))
