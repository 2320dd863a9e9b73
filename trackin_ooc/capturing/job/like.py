"""capture_like: a test store captured with its train store's options, so that the two always combine.

The train store records what its feature space depends on: the checkpoints (their content hashes, and,
from this version on, the paths they were read from), the learning rates, the selected parameters, the
projection (kind, dimension, seed), the preconditioner, the storage dtype, the loss's name and the target
key of dict batches. ``capture_like`` reads them back and calls :func:`~.capture.capture` with them.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from torch import nn

from ...errors import ArgumentError, CaptureError, CheckpointError, CheckpointNotFoundError
from ...store import GradientStore, open_store
from ..checkpoints import expand_checkpoints, load_checkpoints
from .capture import capture
from .preconditioning import CURVATURE_ATTR, FROM_MOMENTS

# Options that define the feature space: a test store with other values would not combine with its train store.
FIXED = ("projection", "projection_dim", "seed", "layers", "learning_rates", "preconditioner")
DEFAULT_LOSS = "cross_entropy"


def _preconditioner(train: GradientStore) -> str:
    """The train store's preconditioner ("none" for the SGD form, and for stores made before there was one)."""
    value = getattr(train.spec, "preconditioner", None) or train.attrs.get("preconditioner") or "none"
    return str(value).lower()


def like_options(train: GradientStore | str | os.PathLike) -> dict[str, Any]:
    """The :func:`trackin_ooc.capture` options a store was captured with, as far as it records them.

    Parameters
    ----------
    train : GradientStore or path
        A store made by ``capture``.

    Returns
    -------
    dict
        ``checkpoints`` (absolute paths; None for a store that does not record them), ``learning_rates``,
        ``layers`` (parameter names), ``projection``, ``projection_dim``, ``seed``, ``dtype``,
        ``target_key``, ``preconditioner`` and ``loss`` (the loss function's name).

    Raises
    ------
    CaptureError
        The store holds features made outside ``capture`` (``from_arrays``).
    """
    train = open_store(train)
    spec = train.spec
    if spec.kind == "external":
        raise CaptureError(
            f"{train.path} holds features made by from_arrays, not by capture: there are no capture "
            "options to repeat; capture the test set with the same featurizer instead"
        )
    if spec.kind == "exact":
        projection, dim = "gaussian", None
    elif spec.kind == "factors":
        projection, dim = "factors", None
    else:
        projection, dim = spec.kind, int(spec.dim)
    paths = train.attrs.get("checkpoint_paths")
    return {
        "checkpoints": None if paths is None else list(paths),
        "learning_rates": [float(x) for x in train.learning_rates],
        "layers": [name for name, _ in spec.layers],
        "projection": projection,
        "projection_dim": dim,
        "seed": int(spec.seed) if dim is not None and spec.seed is not None else 0,
        "dtype": train.dtype,
        "target_key": str(train.attrs.get("target_key", "labels")),
        "preconditioner": _preconditioner(train),
        "loss": train.loss_name,
    }


def _checkpoints(train: GradientStore, given) -> list:
    if given is not None:
        return list(given) if isinstance(given, (list, tuple)) else [given]
    paths = train.attrs.get("checkpoint_paths")
    if paths is None:
        raise CaptureError(
            f"{train.path} records its checkpoints' names and hashes but not their paths (captured by an older "
            f"trackin-ooc): pass them, checkpoints=[...] (--checkpoint), in this order: "
            f"{', '.join(train.checkpoint_names)}"
        )
    if any(p is None for p in paths):
        missing = [n for n, p in zip(train.checkpoint_names, paths) if p is None]
        raise CaptureError(
            f"{train.path} was captured from state dicts in memory ({', '.join(missing)}): pass the same weights, "
            "checkpoints=[...] (--checkpoint)"
        )
    return list(paths)


