"""What a factored layer's features and exact norm cost per example, each way they can be computed.

Multiply-adds per example for a layer with positions T (tokens, conv output pixels; 1 for a plain
Linear), input width d_in (bias row included), output width d_out and D = d_in·d_out:

- per position: project every a_t and δ_t (T·(d_in·n_in + d_out·n_out)), then combine (T·width);
- formed: form G = Aᵀ Δ (T·D, what a weight gradient costs, + D to write it), then apply the map to G
  (D·n_out + d_in·width for factors, D·width for a dense Gaussian map);
- hashed whole (plan version 2): forming G (T·D) and adding its D values into the shared dims;
  an Embedding adds T·d_out values at its tokens' buckets;
- exact squared norm: the Gram form Σ_{t,s}(a_t·a_s)(δ_t·δ_s) costs T²·(d_in + d_out), ‖G‖² costs
  T·D to form G (nothing when G is formed anyway).

The plan (:mod:`.factored`) uses these to choose each layer's map; the hooks use them per batch to
choose how to compute it (the same numbers either way).
"""

from __future__ import annotations

import math

INFINITE = math.inf


def per_position_cost(
    kind: str,
    d_in: int,
    d_out: int,
    n_in: int,
    n_out: int,
    products: int,
    in_identity: bool,
    out_identity: bool,
    positions: int,
) -> float:
    """Projecting each position's input and output gradient, then the ``products`` stored per position."""
    per = products
    if not in_identity and kind != "embedding":  # an embedding's input factor is a row gather
        per += d_in * n_in
    if not out_identity:
        per += d_out * n_out
    return float(positions) * per


def formed_cost(
    kind: str,
    d_in: int,
    d_out: int,
    n_out: int,
    products: int,
    in_identity: bool,
    out_identity: bool,
    positions: int,
    dense_width: int = 0,
) -> float:
    """Forming G (T·D), then the factor map (or a dense map of ``dense_width`` columns) applied to it."""
    d = d_in * d_out
    # forming G and writing it (an embedding's: zeroing V·E rows, then adding δ_t to its token's row)
    cost = float(d + positions * d_out) if kind == "embedding" else float(positions + 1) * d
    if dense_width:
        return cost + d * dense_width
    if not out_identity:
        cost += d * n_out
    if not in_identity:
        cost += d_in * products
    return cost


def norm_cost(kind: str, d_in: int, d_out: int, positions: int) -> tuple[str, float]:
    """The cheaper exact squared-norm formula when G is not formed anyway: ("gram" | "formed", cost)."""
    if positions <= 1:
        return "gram", float(d_in + d_out)  # ‖a‖²‖δ‖²
    gram = float(positions) ** 2 * ((1 if kind == "embedding" else d_in) + d_out)
    formed = float(d_in * d_out + positions * d_out) if kind == "embedding" else float(positions) * d_in * d_out
    return ("formed", formed) if formed < gram else ("gram", gram)


def hashed_costs(kind: str, d_in: int, d_out: int, positions: int) -> tuple[float, float]:
    """(per position, formed) cost of hashing a layer's exact gradient into the shared dims.

    An Embedding adds each position's δ_t (d_out values) at its token's buckets: per position only. Other
    layers form G (T·D, a weight gradient's cost, + D to hash it): formed only, since hashing per position
    would add T·D values instead of D.
    """
    if kind == "embedding":
        return float(positions) * d_out, INFINITE
    return INFINITE, float(positions + 1) * d_in * d_out
