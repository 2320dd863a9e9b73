"""The factored projection's plan: what each layer stores and how many dims it takes (pure functions).

Plan version 2 (what ``factored_spec`` makes):

- When the exact gradients of all selected parameters fit in ``projection_dim`` values, every layer
  is stored exactly (identity factors, concatenated): the store is exact and narrower.
- Otherwise every layer's per-example gradient is mapped to a **wide** vector of its own and all
  the wide vectors are **hashed into the same k = projection_dim dims** by one seeded CountSketch
  (a sparse Johnson-Lindenstrauss map: every wide coordinate j of a layer is added at bucket h(j) in
  [0, k) with sign s(j) = ±1). A layer's wide vector is

  * its exact gradient vec(G) (``width = d_in·d_out``, identity factors) when it has at most
    ``HASH_ELEMENTS`` values (every layer of the models the project serves): the composition is a
    CountSketch of the whole model's gradient, whose inner-product variance,
    (‖x‖²‖y‖² + ⟨x,y⟩² − 2Σ x_i²y_i²)/k, is at most a dense Gaussian projection's at the same k;
  * for a larger layer, its outer-product projection P_inᵀ Gᵀ P_out in diagonal blocks (the
    version-1 factors, :func:`factor_widths`) to ``WIDE × k`` values: its own error is then about
    1/WIDE of the final map's, whatever share of the gradient the layer holds.

  * for the smallest layers (a classifier head, normalisation parameters: while their maps hold at
    most ``DENSE_ELEMENTS`` values together), a dense Gaussian map of the gradient straight into the k
    shared dims (``method="formed"``), as a dense projection would map them.

  Nothing is split across layers: each example's k dims follow its own gradient energy (a layer
  with most of an example's gradient takes most of the variance budget of that example), which no
  fixed per-layer allocation can match. The plan therefore needs no data: train and test stores of
  the same model, selection, dim and seed always agree.

Plan version 1 (stores made before; read and scored as before, never made): each layer a slice of
its own of the feature vector (``mix == 0``), k split equally over the layers after keeping the
smallest exact.

Everything here is a pure function of the layers' kinds, shapes and positions: no model, no tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...errors import CaptureError
from .costs import formed_cost, hashed_costs, per_position_cost

SPEC_KEY = "factored"
FACTOR_KIND = "gaussian"
PLAN_VERSION = 2
READ_VERSIONS = (1, 2)
MIX_KIND = "countsketch"
# Buckets per wide value of the shared map (each value added at SPARSITY random buckets with random signs,
# scaled 1/√SPARSITY). One, a CountSketch, has at most a dense Gaussian map's variance and ranks like it (two
# measured no better on GPT-2-style models), at one scattered add per value.
SPARSITY = 1
# How a layer's feature is defined: "factors" (P_inᵀ Gᵀ P_out in blocks; identity factors: vec(G)) or
# "formed" (a dense Gaussian map of G, version-1 plans only).
METHODS = ("factors", "formed")
HOOKED_KINDS = ("linear", "conv2d", "hf_conv1d", "embedding")

# A layer with at most this many weights (32 MiB of float32 per example) is hashed whole: its per-example
# gradient is formed (what a weight gradient costs) and its values are added into the k shared dims.
HASH_ELEMENTS = 1 << 23
# A larger layer's wide space: WIDE × projection_dim values of its outer-product projection.
WIDE = 16
# Small layers take a dense Gaussian map into the shared dims instead of hashing: the smallest first, while
# all their maps (exact width × dim each) hold at most this many values (64 MiB of float32), so they stay in
# the block cache. A layer of a few hundred values often carries most of an example's gradient (a classifier
# head), and a CountSketch of a vector dominated by a few coordinates ranks worse than a dense map: BERT
# classifiers of the sweep, 0.90 against a dense map's 0.93 at 1024 dims (benchmarks/sweep_projection.py).
DENSE_ELEMENTS = 1 << 24
# Cost allowance of a wide layer's outer-product projection: BETA × its own forward and backward
# (3·T·d_in·d_out multiply-adds per example); sets its block size.
BETA = 4.0
# Largest factor matrix (elements; 128 MiB of float32).
FACTOR_ELEMENTS = 1 << 25
# Variance model of one random side, c = 1 + 1/cos² between examples' vectors (3 for cos² = ½).
_C = 3.0


@dataclass(frozen=True)
class FactorLayer:
    """One block of the factored feature map: a hooked layer, or the dense group of the rest.

    ``kind`` is "linear", "conv2d", "hf_conv1d" (Hugging Face's ``Conv1D``, a Linear with its weight
    transposed), "embedding", "dense", or "pad" (zeros, version-1 plans). ``d_in × d_out`` is the exact
    gradient's shape as the factors see it (input side incl. the bias row, or vocabulary; output side),
    ``k_in × k_out`` the factors' widths (``k == d``: that side is the identity) and ``width`` the values
    of the layer's own feature (at most ``k_in·k_out·blocks``). ``mix``: 0 when those ``width`` values are
    a slice of the stored vector of their own; k when they are hashed into the k dims all layers share
    (plan version 2). ``method="formed"`` (version 1): a dense Gaussian map of the formed gradient. The
    dense group has ``d_in = k_in = 1``, ``d_out`` = its parameter count and ``k_out = width``.
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
    mix: int = 0

    @property
    def exact_width(self) -> int:
        return self.d_in * self.d_out

    @property
    def out_width(self) -> int:
        """Values this layer adds to the stored vector: its own ``width``, or the shared ``mix`` dims."""
        return self.mix or self.width

    @property
    def formed(self) -> bool:
        """The features must come from the formed gradient (a dense map of it, or hashing it whole)."""
        return self.method == "formed" or (self.hashed_whole and self.kind != "embedding")

    @property
    def direct(self) -> bool:
        """A dense Gaussian map of the layer's gradient straight into the shared dims (nothing is hashed)."""
        return bool(self.mix) and self.method == "formed"

    @property
    def hashed_whole(self) -> bool:
        """The exact gradient itself is hashed into the shared dims."""
        return bool(self.mix) and self.method == "factors" and self.k_in == self.d_in and self.k_out == self.d_out

    @property
    def in_identity(self) -> bool:
        return self.method != "formed" and self.k_in == self.d_in

    @property
    def out_identity(self) -> bool:
        return self.method != "formed" and self.k_out == self.d_out

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
        if self.method == "formed":
            return 1.0
        return math.sqrt(self.n_in * self.n_out / self.width)

    def cost(self, positions: int) -> tuple[float, float]:
        """Multiply-adds per example of this layer's features at ``positions``: (per position, formed)."""
        if self.hashed_whole:
            return hashed_costs(self.kind, self.d_in, self.d_out, positions)
        products = self.k_in * self.k_out * self.blocks
        per = (
            math.inf
            if self.method == "formed"
            else per_position_cost(
                self.kind,
                self.d_in,
                self.d_out,
                self.n_in,
                self.n_out,
                products,
                self.in_identity,
                self.out_identity,
                positions,
            )
        )
        formed = formed_cost(
            self.kind,
            self.d_in,
            self.d_out,
            self.n_out,
            products,
            self.in_identity,
            self.out_identity,
            positions,
            self.width if self.method == "formed" else 0,
        )
        return per, formed

    def to_dict(self) -> dict:
        d = {
            "kind": self.kind,
            "module": self.module,
            "params": list(self.params),
            "d_in": self.d_in,
            "d_out": self.d_out,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "width": self.width,
            "blocks": self.blocks,
        }
        if self.method != "factors":  # version-1 plans without formed layers keep their fingerprint
            d["method"] = self.method
        if self.mix:
            d["mix"] = self.mix
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> FactorLayer:
        method = str(d.get("method", "factors"))
        if method not in METHODS:
            raise CaptureError(
                f"factored plan layer {d.get('module')!r} has an unknown method {method!r}; "
                "re-capture with this version of trackin-ooc"
            )
        return cls(
            kind=str(d["kind"]),
            module=str(d["module"]),
            params=tuple(d["params"]),
            d_in=int(d["d_in"]),
            d_out=int(d["d_out"]),
            k_in=int(d["k_in"]),
            k_out=int(d["k_out"]),
            width=int(d["width"]),
            blocks=int(d.get("blocks", 1)),
            method=method,
            mix=int(d.get("mix", 0)),
        )


