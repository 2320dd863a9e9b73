"""What an index records about its lists, as plain values: the per-end probe rules, the norm bands and the
quantizer a query ranks lists with. The store reads and writes them; the engine (``engine/ivf.py``)
computes with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Bands:
    """Norm bands: a row of norm ‖x‖ belongs to band ``searchsorted(edges, ‖x‖, "right")`` and goes to the
    nearest centroid of its band's lists (``of_list``). No edges: one band, plain nearest centroid."""

    edges: np.ndarray
    of_list: np.ndarray

    def band_of(self, rows: np.ndarray) -> np.ndarray:
        norms = np.sqrt(np.einsum("rw,rw->r", rows, rows, dtype=np.float32))
        bands: np.ndarray = np.searchsorted(self.edges, norms, side="right")
        return bands


@dataclass(frozen=True)
class Quantizer:
    """What ranking lists for a query needs: centroids, radii, sizes, and the sampled rows of each list
    (``samples[sample_offsets[L]:sample_offsets[L+1]]`` lie in list L)."""

    centroids: np.ndarray
    radius: np.ndarray
    sizes: np.ndarray
    samples: np.ndarray
    sample_offsets: np.ndarray

    @property
    def n_lists(self) -> int:
        return int(self.centroids.shape[0])


@dataclass(frozen=True)
class EndRule:
    """How one end (proponents or opponents) ranks lists, and how many it reads by default.

    ``ranking``: "centroid" ranks list L by ⟨q, c_L⟩, "sample" by the best ⟨q, s⟩ over the sampled rows s
    of L (a list holding several clusters is ranked by the one nearest q, not by their mean); both then
    ± ``bound_weight``·‖q‖·r_L.
    """

    ranking: str
    bound_weight: float
    n_probe: int

    def as_dict(self) -> dict[str, Any]:
        return {"ranking": self.ranking, "bound_weight": float(self.bound_weight), "n_probe": int(self.n_probe)}


__all__ = ["Bands", "EndRule", "Quantizer"]
