"""The projection spec: what makes two stores' feature spaces the same.

A spec is pure data (no torch): kind, dimension, seed and the selected parameters' names and
shapes. Its fingerprint is a hash of all of it; stores combine only when fingerprints agree.
``extra`` holds JSON-native kind-specific data, part of the fingerprint: a ``factored`` spec keeps
its per-layer plan there (layer kinds, factor widths and the split of ``dim``, see
``trackin_ooc.capturing.projection.factored``); a ``factors`` spec (exact gradients, some layers
stored as per-layer factors) keeps each layer's choice there (``...projection.factors``).

``preconditioner`` says whether the features are of the gradient itself ("none", the SGD form of TracIn) or of
P^{1/2} g with the Adam preconditioner P = diag(1/(√v̂ + ε)) of each checkpoint ("adam", "adafactor"; see
docs/preconditioning.md); ``preconditioner_layers`` lists the layers whose v̂ is taken in its rank-1
(Adafactor) form, as (kind, module, parameters). Both are part of the fingerprint, except that a "none" spec
records neither, so it fingerprints as specs did before preconditioners existed.
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
# What ``preconditioner`` may be: the SGD form, features scaled by an Adam preconditioner's square root, or
# by a fitted K-FAC curvature's inverse square root ("kfac": its record, with the fit's hash, in ``extra``).
PRECONDITIONERS = ("none", "adam", "adafactor", "kfac")
# The forms a parameter's v̂ takes: elementwise (Adam's own), or its layer's rank-1 factorisation.
FORM_ADAM, FORM_ADAFACTOR = "adam", "adafactor"
PRECONDITIONER_VERSION = 1

PreconditionerLayer = tuple[str, str, tuple[str, ...]]  # (kind, module, parameters), see preconditioner_layers


@dataclass(frozen=True)
class ProjectionSpec:
    """How per-example gradients were turned into stored feature vectors.

    Stores whose specs differ (kind, dimension, seed, layers, preconditioner) hold features of
    different linear maps and are refused together: their dot products would mean nothing.

    Parameters
    ----------
    kind : str
        The projection: "exact", "gaussian", "rademacher", "factored", "factors" or "external"
        (features written by :func:`from_arrays`).
    dim : int
        Stored features per example and checkpoint.
    seed : int, optional
        Seed of the random projection (None for exact).
    layers : tuple of (str, tuple of int)
        The selected parameters and their shapes, in capture order.
    extra : tuple of (str, Any)
        Kind-specific settings (a factored plan, factor ranks), as sorted pairs.
    preconditioner : str
        "none" (the SGD form), "adam" or "adafactor".
    preconditioner_layers : tuple
        Per parameter, the form of the optimizer moments applied to it.

    Raises
    ------
    ValueError
        An unknown kind or preconditioner, or a non-positive dimension.
    """

    kind: str
    dim: int
    seed: int | None = None
    layers: tuple[tuple[str, tuple[int, ...]], ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default=())
    preconditioner: str = "none"
    preconditioner_layers: tuple[PreconditionerLayer, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projection kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.dim <= 0:
            raise ValueError(f"projection dimension must be positive, got {self.dim}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {self.preconditioner!r}; use one of {', '.join(PRECONDITIONERS)}")
        if self.preconditioner == "none" and self.preconditioner_layers:
            raise ValueError("a spec without a preconditioner has no preconditioner layers")

    def preconditioner_forms(self) -> dict[str, str]:
        """{parameter: "adam" | "adafactor"} for a preconditioned spec (its layers' rank-1 form, or the
        elementwise one); empty for the SGD form."""
        if self.preconditioner == "none":
            return {}
        rank1 = {p for _, _, params in self.preconditioner_layers for p in params}
        return {n: FORM_ADAFACTOR if n in rank1 else FORM_ADAM for n, _ in self.layers}

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
            **(
                {
                    "preconditioner": {
                        "kind": self.preconditioner,
                        "version": PRECONDITIONER_VERSION,
                        "adafactor_layers": [
                            {"kind": k, "module": m, "params": list(p)} for k, m, p in self.preconditioner_layers
                        ],
                    }
                }
                if self.preconditioner != "none"
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjectionSpec:
        pre = d.get("preconditioner") or {}
        if pre and pre.get("version") != PRECONDITIONER_VERSION:
            raise ValueError(
                f"preconditioner record version {pre.get('version')} is not the one this trackin-ooc "
                f"reads (version {PRECONDITIONER_VERSION}); re-capture with this version"
            )
        return cls(
            kind=d["kind"],
            dim=int(d["dim"]),
            seed=d.get("seed"),
            layers=tuple((x["name"], tuple(int(v) for v in x["shape"])) for x in d.get("layers", [])),
            extra=tuple(sorted((d.get("extra") or {}).items())),
            preconditioner=str(pre.get("kind", "none")),
            preconditioner_layers=tuple(
                (str(x["kind"]), str(x["module"]), tuple(x["params"])) for x in pre.get("adafactor_layers", [])
            ),
        )

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        what = self._describe_projection()
        if self.preconditioner == "none":
            return what
        n = len(self.preconditioner_layers)
        rank1 = (
            f", {n} layer{'' if n == 1 else 's'} in the Adafactor form" if n and self.preconditioner == "adam" else ""
        )
        return f"{what}, {self.preconditioner}-preconditioned{rank1}"

    def describe_preconditioner(self) -> str:
        """In words: "none (SGD form)", "adam (P = 1/(√v̂+ε); 2 layers in the Adafactor form)", ..."""
        if self.preconditioner == "none":
            return "none (SGD form: plain gradients)"
        n = len(self.preconditioner_layers)
        if self.preconditioner == "kfac":
            fit = dict(self.extra).get("kfac") or {}
            return (
                f"kfac (features of P^1/2 g, P = (F + damping)^-1 from the EK-FAC curvature fitted at each "
                f"checkpoint, {len(fit.get('layers', []))} layers; fit {str(fit.get('sha256', '?'))[:12]})"
            )
        if self.preconditioner == "adam":
            rank1 = f"; {n} layer{'' if n == 1 else 's'} in the Adafactor form" if n else ""
            return f"adam (features of P^1/2 g, P = 1/(sqrt(v_hat) + eps) per checkpoint{rank1})"
        return (
            f"adafactor (features of P^1/2 g, v_hat of {n} layer{'' if n == 1 else 's'} in its rank-1 Adafactor form)"
        )

    def _describe_projection(self) -> str:
        if self.kind == "exact":
            return f"exact gradients ({self.dim} parameters)"
        if self.kind == "external":
            return f"external features ({self.dim} dims)"
        if self.kind == "factors":
            plan = dict(self.extra).get("factors") or {}
            n_layers = sum(1 for x in plan.get("layers", []) if x.get("store") == "factors")
            return (
                f"exact gradients ({self.dim} parameters; {n_layers} layer{'' if n_layers == 1 else 's'} "
                "stored as factors)"
            )
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
        if self.preconditioner != other.preconditioner:
            diffs.append(f"preconditioner {self.preconditioner!r} vs {other.preconditioner!r}")
        elif self.preconditioner_layers != other.preconditioner_layers:
            diffs.append("layers in the Adafactor form of the preconditioner differ")
        for key in ("kind", "dim", "seed", "generator"):
            if a[key] != b[key]:
                diffs.append(f"{key} {a[key]!r} vs {b[key]!r}")
        if a["extra"].get("kfac") != b["extra"].get("kfac") and self.preconditioner == other.preconditioner == "kfac":
            diffs.append("fitted curvature differs (captured with another to.fit_curvature)")
        elif a["extra"] != b["extra"]:
            keys = sorted(set(a["extra"]) | set(b["extra"]))
            changed = [k for k in keys if a["extra"].get(k) != b["extra"].get(k)]
            diffs.append(f"{', '.join(changed)} differ" if a["kind"] == b["kind"] else "extra differs")
        if a["layers"] != b["layers"]:
            na = [x["name"] for x in a["layers"]]
            nb = [x["name"] for x in b["layers"]]
            diffs.append("layers differ" if na != nb else "layer shapes differ")
        return "; ".join(diffs)