@dataclass(frozen=True)
class LayerGroup:
    """What the plan needs of one group of parameters: kind, module, parameters, exact shape (d_in × d_out)
    and output positions per example (1 for sequence layers, whose length varies)."""

    kind: str
    module: str
    params: tuple[str, ...]
    d_in: int
    d_out: int
    positions: int = 1


# ---- a wide layer's factors ---------------------------------------------------------------------------
def block_size(kind: str, d_in: int, d_out: int, share: int, positions: int = 1) -> int:
    """Side m of the m×m blocks of a layer with two random factors projected to ``share`` values.

    The estimate's variance grows with m (~(2m·c + c²)/share) while the cost of projecting one
    position, (d_in + d_out)·share/m, and the factors' memory, d·share/m, fall: m is the smallest
    block that keeps that cost within BETA × the layer's forward+backward and each factor within
    FACTOR_ELEMENTS, and at most √share (a single block). An embedding's input side is a row gather,
    so only d_out counts towards its cost. With T > 1 positions the features may come from the formed
    gradient instead (T·D + D·share/m), which allows smaller blocks.
    """
    sides = d_out if kind == "embedding" else d_in + d_out
    by_cost = math.ceil(2 * sides * share / (BETA * 6 * d_in * d_out))
    if positions > 1 and kind != "embedding":
        by_cost = min(by_cost, math.ceil(share / ((3 * BETA - 1) * positions)))
    m = max(by_cost, math.ceil(max(d_in, d_out) * share / FACTOR_ELEMENTS))
    return max(1, min(m, math.isqrt(share), d_in - 1, d_out - 1))


