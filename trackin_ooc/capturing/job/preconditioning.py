"""Which preconditioner a capture uses, decided once from its checkpoints' moments (docs/preconditioning.md).

``"kfac"`` needs a curvature fitted on the train data first (``.curvature``), so "auto" picks it only when
``capture`` is given one; it is checked against the checkpoints and recorded in the spec.

``"auto"`` is "adam" when every checkpoint carries Adam moments that fit every selected parameter, else
the SGD form; one line of the "trackin_ooc" log says which and why. ``"adam"`` and ``"adafactor"`` refuse
a checkpoint without fitting moments in one line naming it. The decision goes into the spec (so into its
fingerprint), and each checkpoint's recorded hash then covers the moments used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from torch import nn

from ...errors import CaptureError, CheckpointError
from ...spec import PRECONDITIONERS, ProjectionSpec
from ..checkpoints import Checkpoint
from ..projection.preconditioner import MATRIX, preconditioner_layers

log = logging.getLogger("trackin_ooc")

# What ``preconditioner=`` (``--preconditioner``) may say; None means "none".
PRECONDITIONER_CHOICES = ("auto", *PRECONDITIONERS)
# Store attribute: where each checkpoint's moments were read (absent for the SGD form).
MOMENTS_ATTR = "preconditioner_moments"
# Store attribute of a "kfac" store: the curvature file it was captured with (capture_like passes it on).
CURVATURE_ATTR = "preconditioner_curvature"
# The preconditioners read from the optimizer's moments (``"kfac"`` reads a fitted curvature instead).
FROM_MOMENTS = ("adam", "adafactor")


def needs_moments(kind: str) -> bool:
    """Whether preconditioner ``kind`` (checked, or "auto") reads each checkpoint's Adam moments."""
    return kind == "auto" or kind in FROM_MOMENTS


def check_preconditioner(value: str | None) -> str:
    """``value`` as one of PRECONDITIONER_CHOICES (None → "none"); a CaptureError for anything else."""
    value = "none" if value is None else value
    if value not in PRECONDITIONER_CHOICES:
        raise CaptureError(
            f"unknown preconditioner {value!r}; use one of {', '.join(PRECONDITIONER_CHOICES)} (None: the SGD form)"
        )
    return value


def _short(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def resolve_preconditioner(value: str, checkpoints: Sequence[Checkpoint], names: Sequence[str]) -> str:
    """ "none", "adam" or "adafactor" for ``value`` (checked), given checkpoints loaded with their moments
    (``moments_for=names``) unless ``value`` is "none"."""
    if value in ("none", "kfac"):
        return value
    errors = [ck for ck in checkpoints if ck.moments_error]
    absent = [ck for ck in checkpoints if ck.moments is None or ck.moments.absent]
    if value == "auto":
        if not errors and not absent:
            log.info(
                "preconditioner='auto': adam (every checkpoint carries Adam moments for the %d selected "
                "parameters, read from %s); pass preconditioner=None for the SGD form",
                len(names),
                _short([ck.read_moments.where for ck in checkpoints]),
            )
            return "adam"
        if errors:
            log.warning(
                "preconditioner='auto': the SGD form (plain gradients), since checkpoint %s carries moments "
                "that do not fit: %s",
                errors[0].name,
                errors[0].moments_error,
            )
        else:
            why = absent[0].moments.absent if absent[0].moments is not None else "its moments were not read"
            log.info(
                "preconditioner='auto': the SGD form (plain gradients), since checkpoint %s carries no Adam "
                "moments (%s)",
                absent[0].name,
                why,
            )
        return "none"
    if errors:
        raise CheckpointError(errors[0].moments_error)
    if absent:
        ck = absent[0]
        why = ck.moments.absent if ck.moments is not None else "its moments were not read"
        raise CheckpointError(
            f"preconditioner={value!r} needs the Adam moments of every checkpoint, but checkpoint {ck.name} has "
            f"none: {why}; save the optimizer state with each checkpoint, or pass preconditioner=None "
            "(--preconditioner none) for the SGD form"
        )
    return value


def kfac_record(curvature) -> dict:
    """What a "kfac" spec records of its fitted curvature (part of the fingerprint): hash, damping, layers."""
    layers = curvature.layers[0].values() if curvature.layers else []
    return {
        "sha256": curvature.sha256,
        "damping": curvature.damping,
        "n_examples": curvature.n_examples,
        "layers": [{"kind": x.kind, "module": x.module, "params": list(x.params)} for x in layers],
    }


def check_kfac(spec: ProjectionSpec, curvature, checkpoints: Sequence[Checkpoint], names: Sequence[str]) -> None:
    """A one-line CaptureError unless preconditioner="kfac" can run: a curvature given, fitted at these
    checkpoints for these parameters, and a projection that forms per-example gradients."""
    if curvature is None:
        raise CaptureError(
            "preconditioner='kfac' needs curvature=: fit it on the train data with "
            "to.fit_curvature(model, checkpoints, train_data, 'curvature.pt') (trackin-ooc "
            "fit-curvature) and pass it, or its path, to every capture"
        )
    if spec.kind in ("factored", "factors"):
        raise CaptureError(
            f"preconditioner='kfac' works with exact gradients and the gaussian or rademacher "
            f"projection, not projection={spec.kind!r}; use one of those, or preconditioner='adam'"
        )
    from .curvature import check_curvature

    check_curvature(curvature, checkpoints, names)


def with_preconditioner(spec: ProjectionSpec, kind: str, model: nn.Module, curvature=None) -> ProjectionSpec:
    """``spec`` recording preconditioner ``kind`` and the layers whose moments take the rank-1 form (for
    "kfac", the fitted ``curvature``'s record; without one, as a capture plan sees it, none)."""
    if kind == "none":
        return spec
    if kind == "kfac":
        extra = dict(spec.extra)
        if curvature is not None:
            extra["kfac"] = kfac_record(curvature)
        return dataclasses.replace(spec, preconditioner="kfac", extra=tuple(sorted(extra.items())))
    layers = preconditioner_layers(kind, spec, model)
    spec = dataclasses.replace(spec, preconditioner=kind, preconditioner_layers=layers)
    if kind == "adam" and layers:
        modules = [m for k, m, _ in layers if k != MATRIX]
        log.info(
            "preconditioner='adam': %d layer%s of the %s projection (%s) use the Adafactor (rank-1) form of "
            "the moments, which keeps their factored structure; the other parameters the elementwise form",
            len(modules),
            "" if len(modules) == 1 else "s",
            spec.kind,
            _short(modules),
        )
    return spec


def recorded_hashes(checkpoints: Sequence[Checkpoint], kind: str) -> list[str]:
    """The checkpoint hashes a store records: with the moments used when preconditioned."""
    return [ck.recorded_sha256(kind in FROM_MOMENTS) for ck in checkpoints]


def moments_attrs(checkpoints: Sequence[Checkpoint], kind: str, curvature=None) -> dict:
    """Store attributes saying where each checkpoint's moments were read (none for the SGD form), or, for
    "kfac", which curvature file was used (None when it was given in memory only)."""
    if kind == "kfac":
        return {CURVATURE_ATTR: None if curvature is None else curvature.path}
    if kind == "none":
        return {}
    return {MOMENTS_ATTR: [ck.read_moments.where for ck in checkpoints]}
