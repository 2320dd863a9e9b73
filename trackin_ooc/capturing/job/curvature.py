"""Curvature fitted at each checkpoint, for the K-FAC preconditioner of TracIn (``preconditioner="kfac"``).

    curvature = to.fit_curvature(model, checkpoints, train_data, "curvature.pt")
    train = to.capture(model, checkpoints, train_data, "train.zarr", preconditioner="kfac", curvature=curvature)
    test = to.capture(model, checkpoints, test_data, "test.zarr", preconditioner="kfac", curvature="curvature.pt")

At checkpoint c the empirical Fisher F_c = (1/n) Σ_z g_c(z) g_c(z)ᵀ of the training data is approximated per
layer the way EK-FAC does (George et al. 2018; Grosse et al. 2023): for a Linear or Conv layer whose
per-example gradient is G = Σ_t δ_t ãᵀ_t (output gradients δ, inputs ã with a constant 1 appended when the
layer has a selected bias, convolution inputs unfolded per output position t), the eigenvectors Q_A of
A = E[Σ_t ã ãᵀ] and Q_S of S = E[Σ_t δ δᵀ] give a Kronecker basis, and the Fisher's diagonal in that basis
is measured directly: Λ_ij = E[(Q_Sᵀ G Q_A)_ij²]. With damping λ = ``damping`` × the layer's mean Λ (the
heuristic Kronfluence also uses), P_c = (F_c + λ I)^{-1} ≈ Q (Λ + λ)^{-1} Qᵀ, and every stored feature is
that of

    P_c^{1/2} G = Q_S [(Q_Sᵀ G Q_A) ⊘ √(Λ + λ)] Q_Aᵀ,

so influence stays a dot product of stored features: Σ_c η_c g'ᵀ P_c g (an influence function's
inverse-curvature product at every checkpoint, summed the way TracInCP sums them).

The fit is one pass of forward and backward hooks over the data for A and S, then one for Λ, per checkpoint.
The result is a torch file (``torch.load(weights_only=True)`` reads it) holding each checkpoint's bases,
eigenvalues and the content hash of the weights it was fitted at; a capture checks those hashes against
its own checkpoints and records the file's hash in the spec, so stores preconditioned by different fits
are refused together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CaptureError
from ..checkpoints import Checkpoint, drop_tied_duplicates, load_checkpoints
from ..checkpoints.hashing import state_dict_sha256
from ..checkpoints.loading import Checkpoints
from ..per_example.batches import call_functional
from ..per_example.layers import select_parameters
from ..per_example.losses import LossFn, check_losses, default_loss
from .data import as_loader, batches, dataset_length

FORMAT = "trackin-ooc curvature"
FORMAT_VERSION = 1
DAMPING = 0.1  # λ = DAMPING × mean eigenvalue of each layer (Kronfluence's heuristic damping)
KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}
# Elements of (rows × d_out × d_in) per-example gradients formed at once while fitting the eigenvalues.
FIT_ELEMENTS = 1 << 25
FIX_LAYERS = "select Linear, Conv1d and Conv2d layers only (layers=[...]), or use preconditioner='adam' or None"


@dataclass(frozen=True)
class KronLayer:
    """One layer's fitted curvature at one checkpoint: bases of its output (d_out) and input (d_in, the
    bias's constant input last) sides and the Fisher's eigenvalues in that basis (d_out, d_in)."""

    module: str
    kind: str  # "linear" | "conv1d" | "conv2d"
    params: tuple[str, ...]  # (weight,) or (weight, bias)
    q_out: torch.Tensor
    q_in: torch.Tensor
    eigenvalues: torch.Tensor

    def inverse_root(self, damping: float) -> torch.Tensor:
        """(Λ + λ)^{-1/2} with λ = ``damping`` × mean Λ (float64); λ > 0 also where Λ is all zeros."""
        lam = self.eigenvalues.to(torch.float64).clamp(min=0)
        absolute = damping * float(lam.mean())
        absolute = absolute if absolute > 0 else damping
        return (lam + absolute).rsqrt()


@dataclass
class Curvature:
    """What :func:`fit_curvature` fitted: per checkpoint (in order) each layer's :class:`KronLayer`."""

    checkpoint_hashes: list[str]
    layers: list[dict[str, KronLayer]]
    damping: float
    n_examples: int
    path: str | None = None

    @property
    def parameters(self) -> list[str]:
        """The parameters covered, in layer order."""
        return [p for layer in self.layers[0].values() for p in layer.params] if self.layers else []

    def _payload(self) -> dict:
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "damping": self.damping,
            "n_examples": self.n_examples,
            "checkpoint_hashes": self.checkpoint_hashes,
            "layers": [
                {"module": x.module, "kind": x.kind, "params": list(x.params)}
                for x in (self.layers[0].values() if self.layers else [])
            ],
        }
        tensors = {
            f"{c}/{m}/{part}": getattr(x, part).contiguous()
            for c, layers in enumerate(self.layers)
            for m, x in layers.items()
            for part in ("q_out", "q_in", "eigenvalues")
        }
        return {"meta": json.dumps(meta, sort_keys=True), "tensors": tensors}

    @cached_property
    def sha256(self) -> str:
        """Content hash of every basis, eigenvalue, the damping and the checkpoints it was fitted at."""
        payload = self._payload()
        inner = state_dict_sha256(payload["tensors"])
        return hashlib.sha256(f"{payload['meta']}+{inner}".encode()).hexdigest()

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a torch file at ``path`` (refused if one exists, unless ``overwrite``)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise CaptureError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        if path.exists() and path.is_dir():
            raise CaptureError(f"{path} is a folder; give a file path for the curvature")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save(self._payload(), tmp)
        os.replace(tmp, path)
        self.path = str(path)

    def describe(self) -> str:
        return (
            f"K-FAC curvature of {len(self.layers[0]) if self.layers else 0} layers at {len(self.layers)} "
            f"checkpoints, fitted on {self.n_examples:,} examples, damping {self.damping:g} × mean eigenvalue"
        )