def factor_widths(kind: str, d_in: int, d_out: int, share: int, positions: int = 1) -> tuple[int, int, int, int]:
    """(k_in, k_out, blocks, width) of a layer's outer-product projection to ``share`` values (< d_in·d_out).

    Candidates: an identity input factor (share // d_in random output columns), an identity output
    factor, or two random factors in m×m diagonal blocks (:func:`block_size`; products beyond ``share``
    are dropped, which keeps the estimate unbiased). The choice minimises the variance model (c/k for
    one random side of k columns, (2c·m + c²)/share for blocks) among those whose matrices fit
    FACTOR_ELEMENTS (the smallest one if none does).
    """
    c = _C
    options: list[tuple[float, int, int, int, int, int]] = []  # (variance, elements, k_in, k_out, blocks, width)
    if d_in <= share:
        k_out = share // d_in
        options.append((c / k_out, d_out * k_out, d_in, k_out, 1, d_in * k_out))
    if d_out <= share:
        k_in = share // d_out
        options.append((c / k_in, d_in * k_in, k_in, d_out, 1, k_in * d_out))
    if d_in > 1 and d_out > 1:
        m = block_size(kind, d_in, d_out, share, positions)
        blocks = -(-share // (m * m))
        options.append(((2 * c * m + c * c) / share, max(d_in, d_out) * m * blocks, m, m, blocks, share))
    if not options:
        raise CaptureError(f"cannot project a {d_in}×{d_out} layer to {share} values")
    fitting = [o for o in options if o[1] <= FACTOR_ELEMENTS] or [min(options, key=lambda o: o[1])]
    return min(fitting, key=lambda o: (o[0], -o[5]))[2:]


# ---- the plan -------------------------------------------------------------------------------------------
def wide_width(exact_width: int, dim: int) -> int:
    """Values of a wide layer's own projection: WIDE × dim, below its exact width."""
    return min(WIDE * int(dim), exact_width - 1)


def plan_layer(group: LayerGroup, dim: int) -> FactorLayer:
    """One group's entry of a version-2 plan hashed into ``dim`` shared dims."""
    g = group
    exact = g.d_in * g.d_out
    if g.kind == "dense" or exact <= HASH_ELEMENTS:
        return FactorLayer(g.kind, g.module, g.params, g.d_in, g.d_out, g.d_in, g.d_out, exact, mix=int(dim))
    k_in, k_out, blocks, width = factor_widths(g.kind, g.d_in, g.d_out, wide_width(exact, dim), g.positions)
    return FactorLayer(g.kind, g.module, g.params, g.d_in, g.d_out, k_in, k_out, width, blocks, mix=int(dim))


def plan_groups(groups: Sequence[LayerGroup], dim: int) -> list[FactorLayer]:
    """The version-2 plan of ``groups`` at ``dim``: every layer exact (concatenated) when all exact gradients
    fit in ``dim`` values, else every layer hashed into the ``dim`` dims they share (see the module text)."""
    if int(dim) <= 0:
        raise CaptureError(f"projection_dim must be a positive integer, got {dim}")
    if not groups:
        raise CaptureError("the factored projection needs at least one selected parameter")
    total = sum(g.d_in * g.d_out for g in groups)
    if total <= dim:
        return [
            FactorLayer(g.kind, g.module, g.params, g.d_in, g.d_out, g.d_in, g.d_out, g.d_in * g.d_out) for g in groups
        ]
    direct = set(dense_mapped([g.d_in * g.d_out for g in groups], int(dim)))
    return [direct_layer(g, int(dim)) if i in direct else plan_layer(g, int(dim)) for i, g in enumerate(groups)]


def dense_mapped(sizes: Sequence[int], dim: int) -> list[int]:
    """Indices of the layers that take a dense Gaussian map straight into the shared dims: the smallest
    first, while their maps together hold at most DENSE_ELEMENTS values (``size × dim`` each)."""
    taken, used = [], 0
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i], i)):
        used += sizes[i] * dim
        if used > DENSE_ELEMENTS:
            break
        taken.append(i)
    return taken