def check_same_checkpoints(train: GradientStore, model: nn.Module, checkpoints: list) -> None:
    """Refuse, in one line, checkpoints other than the train store's (moved away, retrained, reordered).

    Hashed as the train store hashed them: a preconditioned store's hashes cover the optimizer moments too."""
    recorded = train.attrs.get("checkpoint_paths") or [None] * train.n_checkpoints
    checkpoints = expand_checkpoints(checkpoints)
    with_moments = _preconditioner(train) in FROM_MOMENTS  # "kfac" stores hash the weights alone
    try:
        loaded = load_checkpoints(
            model,
            checkpoints,
            list(train.learning_rates),
            moments_for=[n for n, _ in train.spec.layers] if with_moments else None,
        )
    except CheckpointNotFoundError as e:
        raise CheckpointNotFoundError(
            f"{e}; {train.path} was captured from {', '.join(p for p in recorded if p) or 'other paths'}: if the "
            "checkpoints moved, pass where they are now, checkpoints=[...] (--checkpoint)"
        ) from None
    except CaptureError as e:  # a different number of checkpoints: the learning rates do not fit
        if len(train.learning_rates) != len(checkpoints):
            raise CheckpointError(
                f"{len(checkpoints)} checkpoints given for a train store captured at {train.n_checkpoints} "
                f"({', '.join(train.checkpoint_names)}); pass the same checkpoints, in the same order"
            ) from None
        raise e
    for i, (ck, want) in enumerate(zip(loaded, train.checkpoint_hashes)):
        try:
            got = ck.recorded_sha256(with_moments)
        except ValueError:  # no moments where the train store used them: capture says why, in its words
            continue
        if want is not None and got != want:
            source = checkpoints[i]
            where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"#{i}"
            raise CheckpointError(
                f"checkpoint {where} is not the one "
                f"{train.path} was captured from as {train.checkpoint_names[i]} (its tensors hash to "
                f"{got[:12]}, the store recorded {want[:12]}): it was moved or overwritten; pass the train "
                "store's checkpoints, checkpoints=[...] (--checkpoint)"
            )


def capture_like(
    train: GradientStore | str | os.PathLike,
    model: nn.Module,
    data,
    path: str | os.PathLike | None,
    **overrides: Any,
) -> GradientStore:
    """Capture ``data`` with the options ``train`` was captured with: its checkpoints, learning rates, layers,
    projection (kind, dimension, seed), preconditioner, dtype and target key. The result combines with
    ``train`` and equals a :func:`trackin_ooc.capture` with those options spelled out.

    Parameters
    ----------
    train : GradientStore or path
        The train store (made by ``capture``).
    model : torch.nn.Module
        The model the checkpoints belong to.
    data : Dataset or DataLoader
        The examples to capture (the test set, or a few examples to explain).
    path : path, URL or None
        Where the new store goes; None keeps it in memory (a one-off query).
    **overrides
        Other :func:`trackin_ooc.capture` options: ``checkpoints`` (the same weights, say at a new place),
        ``loss_fn``, ``dtype``, ``target_key``, ``batch_size``, ``overwrite``, ``device``, ``progress``, ...

    Returns
    -------
    GradientStore

    Raises
    ------
    ArgumentError
        An override of what defines the feature space (projection, projection_dim, seed, layers,
        learning_rates, preconditioner): the store would not combine with ``train``.
    CheckpointError
        A checkpoint is not where the train store read it, or hashes differently (moved or overwritten).
    CaptureError
        ``train`` records no checkpoint paths (an older store) and none are given, or its loss is not the
        default and no ``loss_fn`` is given.
    """
    train = open_store(train)
    fixed = sorted(set(overrides) & set(FIXED))
    if fixed:
        raise ArgumentError(
            f"capture_like takes {', '.join(fixed)} from {train.path}: another value would make a store that does "
            "not combine with it; leave it out, or call capture() with every option"
        )
    options = like_options(train)
    checkpoints = _checkpoints(train, overrides.pop("checkpoints", None))
    if "loss_fn" not in overrides and options["loss"] not in (None, DEFAULT_LOSS):
        raise CaptureError(
            f"{train.path} was captured with the loss {options['loss']!r}: pass loss_fn= (--loss MOD:FN), the same "
            "loss or another differentiable metric of the examples"
        )
    check_same_checkpoints(train, model, checkpoints)
    kwargs = {
        k: options[k]
        for k in ("learning_rates", "layers", "projection", "projection_dim", "seed", "dtype", "target_key")
    }
    if "preconditioner" in inspect.signature(capture).parameters:
        # Always given: capture's own default ("auto") could pick another form than the train store's.
        kwargs["preconditioner"] = None if options["preconditioner"] == "none" else options["preconditioner"]
        if options["preconditioner"] == "kfac" and "curvature" not in overrides:
            kwargs["curvature"] = train.attrs.get(CURVATURE_ATTR)  # the file the train store was captured with
    elif options["preconditioner"] != "none":
        raise CaptureError(
            f"{train.path} was captured with the {options['preconditioner']!r} preconditioner, "
            "which this trackin-ooc cannot apply; use the version that made it"
        )
    kwargs.update(overrides)
    return capture(model, checkpoints, data, path, **kwargs)