def load_curvature(path: str | os.PathLike) -> Curvature:
    """Read a file :meth:`Curvature.save` wrote; a one-line :class:`CaptureError` for anything else.

    Parameters
    ----------
    path
        The file ``fit_curvature(..., out)`` or ``trackin-ooc fit-curvature`` saved.

    Returns
    -------
    Curvature
        Per checkpoint, each layer's EK-FAC eigenbases and eigenvalues, with the damping they were fitted with.

    Raises
    ------
    CaptureError
        No file, not a curvature file, or one of another format version.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CaptureError(
            f"no curvature file at {path}; fit one with to.fit_curvature(model, checkpoints, "
            "train_data, path) (trackin-ooc fit-curvature)"
        ) from None
    except Exception as e:
        raise CaptureError(
            f"{path} is not a curvature file torch can read ({type(e).__name__}); fit one with "
            "to.fit_curvature (trackin-ooc fit-curvature)"
        ) from None
    try:
        meta = json.loads(payload["meta"])
        tensors = payload["tensors"]
        ok = meta.get("format") == FORMAT
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise CaptureError(f"{path} is not a trackin-ooc curvature file; fit one with to.fit_curvature")
    if meta.get("version") != FORMAT_VERSION:
        raise CaptureError(
            f"{path} is a curvature file of version {meta.get('version')}, this trackin-ooc reads "
            f"version {FORMAT_VERSION}; fit it again"
        )
    layers = [
        {
            x["module"]: KronLayer(
                x["module"],
                x["kind"],
                tuple(x["params"]),
                *(tensors[f"{c}/{x['module']}/{p}"] for p in ("q_out", "q_in", "eigenvalues")),
            )
            for x in meta["layers"]
        }
        for c in range(len(meta["checkpoint_hashes"]))
    ]
    return Curvature(
        list(meta["checkpoint_hashes"]), layers, float(meta["damping"]), int(meta["n_examples"]), str(path)
    )


def as_curvature(curvature) -> Curvature:
    """A :class:`Curvature` from itself or a path."""
    if isinstance(curvature, Curvature):
        return curvature
    if isinstance(curvature, (str, os.PathLike)):
        return load_curvature(curvature)
    raise CaptureError(
        f"curvature must be what to.fit_curvature returned or its file's path, got {type(curvature).__name__}"
    )


# ---- which layers ------------------------------------------------------------------------------------
def kfac_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, module, params) of the layers covering the selected parameters ``names``; a one-line
    CaptureError naming the first parameter outside a Linear/Conv layer (or a bias selected alone)."""
    owner = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = (mname, module, pname)
    chosen = set(names)
    out: list[tuple[str, str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for n in names:
        mname, module, pname = owner[n]
        if mname in seen:
            continue
        kind = KINDS.get(type(module))
        why = None
        if kind is None:
            why = f"is in a {type(module).__name__}, which K-FAC does not cover"
        elif kind != "linear" and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            why = "is in a convolution with groups, non-zero or string padding, which K-FAC here does not cover"
        elif (f"{mname}.weight" if mname else "weight") not in chosen:
            why = "is a bias selected without its layer's weight"
        if why or kind is None:
            raise CaptureError(f"parameter {n} {why}; {FIX_LAYERS}")
        seen.add(mname)
        prefix = f"{mname}." if mname else ""
        params = (f"{prefix}weight",) + ((f"{prefix}bias",) if f"{prefix}bias" in chosen else ())
        out.append((kind, mname, params))
    return out


def _unfold(kind: str, module: Any, x: torch.Tensor) -> torch.Tensor:
    """A layer's inputs per output position: (B, T, d_in) (T = 1 for Linear; d_in = in · kernel)."""
    if kind == "linear":
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if kind == "conv1d":
        x = x.unsqueeze(2)
        k, s, p, d = (
            (1, module.kernel_size[0]),
            (1, module.stride[0]),
            (0, module.padding[0]),
            (1, module.dilation[0]),
        )
    else:
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
    return F.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2)


def _positions(kind: str, delta: torch.Tensor) -> torch.Tensor:
    """Output gradients per position: (B, T, d_out)."""
    if kind == "linear":
        return delta.reshape(delta.shape[0], -1, delta.shape[-1])
    return delta.reshape(delta.shape[0], delta.shape[1], -1).transpose(1, 2)


class _Taps:
    """Forward hooks that keep each layer's (augmented, unfolded) inputs and output gradients of one batch."""

    def __init__(self, model: nn.Module, layers):
        modules = dict(model.named_modules())
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.handles = [
            modules[m].register_forward_hook(self._hook(kind, m, len(params) == 2)) for kind, m, params in layers
        ]

    def _hook(self, kind, name, bias):
        def hook(module, args, output):
            a = _unfold(kind, module, args[0].detach().to(torch.float64))
            if bias:
                a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], dim=2)
            self.inputs[name] = a
            if output.requires_grad:
                output.register_hook(lambda g: self.deltas.__setitem__(name, _positions(kind, g.to(torch.float64))))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _batch_pass(model, state, taps: _Taps, inputs, targets, loss_fn) -> int:
    """One forward and backward of the summed per-example losses (each example's δ is its own loss's)."""
    taps.inputs.clear()
    taps.deltas.clear()
    with torch.enable_grad():
        out = call_functional(model, state, inputs)
        losses = check_losses((loss_fn or default_loss)(out, targets), targets.shape[0])
        losses.sum().backward()
    return targets.shape[0]