def direct_layer(group: LayerGroup, dim: int) -> FactorLayer:
    """A small layer's entry: its formed gradient times a dense D × dim Gaussian matrix, added to the shared
    dims (``method="formed"``, ``width = mix = dim``)."""
    g = group
    if g.kind == "dense":
        return FactorLayer(g.kind, g.module, g.params, 1, g.d_out, 1, int(dim), int(dim), method="formed", mix=int(dim))
    return FactorLayer(g.kind, g.module, g.params, g.d_in, g.d_out, 1, 1, int(dim), int(dim), "formed", int(dim))


def stored_dim(plan: Sequence[FactorLayer]) -> int:
    """Values per example and checkpoint the plan stores."""
    mixes = {x.mix for x in plan if x.mix}
    if len(mixes) > 1:
        raise CaptureError(f"a factored plan hashes into one set of shared dims, this one into {sorted(mixes)}")
    return (next(iter(mixes)) if mixes else 0) + sum(x.width for x in plan if not x.mix)


def plan_extra(plan: Sequence[FactorLayer], requested_dim: int) -> dict:
    """What the spec records of a version-2 plan (``extra["factored"]``, covered by the fingerprint)."""
    return {
        "version": PLAN_VERSION,
        "factor": FACTOR_KIND,
        "mix": MIX_KIND,
        "sparsity": SPARSITY,
        "requested_dim": int(requested_dim),
        "layers": [x.to_dict() for x in plan],
    }


def plan_from_extra(extra: Mapping | None, what: str = "this spec") -> list[FactorLayer]:
    """The per-layer plan recorded in a spec's ``extra["factored"]`` (versions 1 and 2)."""
    if not extra:
        raise CaptureError(f"{what} is not a factored spec with a layer plan")
    version = extra.get("version")
    if (
        version not in READ_VERSIONS
        or extra.get("factor") != FACTOR_KIND
        or (version >= 2 and (extra.get("mix"), extra.get("sparsity")) != (MIX_KIND, SPARSITY))
    ):
        raise CaptureError(
            f"factored plan version {version} ({extra.get('factor')}) is not one this trackin-ooc reads "
            f"(versions {', '.join(map(str, READ_VERSIONS))}, {FACTOR_KIND}); re-capture with this version"
        )
    plan = [FactorLayer.from_dict(d) for d in extra["layers"]]
    if version == 1 and any(x.mix for x in plan):
        raise CaptureError("a version-1 factored plan with hashed layers is not one trackin-ooc made; re-capture")
    return plan


def describe_plan(plan: Sequence[FactorLayer]) -> str:
    """One line per layer: what was stored exactly, hashed whole, or projected first."""
    lines = []
    for x in plan:
        if x.kind == "pad":
            lines.append(f"{'pad':9s} {'(zeros)':20s} {'':>10s}   {x.width:>7d}")
            continue
        name = x.module or ",".join(x.params)
        into = f", hashed into the {x.mix} shared dims" if x.mix else ""
        if x.direct:
            how, into = f"dense Gaussian map into the {x.mix} shared dims", ""
        elif x.kind == "dense":
            how = "exact" if x.out_identity else f"dense Gaussian to {x.width}"
        elif x.method == "formed":
            how = f"formed gradient, dense Gaussian to {x.width}"
        elif x.width == x.exact_width:
            how = "exact"
        else:
            side_in = "identity" if x.in_identity else str(x.n_in)
            side_out = "identity" if x.out_identity else str(x.n_out)
            how = f"in {x.d_in}→{side_in}, out {x.d_out}→{side_out}"
            if x.blocks > 1:
                how += f" in {x.blocks} blocks of {x.k_in}×{x.k_out}"
        lines.append(f"{x.kind:9s} {name:20s} {x.exact_width:>10d} → {x.width:>7d}  {how}{into}")
    return "\n".join(lines)
