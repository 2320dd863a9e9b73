"""Factored projection: the per-layer plan, the split of projection_dim, and the per-layer feature math.

For a Linear, Conv2d or Hugging Face ``Conv1D`` layer the per-example weight gradient is
G = Σ_t δ_t a_tᵀ (a: the layer's input at position t with a constant 1 appended for the bias, δ: the
gradient of the example's loss with respect to the layer's output there). With per-layer Gaussian
factors P_in (d_in × k_in) and P_out (d_out × k_out) the stored feature of the layer is

    vec(P_inᵀ Gᵀ P_out) = Σ_t vec((P_inᵀ a_t)(P_outᵀ δ_t)ᵀ)        (k_in × k_out values)

computed either per position (G is never formed) or, where positions are many and channels few (a
convolution at full resolution), from the formed G = Aᵀ Δ (T·d_in·d_out, what a weight gradient costs
anyway): whichever is cheaper for the batch at hand, the same numbers. An Embedding's gradient is
Σ_t e_{token_t} δ_tᵀ: its input factor is the gathered row P_in[token_t], and the vocabulary size
never enters the cost. A factor whose exact width fits its share is the identity (that side is
exact). A layer whose positions make forming G cheap may instead take the ``formed`` map: G projected
by a dense Gaussian matrix (the lowest variance for its width). Parameters of other layer types are
projected together with the dense generator of :mod:`.dense`.

Everything here that decides the feature space (the layer plan and the split) is a pure function of
the layers' kinds, shapes and (for convolutions) output positions, and is recorded in the spec, so the
fingerprint covers it. The hooks that collect a and δ during capture live in :mod:`.hooks`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ..per_example.batches import Inputs, call_model, to_device
from .costs import formed_cost, per_position_cost
from .dense import Projector, _BlockCache, projection_matrix

SPEC_KEY = "factored"
FACTOR_KIND = "gaussian"
PLAN_VERSION = 1
# How a layer's feature is defined: "factors" (P_inᵀ Gᵀ P_out in blocks) or "formed" (a dense Gaussian map of G).
METHODS = ("factors", "formed")
HOOKED_KINDS = ("linear", "conv2d", "hf_conv1d", "embedding")


@dataclass(frozen=True)
class FactorLayer:
    """One block of the factored feature vector: a hooked layer, or the dense group of the rest.

    ``kind`` is "linear", "conv2d", "hf_conv1d" (Hugging Face's ``Conv1D``, a Linear with its weight
    transposed), "embedding", "dense", or "pad" (zeros that fill the width up to projection_dim when no
    layer could use the last few dims without bias). ``d_in × d_out`` is the exact gradient's shape as
    the factors see it (input side incl. the bias row, or vocabulary; output side), and ``k_in × k_out``
    the factors' widths; ``k == d`` means that side is the identity. ``width`` is the number of stored
    values (at most ``k_in·k_out·blocks``: extra products are dropped, which keeps the estimate
    unbiased when both factors are random). ``method="formed"``: the feature is a dense Gaussian map
    (D × width) of the formed gradient; then ``k_in = k_out = 1`` and ``blocks = width``. The dense group has
    ``d_in = k_in = 1``, ``d_out`` = its parameter count and ``k_out = width``.
    """

    kind: str
    module: str
    params: tuple[str, ...]
    d_in: int
    d_out: int
    k_in: int
    k_out: int
    width: int
    blocks: int = 1
    method: str = "factors"

    @property
    def exact_width(self) -> int:
        return self.d_in * self.d_out

    @property
    def formed(self) -> bool:
        return self.method == "formed"

    @property
    def in_identity(self) -> bool:
        return not self.formed and self.k_in == self.d_in

    @property
    def out_identity(self) -> bool:
        return not self.formed and self.k_out == self.d_out

    @property
    def has_bias(self) -> bool:
        return self.kind in ("linear", "conv2d", "hf_conv1d") and len(self.params) == 2

    @property
    def weight(self) -> str:
        return self.params[0]

    @property
    def n_in(self) -> int:
        """Columns of the input factor matrix (all blocks)."""
        return self.k_in * self.blocks

    @property
    def n_out(self) -> int:
        return self.k_out * self.blocks

    @property
    def scale(self) -> float:
        """Keeps E⟨f, f'⟩ = ⟨G, G'⟩ for the products kept (the factors are scaled by 1/√n_in, 1/√n_out)."""
        if self.formed:
            return 1.0
        return math.sqrt(self.n_in * self.n_out / self.width)

    def cost(self, positions: int) -> tuple[float, float]:
        """Multiply-adds per example of this layer's features at ``positions``: (per position, formed)."""
        products = self.k_in * self.k_out * self.blocks
        per = math.inf if self.formed else per_position_cost(
            self.kind, self.d_in, self.d_out, self.n_in, self.n_out, products, self.in_identity,
            self.out_identity, positions)
        formed = formed_cost(self.kind, self.d_in, self.d_out, self.n_out, products, self.in_identity,
                             self.out_identity, positions, self.width if self.formed else 0)
        return per, formed

    def to_dict(self) -> dict:
        d = {
            "kind": self.kind, "module": self.module, "params": list(self.params),
            "d_in": self.d_in, "d_out": self.d_out, "k_in": self.k_in, "k_out": self.k_out,
            "width": self.width, "blocks": self.blocks,
        }
        if self.method != "factors":  # plans without formed layers keep their earlier fingerprint
            d["method"] = self.method
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> FactorLayer:
        method = str(d.get("method", "factors"))
        if method not in METHODS:
            raise CaptureError(f"factored plan layer {d.get('module')!r} has an unknown method {method!r}; "
                               "re-capture with this version of trackin-ooc")
        return cls(
            kind=str(d["kind"]), module=str(d["module"]), params=tuple(d["params"]),
            d_in=int(d["d_in"]), d_out=int(d["d_out"]), k_in=int(d["k_in"]), k_out=int(d["k_out"]),
            width=int(d["width"]), blocks=int(d.get("blocks", 1)), method=method,
        )


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


