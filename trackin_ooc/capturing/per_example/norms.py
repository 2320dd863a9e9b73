"""Exact squared norms of per-example gradients, without forming them where they factor.

Stored next to the (projected) features so that self-influence Σ_c η_c ‖g_c‖² can be exact whatever
the projection (``self_influence(store, exact_norms=True)``). For a Linear, Conv2d or Embedding layer
the per-example gradient is Σ_t δ_t a_tᵀ, so

    ‖Σ_t δ_t a_tᵀ‖²  =  Σ_{t,s} (a_t · a_s)(δ_t · δ_s)

from the two T × T Gram matrices (T = positions; 1 for a plain Linear: ‖a‖² ‖δ‖²): a few dot
products per example where the projection costs a matrix product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# Elements of the (batch, T, T) Gram matrices computed at once (bounds memory for long sequences).
GRAM_ELEMENTS = 1 << 24


def row_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """‖g_i‖² of every example's values (batch first), in float32.

    One fused reduction: ``g.pow(2).sum()`` writes a squared copy first, which on a formed conv gradient
    of millions of values per example costs ten times as long.
    """
    flat = g.reshape(g.shape[0], -1).to(torch.float32)
    return torch.linalg.vector_norm(flat, dim=1).square()


def dense_sq_norms(grads: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Σ over parameters of ‖g‖² per example, from per-example gradients {name: (batch, *shape)}."""
    total = None
    for g in grads.values():
        sq = row_sq_norms(g.reshape(batch, -1))
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("no per-example gradients given")
    return total


def factored_sq_norms(
    inputs: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor], *, bias: bool, embedding: bool
) -> torch.Tensor:
    """‖Σ_t δ_t a_tᵀ‖² per example for one layer, over all of its calls in the forward pass.

    ``inputs``: per call, (B, T, d_in) layer inputs without the bias row, or (B, T) token ids for an
    Embedding; ``deltas``: per call, (B, T, d_out) output gradients. ``bias``: the gradient includes
    the bias (a constant input 1 at every position).
    """
    d = torch.cat([x.to(torch.float32) for x in deltas], dim=1)  # calls share the weight: join positions
    batch, t = d.shape[:2]
    if embedding:
        ids = torch.cat(list(inputs), dim=1)
    else:
        a = torch.cat([x.to(torch.float32) for x in inputs], dim=1)
        if t == 1:  # a plain Linear: the gradient is one outer product
            sq_a = a.pow(2).sum((1, 2)) + (1.0 if bias else 0.0)
            return sq_a * d.pow(2).sum((1, 2))
    out = torch.empty(batch, dtype=torch.float32, device=d.device)
    step = max(1, GRAM_ELEMENTS // max(1, t * t))
    for s in range(0, batch, step):
        e = min(batch, s + step)
        gram_d = torch.bmm(d[s:e], d[s:e].transpose(1, 2))
        if embedding:
            gram_a = (ids[s:e, :, None] == ids[s:e, None, :]).to(torch.float32)
        else:
            gram_a = torch.bmm(a[s:e], a[s:e].transpose(1, 2))
            if bias:
                gram_a += 1.0
        out[s:e] = (gram_a * gram_d).sum((1, 2))
    return out