def _fit_checkpoint(model, ck: Checkpoint, layers, loader, device, target_key, loss_fn) -> dict[str, KronLayer]:
    state = {
        k: (v.to(device).detach().requires_grad_(True) if v.is_floating_point() else v.to(device))
        for k, v in drop_tied_duplicates(model, ck.state_dict).items()
    }
    taps = _Taps(model, layers)
    try:
        cov_in: dict[str, torch.Tensor] = {}
        cov_out: dict[str, torch.Tensor] = {}
        n = 0
        for inputs, targets in batches(loader, device, target_key):
            n += _batch_pass(model, state, taps, inputs, targets, loss_fn)
            for _, m, _ in layers:
                a, d = taps.inputs[m], taps.deltas[m]
                cov_in[m] = cov_in.get(m, 0) + torch.einsum("bti,btj->ij", a, a)
                cov_out[m] = cov_out.get(m, 0) + torch.einsum("bti,btj->ij", d, d)
            for v in state.values():
                v.grad = None
        bases = {
            m: (torch.linalg.eigh(cov_out[m] / n).eigenvectors, torch.linalg.eigh(cov_in[m] / n).eigenvectors)
            for _, m, _ in layers
        }
        lam: dict[str, torch.Tensor] = {}
        for inputs, targets in batches(loader, device, target_key):
            _batch_pass(model, state, taps, inputs, targets, loss_fn)
            for _, m, _ in layers:
                a, d = taps.inputs[m], taps.deltas[m]
                qs, qa = bases[m]
                rows = max(1, FIT_ELEMENTS // (qs.shape[0] * qa.shape[0]))
                for s in range(0, a.shape[0], rows):
                    # Q_Sᵀ G Q_A per example, G = Σ_t δ_t ãᵀ_t, without forming G.
                    rotated = torch.einsum("bto,bti->boi", d[s : s + rows] @ qs, a[s : s + rows] @ qa)
                    lam[m] = lam.get(m, 0) + (rotated**2).sum(0)
            for v in state.values():
                v.grad = None
    finally:
        taps.close()
    return {
        m: KronLayer(m, kind, params, bases[m][0].cpu(), bases[m][1].cpu(), (lam[m] / n).cpu())
        for kind, m, params in layers
    }


def fit_curvature(
    model: nn.Module,
    checkpoints: Checkpoints,
    data,
    out: str | os.PathLike | None = None,
    *,
    layers: Sequence[str] | str | None = None,
    damping: float = DAMPING,
    loss_fn: LossFn | None = None,
    batch_size: int = 256,
    target_key: str = "labels",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> Curvature:
    """Fit the EK-FAC curvature of ``model``'s Linear and Conv layers at every checkpoint on ``data``.

    Parameters
    ----------
    model
        The architecture the checkpoints hold (as for :func:`trackin_ooc.capture`).
    checkpoints
        The same checkpoints the stores are captured from, in order.
    data
        The training data (a Dataset or an in-order DataLoader, batches as ``capture`` takes them).
    out
        Where to save it (a torch file; None: keep it in memory only). Refused if it exists, unless
        ``overwrite``.
    layers
        The parameters to cover, as ``capture``'s ``layers=`` (each must be a Linear, Conv1d or Conv2d
        layer's weight, with or without its bias); None: every parameter.
    damping
        λ per layer as a multiple of its mean eigenvalue (> 0).
    loss_fn, batch_size, target_key, device
        As for ``capture``.
    overwrite
        Replace an existing file at ``out``.

    Returns
    -------
    Curvature
        Pass it (or ``out``) as ``capture(..., preconditioner="kfac", curvature=...)``.

    Raises
    ------
    CaptureError
        A selected parameter outside a Linear/Conv layer, a non-positive damping, or ``out`` existing.
    """
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise CaptureError(
            f"damping must be a positive number (a multiple of each layer's mean eigenvalue), got {damping!r}"
        )
    if out is not None and Path(out).exists() and not overwrite:
        raise CaptureError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    names = select_parameters(model, layers)
    chosen = kfac_layers(model, names)
    loader = as_loader(data, batch_size)
    n = dataset_length(loader)
    ckpts = load_checkpoints(model, checkpoints, [1.0] * _count(model, checkpoints))
    dev = torch.device(device)
    model = model.to(dev).eval()
    fitted = [_fit_checkpoint(model, ck, chosen, loader, dev, target_key, loss_fn) for ck in ckpts]
    curvature = Curvature([ck.sha256 for ck in ckpts], fitted, float(damping), n)
    if out is not None:
        curvature.save(out, overwrite=overwrite)
    return curvature


def _count(model, checkpoints) -> int:
    from ..checkpoints import expand_checkpoints

    return len(expand_checkpoints(checkpoints))


def check_curvature(curvature: Curvature, checkpoints: Sequence[Checkpoint], names: Sequence[str]) -> None:
    """A one-line CaptureError unless ``curvature`` was fitted at exactly these checkpoints and covers exactly
    the selected parameters ``names``."""
    where = curvature.path or "the curvature given"
    if len(curvature.checkpoint_hashes) != len(checkpoints):
        raise CaptureError(
            f"{where} was fitted at {len(curvature.checkpoint_hashes)} checkpoints, the capture has "
            f"{len(checkpoints)}; fit it on the same checkpoints (to.fit_curvature)"
        )
    for ck, h in zip(checkpoints, curvature.checkpoint_hashes):
        if ck.sha256 != h:
            raise CaptureError(
                f"{where} was fitted at other weights than checkpoint {ck.name}; fit it again on "
                "these checkpoints (to.fit_curvature)"
            )
    have = curvature.parameters
    if set(have) != set(names):
        missing = next((n for n in names if n not in have), None)
        extra = next((n for n in have if n not in names), None)
        what = f"does not cover parameter {missing}" if missing else f"covers parameter {extra}, not selected"
        raise CaptureError(f"{where} {what}; fit it with the capture's layers= (to.fit_curvature(..., layers=...))")