# ---- the split of projection_dim ----------------------------------------------------------------
# Cost allowance: a layer's features may cost up to BETA times its own forward and backward
# (3·T·d_in·d_out multiply-adds per example). Sets the block size and when a formed map is allowed.
BETA = 4.0
# Largest factor matrix (elements; 128 MiB of float32): bounds the memory of an Embedding's input
# factor (vocabulary × columns), of a formed layer's dense map (d_in·d_out × width), and of every
# factor; they are generated once and cached.
FACTOR_ELEMENTS = 1 << 25
# All formed layers' dense maps together (elements; 256 MiB of float32), so they stay in the block cache.
FORMED_ELEMENTS = 1 << 26
# A dense map of at most this many elements (1 MiB of float32) costs as many multiply-adds per example:
# negligible next to any forward pass, so a small layer takes it whatever its positions.
SMALL_MAP = 1 << 18
# Layers kept exact: as many of the smallest as keep the variance of the rest, were all layers' gradient
# norms equal, within 1 + EXACT_REGRET of its minimum (see ``exact_layers``).
EXACT_REGRET = 0.25
# Variance model of one random side, c = 1 + 1/cos² between examples' vectors (3 for cos² = ½).
_C = 3.0
_BLOCK_OVERRIDE: int | None = None  # experiments only (benchmarks/projection_quality.py)


def block_size(kind: str, d_in: int, d_out: int, share: int, positions: int = 1) -> int:
    """Side m of the m×m blocks of a layer with two random factors (see ``_factor_widths``).

    The estimate's variance grows with m (~(2m·c + c²)/share) while the cost of projecting one
    position, (d_in + d_out)·share/m, and the factors' memory, d·share/m, fall: m is the smallest
    block that keeps that cost within BETA × the layer's forward+backward and each factor within
    FACTOR_ELEMENTS, and at most √share (a single block, LoGra's choice). An embedding's input side
    is a row gather, so only d_out counts towards its cost. With T > 1 positions the features may
    instead come from the formed gradient (T·D + D·share/m), which allows smaller blocks.
    """
    if _BLOCK_OVERRIDE is not None:
        return max(1, min(_BLOCK_OVERRIDE, d_in - 1, d_out - 1))
    sides = d_out if kind == "embedding" else d_in + d_out
    by_cost = math.ceil(2 * sides * share / (BETA * 6 * d_in * d_out))
    if positions > 1 and kind != "embedding":
        by_cost = min(by_cost, math.ceil(share / ((3 * BETA - 1) * positions)))
    m = max(by_cost, math.ceil(max(d_in, d_out) * share / FACTOR_ELEMENTS))
    return max(1, min(m, math.isqrt(share), d_in - 1, d_out - 1))


