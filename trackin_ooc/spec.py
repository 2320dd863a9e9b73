"""The projection spec: what makes two stores' feature spaces the same.

A spec is pure data (no torch): kind, dimension, seed and the selected parameters' names and
shapes. Its fingerprint is a hash of all of it; stores combine only when fingerprints agree.
``extra`` holds JSON-native kind-specific data, part of the fingerprint: a ``factored`` spec keeps
its per-layer plan there (layer kinds, factor widths and the split of ``dim``, see
``trackin_ooc.capturing.projection.factored``); a ``factors`` spec (exact gradients, some layers
stored as per-layer factors) keeps each layer's choice there (``...projection.factors``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("exact", "gaussian", "rademacher", "factored", "external", "factors")
PROJECTION_KINDS = ("gaussian", "rademacher", "factored")
# Rows of a dense projection matrix generated per seeded block: part of the spec's identity,
# because changing it changes the random numbers.
GENERATOR = "torch-cpu-philox-v1"


@dataclass(frozen=True)
class ProjectionSpec:
    """How per-example gradients were turned into stored feature vectors."""

    kind: str
    dim: int
    seed: int | None = None
    layers: tuple[tuple[str, tuple[int, ...]], ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.dim <= 0:
            raise ValueError(f"projection dimension must be positive, got {self.dim}")

    @property
    def n_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "generator": GENERATOR if self.kind in PROJECTION_KINDS else None,
            "layers": [{"name": n, "shape": list(s)} for n, s in self.layers],
            "extra": {k: v for k, v in self.extra},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjectionSpec:
        return cls(
            kind=d["kind"],
            dim=int(d["dim"]),
            seed=d.get("seed"),
            layers=tuple((x["name"], tuple(int(v) for v in x["shape"])) for x in d.get("layers", [])),
            extra=tuple(sorted((d.get("extra") or {}).items())),
        )

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        if self.kind == "exact":
            return f"exact gradients ({self.dim} parameters)"
        if self.kind == "external":
            return f"external features ({self.dim} dims)"
        if self.kind == "factors":
            plan = dict(self.extra).get("factors") or {}
            n_layers = sum(1 for x in plan.get("layers", []) if x.get("store") == "factors")
            return (f"exact gradients ({self.dim} parameters; {n_layers} layer{'' if n_layers == 1 else 's'} "
                    "stored as factors)")
        what = f"{self.kind} projection to {self.dim} dims (seed {self.seed}, {self.n_parameters} parameters"
        if self.kind == "factored":
            plan = dict(self.extra).get("factored") or {}
            n_layers = sum(1 for x in plan.get("layers", []) if x.get("kind") != "dense")
            what += f", {n_layers} factored layers"
        return what + ")"

    def difference(self, other: ProjectionSpec) -> str:
        """Say, in words, how two specs differ (empty when they do not)."""
        a, b = self.to_dict(), other.to_dict()
        diffs = []
        for key in ("kind", "dim", "seed", "generator"):
            if a[key] != b[key]:
                diffs.append(f"{key} {a[key]!r} vs {b[key]!r}")
        if a["extra"] != b["extra"]:
            keys = sorted(set(a["extra"]) | set(b["extra"]))
            changed = [k for k in keys if a["extra"].get(k) != b["extra"].get(k)]
            diffs.append(f"{', '.join(changed)} differ" if a["kind"] == b["kind"] else "extra differs")
        if a["layers"] != b["layers"]:
            na = [x["name"] for x in a["layers"]]
            nb = [x["name"] for x in b["layers"]]
            diffs.append("layers differ" if na != nb else "layer shapes differ")
        return "; ".join(diffs)
