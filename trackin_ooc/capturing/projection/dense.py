"""Dense random projections of per-example gradients, reproducible from the spec alone.

A dense projection matrix of D parameters × k dims is never held whole: it is generated in
seeded row blocks (per parameter, per block of rows) on the CPU, so every run, process and
device sees the same numbers, and cached within a memory budget so a process generates each
block once.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import CaptureError
from ...spec import PROJECTION_KINDS, ProjectionSpec

# Elements of one generated block (16 MiB of float32): rows per block = BLOCK_ELEMENTS // dim.
BLOCK_ELEMENTS = 1 << 22
DEFAULT_CACHE_BYTES = int(os.environ.get("TRACKIN_OOC_PROJECTION_CACHE_BYTES", 1 << 30))


def make_spec(
    kind: str | None, dim: int | None, seed: int, shapes: Sequence[tuple[str, tuple[int, ...]]]
) -> ProjectionSpec:
    """The spec for exact gradients (``dim=None``) or a ``kind`` projection to ``dim``."""
    layers = tuple((n, tuple(int(v) for v in s)) for n, s in shapes)
    total = sum(math.prod(s) for _, s in layers)
    if dim is None:
        return ProjectionSpec(kind="exact", dim=total, seed=None, layers=layers)
    if kind not in PROJECTION_KINDS:
        raise CaptureError(f"unknown projection {kind!r}; use one of {', '.join(PROJECTION_KINDS)}")
    if int(dim) <= 0:
        raise CaptureError(f"projection_dim must be a positive integer, got {dim}")
    if kind == "factored":
        raise CaptureError("a factored spec depends on the model's layer types: use factored.factored_spec(model, ...)")
    return ProjectionSpec(kind=kind, dim=int(dim), seed=int(seed), layers=layers)


def block_seed(seed: int, name: str, block: int) -> int:
    """A 64-bit seed for one generated block, independent of which other layers are selected."""
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return int(np.random.SeedSequence([seed, name_key, block]).generate_state(1, np.uint64)[0])


class _BlockCache:
    """Process-wide LRU cache of generated projection blocks, bounded in bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        value = make()
        size = value.numel() * value.element_size()
        with self._lock:
            if size <= self.budget:
                self._items[key] = value
                self.bytes += size
                while self.bytes > self.budget:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
        return value


_CACHE = _BlockCache(DEFAULT_CACHE_BYTES)


def generate_block(kind: str, seed: int, name: str, block: int, rows: int, dim: int) -> torch.Tensor:
    """Rows ``block*rows_per_block ...`` of one parameter's projection matrix, scaled by 1/sqrt(dim)."""
    gen = torch.Generator(device="cpu").manual_seed(block_seed(seed, name, block))
    if kind == "gaussian":
        out = torch.randn((rows, dim), generator=gen, dtype=torch.float32)
    elif kind == "rademacher":
        out = torch.randint(0, 2, (rows, dim), generator=gen, dtype=torch.int8).to(torch.float32)
        out.mul_(2).sub_(1)
    else:  # pragma: no cover - guarded by make_spec
        raise CaptureError(f"no dense generator for projection kind {kind!r}")
    return out.mul_(1.0 / math.sqrt(dim))


def rows_per_block(dim: int) -> int:
    """Rows of one generated block for a ``dim``-wide projection (the block layout is part of the spec)."""
    return max(1, BLOCK_ELEMENTS // dim)


def projection_matrix(
    kind: str,
    seed: int,
    name: str,
    n_rows: int,
    dim: int,
    device: torch.device | str = "cpu",
    cache: _BlockCache | None = None,
) -> torch.Tensor:
    """The whole ``n_rows × dim`` matrix a dense projection uses for a parameter called ``name``.

    Row blocks are the ones :class:`Projector` generates, so both agree; the result is cached per
    process (within the cache's byte budget), so a capture generates it once.
    """
    cache = _CACHE if cache is None else cache
    step = rows_per_block(dim)

    def make() -> torch.Tensor:
        parts = [
            generate_block(kind, seed, name, b, min(step, n_rows - start), dim)
            for b, start in enumerate(range(0, n_rows, step))
        ]
        return torch.cat(parts).to(device)

    return cache.get(("matrix", kind, seed, name, n_rows, dim, str(torch.device(device))), make)


class Projector:
    """Maps {parameter name: (batch, *shape) gradients} to (batch, spec.dim) features."""

    def __init__(self, spec: ProjectionSpec, device: torch.device | str = "cpu", cache: _BlockCache = _CACHE):
        self.spec = spec
        self.device = torch.device(device)
        self.cache = cache
        self.rows_per_block = rows_per_block(spec.dim)

    def _block(self, name: str, block: int, rows: int) -> torch.Tensor:
        assert self.spec.seed is not None  # dense specs always carry their seed
        seed = self.spec.seed
        key = (self.spec.kind, self.spec.dim, self.spec.seed, name, block, rows, str(self.device))
        return self.cache.get(
            key,
            lambda: generate_block(self.spec.kind, seed, name, block, rows, self.spec.dim).to(self.device),
        )

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(grads.values()))
        batch = first.shape[0]
        if self.spec.kind == "factored":
            raise CaptureError("a factored spec is projected by projection.factored.project_gradients (or the hooks)")
        if self.spec.kind == "exact":
            return torch.cat([grads[n].reshape(batch, -1) for n, _ in self.spec.layers], dim=1)
        out = torch.zeros((batch, self.spec.dim), dtype=torch.float32, device=first.device)
        step = self.rows_per_block
        for name, _shape in self.spec.layers:
            flat = grads[name].reshape(batch, -1).to(torch.float32)
            d = flat.shape[1]
            for b, start in enumerate(range(0, d, step)):
                stop = min(start + step, d)
                out.addmm_(flat[:, start:stop], self._block(name, b, stop - start))
        return out