def _formed_allowed(kind: str, d_in: int, d_out: int, width: int, positions: int, room: int) -> bool:
    """A dense map of the formed gradient: its matrix within FACTOR_ELEMENTS and ``room``, and its cost
    within the allowance at ``positions`` (forming G is then nearly free next to the layer's own
    work) or, whatever the positions, at most SMALL_MAP multiply-adds per example."""
    d = d_in * d_out
    if kind == "dense" or min(d_in, d_out) == 1 or width >= d or d * width > min(FACTOR_ELEMENTS, room):
        return False  # (with one side of width 1 its identity factor is as good)
    if d * width <= SMALL_MAP:
        return True
    if kind == "embedding" or positions <= 1:
        return False
    return positions * d + d * width <= 3 * BETA * positions * d


def _factor_widths(kind: str, d_in: int, d_out: int, share: int, positions: int = 1,
                   room: int = 0) -> tuple[int, int, int, int, str]:
    """(k_in, k_out, blocks, width, method) for one layer given ``share`` dims and an exact width above it.

    Candidates: an identity input factor (k_out = share // d_in random output columns), an identity
    output factor, two random factors in ``blocks`` m×m blocks (the first m·blocks columns of
    P_in pair with the same block of P_out; products beyond ``share`` are dropped, which keeps the
    estimate unbiased), or, for a layer with many positions, a dense map of the formed gradient
    (``_formed_allowed``). The choice minimises a variance model of the inner-product estimate,
    c/k for one random side of k columns (a dense map: c/share), (2c·m + c²)/share for blocks
    (c = 3), among the candidates whose matrices fit FACTOR_ELEMENTS (the smallest one if none does).
    """
    if kind == "dense":
        return 1, share, 1, share, "factors"
    c = _C
    # (variance, elements, k_in, k_out, blocks, width, method)
    options: list[tuple[float, int, int, int, int, int, str]] = []
    if d_in <= share:
        k_out = share // d_in
        options.append((c / k_out, d_out * k_out, d_in, k_out, 1, d_in * k_out, "factors"))
    if d_out <= share:
        k_in = share // d_out
        options.append((c / k_in, d_in * k_in, k_in, d_out, 1, k_in * d_out, "factors"))
    if d_in > 1 and d_out > 1:
        m = block_size(kind, d_in, d_out, share, positions)
        blocks = -(-share // (m * m))
        options.append(((2 * c * m + c * c) / share, max(d_in, d_out) * m * blocks, m, m, blocks, share, "factors"))
    if _formed_allowed(kind, d_in, d_out, share, positions, room):
        options.append((c / share, d_in * d_out * share, 1, 1, share, share, "formed"))
    if not options:  # pragma: no cover - a share below both widths always admits two random factors
        raise CaptureError(f"cannot split {share} dims over a {d_in}×{d_out} layer")
    fitting = [o for o in options if o[1] <= FACTOR_ELEMENTS] or [min(options, key=lambda o: o[1])]
    # Lowest variance first; between equals, the one that uses the whole share, then factors.
    return min(fitting, key=lambda o: (o[0], -o[5], o[6] == "formed"))[2:]


def split_layers(layers: Sequence[tuple[str, int, int, int]], total: int) -> list[tuple[int, int, int, int, str]]:
    """Split ``total`` dims over layers given as (kind, d_in, d_out, positions): (k_in, k_out, blocks,
    width, method) each.

    1. The smallest layers are stored exactly (identity factors), as many as :func:`exact_layers`
       allows: at least every layer whose exact gradient (d_in·d_out values) fits an equal share.
    2. The rest is shared equally by the remaining layers (in order; the first ones get the
       remainder of the division), and each picks its factors (see ``_factor_widths``; the formed
       layers' dense maps share FORMED_ELEMENTS, in model order). A layer with an identity factor may
       use a few dims less than its share; those pass to the next layer, and the last layer with two
       random factors, a formed map (or the dense group) takes what is left, so the widths add up to
       ``total``. Only when no layer can absorb them (or when the exact gradients of all layers fit
       in fewer dims) is the sum below ``total``.
    """
    if total < len(layers):
        raise CaptureError(
            f"projection_dim={total} is less than the {len(layers)} layers the factored projection "
            "gives one block each; use a larger projection_dim"
        )
    n = len(layers)
    result: list[tuple[int, int, int, int, str] | None] = [None] * n
    for i in exact_layers([d_in * d_out for _, d_in, d_out, _ in layers], total):
        _, d_in, d_out, _ = layers[i]
        result[i] = (d_in, d_out, 1, d_in * d_out, "factors")
    pending = [i for i in range(n) if result[i] is None]
    left = total - sum(r[3] for r in result if r is not None)
    if pending:
        base, extra = divmod(left, len(pending))
        carry = 0
        room = FORMED_ELEMENTS
        for j, i in enumerate(pending):
            kind, d_in, d_out, positions = layers[i]
            share = base + (j < extra) + carry
            result[i] = _factor_widths(kind, d_in, d_out, share, positions, room)
            if result[i][4] == "formed":
                room -= d_in * d_out * result[i][3]
            carry = share - result[i][3]
        if carry:
            # Hand the remainder to the last layer that can take any number of dims.
            for i in reversed(pending):
                kind, d_in, d_out, _ = layers[i]
                k_in, k_out, blocks, width, method = result[i]
                grown = width + carry
                if kind == "dense" and grown <= d_out:
                    result[i] = (1, grown, 1, grown, "factors")
                    break
                if method == "formed" and grown < d_in * d_out and d_in * d_out * grown <= FACTOR_ELEMENTS:
                    result[i] = (1, 1, grown, grown, "formed")
                    break
                if method == "factors" and kind != "dense" and k_in < d_in and k_out < d_out:
                    result[i] = (k_in, k_out, -(-grown // (k_in * k_out)), grown, "factors")
                    break
    return [r for r in result if r is not None]


def exact_layers(sizes: Sequence[int], total: int) -> list[int]:
    """Indices of the layers stored exactly: the smallest first, a prefix of them.

    With equal per-layer gradient norms, the estimate's variance over the n layers left, sharing the
    K dims left, goes like n²/K: keeping a layer of D values exact changes it to (n−1)²/(K−D), a gain
    while D < (2 − 1/n)·K/n. Norms are not equal in practice (a classifier head often holds most of
    the gradient in a few hundred values, where a shared few dozen dims would ruin the ranking), so
    the prefix taken is the longest whose variance stays within 1 + EXACT_REGRET of the best prefix:
    a bounded loss if the norms are equal, a large gain when a small layer dominates. Every layer
    left keeps at least one dim.
    """
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    n, left = len(sizes), total
    variances = [n * n / left if left > 0 else math.inf]
    for k, i in enumerate(order, start=1):
        left -= sizes[i]
        rest = n - k
        if left < rest:
            break
        variances.append(rest * rest / left if rest else 0.0)
    best = min(variances)
    take = max(k for k, v in enumerate(variances) if v <= best * (1 + EXACT_REGRET))
    return order[:take]


def split_dim(layers: Sequence[tuple[str, int, int]], total: int) -> list[tuple[int, int, int, int]]:
    """:func:`split_layers` for layers of one position each, as (kind, d_in, d_out): (k_in, k_out, blocks, width)."""
    return [r[:4] for r in split_layers([(k, i, o, 1) for k, i, o in layers], total)]


# ---- spec ---------------------------------------------------------------------------------------
def plan_layers(model: nn.Module, names: Sequence[str], dim: int,
                positions: Mapping[str, int] | None = None) -> list[FactorLayer]:
    """The factored plan for the selected parameters of ``model`` at total width ``dim``.

    ``positions``: output positions per example by module name (:func:`conv_positions`); 1 for the rest.
    """
    positions = positions or {}
    groups = layer_groups(model, names)
    widths = split_layers([(k, d_in, d_out, int(positions.get(m, 1)) if k != "dense" else 1)
                           for k, m, _, d_in, d_out in groups], int(dim))
    plan = [
        FactorLayer(kind, module, params, d_in, d_out, k_in, k_out, width, blocks, method)
        for (kind, module, params, d_in, d_out), (k_in, k_out, blocks, width, method) in zip(groups, widths)
    ]
    # The stored width is projection_dim (or the exact width, when that is smaller).
    pad = min(int(dim), sum(x.exact_width for x in plan)) - sum(x.width for x in plan)
    if pad > 0:
        plan.append(FactorLayer("pad", "", (), 0, 0, 0, 0, pad))
    return plan


def factored_spec(model: nn.Module, names: Sequence[str], dim: int, seed: int, *,
                  positions: Mapping[str, int] | None = None, example: Inputs | None = None) -> ProjectionSpec:
    """A ``factored`` spec whose ``extra`` records the per-layer plan (so the fingerprint covers it).

    ``example``: the model inputs of one batch (a tensor, a tuple or a dict), run once to count each
    convolution's output positions, which decide whether its gradient is formed (``positions`` gives
    them directly). Without either, every layer is planned as if it had one position.
    """
    if int(dim) <= 0:
        raise CaptureError(f"projection_dim must be a positive integer, got {dim}")
    if positions is None and example is not None:
        positions = conv_positions(model, example)
    params = dict(model.named_parameters())
    layers = tuple((n, tuple(int(v) for v in params[n].shape)) for n in names)
    plan = plan_layers(model, names, int(dim), positions)
    extra = {
        "version": PLAN_VERSION,
        "factor": FACTOR_KIND,
        "requested_dim": int(dim),
        "layers": [layer.to_dict() for layer in plan],
    }
    return ProjectionSpec(
        kind="factored", dim=sum(x.width for x in plan), seed=int(seed), layers=layers,
        extra=((SPEC_KEY, extra),),
    )


def plan_from_spec(spec: ProjectionSpec) -> list[FactorLayer]:
    """The per-layer plan a factored spec records."""
    extra = dict(spec.extra).get(SPEC_KEY)
    if spec.kind != "factored" or not extra:
        raise CaptureError(f"{spec.describe()} is not a factored spec with a layer plan")
    if extra.get("version") != PLAN_VERSION or extra.get("factor") != FACTOR_KIND:
        raise CaptureError(
            f"factored plan version {extra.get('version')} ({extra.get('factor')}) is not the one this "
            f"trackin-ooc makes (version {PLAN_VERSION}, {FACTOR_KIND}); re-capture with this version"
        )
    return [FactorLayer.from_dict(d) for d in extra["layers"]]


def describe_plan(plan: Sequence[FactorLayer]) -> str:
    """One line per layer: what was stored exactly and how the rest was factored."""
    lines = []
    for x in plan:
        if x.kind == "pad":
            lines.append(f"{'pad':9s} {'(zeros)':20s} {'':>10s}   {x.width:>7d}")
            continue
        if x.kind == "dense":
            how = "exact" if x.out_identity else f"dense Gaussian to {x.width}"
        elif x.formed:
            how = f"formed gradient, dense Gaussian to {x.width}"
        elif x.width == x.exact_width:
            how = "exact"
        else:
            side_in = "identity" if x.in_identity else str(x.n_in)
            side_out = "identity" if x.out_identity else str(x.n_out)
            how = f"in {x.d_in}→{side_in}, out {x.d_out}→{side_out}"
            if x.blocks > 1:
                how += f" in {x.blocks} blocks of {x.k_in}×{x.k_out}"
        lines.append(f"{x.kind:9s} {x.module or ','.join(x.params):20s} {x.exact_width:>10d} → {x.width:>7d}  {how}")
    return "\n".join(lines)


# ---- factors and per-layer features ------------------------------------------------------------
class Factors:
    """The Gaussian factor matrices of a plan, generated once per process and device (cached)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", cache: _BlockCache | None = None):
        self.seed = int(seed)
        self.device = torch.device(device)
        self.cache = cache

    def matrix(self, layer: FactorLayer, side: str) -> torch.Tensor | None:
        """``d × n`` factor (n = k·blocks, scaled by 1/√n) for side "in" or "out"; None for the identity.

        Side "formed": the D × width dense map of a formed layer (rows in the order of vec(G), G as
        d_in × d_out).
        """
        if side == "formed":
            return projection_matrix(FACTOR_KIND, self.seed, f"{layer.weight}#formed", layer.exact_width,
                                     layer.width, self.device, self.cache)
        if (layer.in_identity if side == "in" else layer.out_identity):
            return None
        d, k = (layer.d_in, layer.n_in) if side == "in" else (layer.d_out, layer.n_out)
        return projection_matrix(FACTOR_KIND, self.seed, f"{layer.weight}#{side}", d, k, self.device, self.cache)


def project_input(layer: FactorLayer, a: torch.Tensor, factors: Factors) -> torch.Tensor:
    """(B, T, k_in) input factor of a Linear/Conv2d/Conv1D input (B, T, I) (bias row appended) or of
    token ids (B, T) for an Embedding."""
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


def combine(layer: FactorLayer, a_proj: torch.Tensor, d_proj: torch.Tensor) -> torch.Tensor:
    """Σ_t vec(a_t d_tᵀ) per example and block, the first ``width`` values, scaled: (B, width)."""
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
    return f


def features_from_formed(layer: FactorLayer, g: torch.Tensor, factors: Factors) -> torch.Tensor:
    """A layer's features (B, width) from its per-example gradients G as (B, d_in, d_out): the same
    numbers as :func:`combine` of the projected factors (or the dense map of a formed layer)."""
    b = g.shape[0]
    g = g.to(torch.float32)
    if layer.formed:
        return torch.matmul(g.reshape(b, -1), factors.matrix(layer, "formed"))
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
    return f * layer.scale if layer.scale != 1.0 else f


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
    spec: ProjectionSpec, grads: Mapping[str, torch.Tensor], device: torch.device | str | None = None,
    cache: _BlockCache | None = None,
) -> torch.Tensor:
    """Factored features from exact per-example gradients {name: (B, *shape)}: (B, spec.dim).

    The reference path (tests, and models whose hooks cannot be used): the same linear map of the
    gradient as the hooks compute, P_inᵀ Gᵀ P_out per layer (or the dense map of a formed layer).
    """
    plan = plan_from_spec(spec)
    first = next(iter(grads.values()))
    device = first.device if device is None else torch.device(device)
    factors = Factors(spec.seed, device, cache)
    b = first.shape[0]
    parts = []
    for layer in plan:
        if layer.kind == "dense":
            parts.append(dense_features(spec, layer, grads, device))
        elif layer.kind == "pad":
            parts.append(torch.zeros(b, layer.width, device=device))
        else:
            parts.append(features_from_formed(layer, gradient_matrix(layer, grads), factors))
    return torch.cat(parts, dim=1)


def dense_spec(spec: ProjectionSpec, layer: FactorLayer) -> ProjectionSpec:
    """The dense (or exact) sub-spec the fallback parameters are projected with."""
    shapes = dict(spec.layers)
    layers = tuple((n, shapes[n]) for n in layer.params)
    if layer.out_identity:
        return ProjectionSpec(kind="exact", dim=layer.width, layers=layers)
    return ProjectionSpec(kind=FACTOR_KIND, dim=layer.width, seed=spec.seed, layers=layers)


def dense_features(
    spec: ProjectionSpec, layer: FactorLayer, grads: Mapping[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    sub = dense_spec(spec, layer)
    return Projector(sub, device=device)({n: grads[n] for n in layer.params})
