"""capture(): per-checkpoint per-example gradients → projection → row blocks of a gradient store."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import CaptureError
from ...progress import progress_bar
from ...spec import ProjectionSpec
from ...store import GradientStore, backends
from ...store.backends import StorageOptions
from ...store.gradient_store import existing_store
from ...store.guard import Existing, check_output_location
from ...store.layout import STORAGE_DTYPES, default_chunk_rows
from ...store.lock import StoreLock
from ..checkpoints import Checkpoint, load_checkpoints
from ..per_example.layers import select_parameters
from ..per_example.losses import LossFn
from ..projection.dense import make_spec
from ..projection.factored import factored_spec
from .capture_job import CaptureJob, checkpoints_as_given, loader_settings, probe_labels
from .data import as_loader, dataset_length
from .device import resolve_device
from .factor_layout import store_layout
from .methods import choose_per_example_methods, probe_batch
from .plan import announce, estimate_line
from .preconditioning import (
    check_kfac,
    check_preconditioner,
    moments_attrs,
    needs_moments,
    recorded_hashes,
    resolve_preconditioner,
    with_preconditioner,
)
from .resume import StoreSettings, check_resumable

log = logging.getLogger("trackin_ooc")

# What ``projection=`` may name ("factors": exact scores from per-layer factors, projection_dim=None).
CAPTURE_PROJECTIONS = ("gaussian", "rademacher", "factored", "factors")


def _loss_name(loss_fn: LossFn | None) -> str:
    if loss_fn is None:
        return "cross_entropy"
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def capture(
    model: nn.Module,
    checkpoints: Sequence[str | os.PathLike[str] | Mapping[str, torch.Tensor]],
    data: Any,
    path: str | os.PathLike[str] | None,
    *,
    learning_rates: Sequence[float] | None = None,
    loss_fn: LossFn | None = None,
    layers: Sequence[str] | str | None = None,
    projection_dim: int | None = None,
    projection: str = "gaussian",
    seed: int = 0,
    batch_size: int = 256,
    dtype: str = "float32",
    overwrite: bool = False,
    device: str | torch.device | None = "auto",
    chunk_rows: int | None = None,
    storage_options: StorageOptions = None,
    progress: bool | None = None,
    nonfinite: str = "raise",
    client: Any = None,
    target_key: str = "labels",
    preconditioner: str | None = "auto",
    curvature: Any = None,
) -> GradientStore:
    """Write per-example loss gradients of ``data`` at every checkpoint to a gradient store at ``path``.

    Gradients are computed per batch with ``torch.func``, projected to ``projection_dim`` dims (or kept
    exact when it is None), and written in whole row blocks as they are produced, so memory holds a
    few blocks, never the whole matrix. The store is marked complete after its last block.

    An incomplete store at ``path`` left by the same capture (killed, say) is resumed: only its
    unwritten row blocks are computed. ``overwrite=True`` starts over instead.

    ``projection="factored"`` never forms per-example gradients of Linear, Conv2d and Embedding
    layers: hooks collect each layer's inputs and output gradients in one batched forward and
    backward, and each side is projected on its own (docs/projection.md); ``projection_dim`` is
    then split across layers and the split is recorded in the spec.

    ``projection="factors"`` (``projection_dim=None``) keeps gradients exact but stores each Linear, Conv
    or Embedding layer as its inputs and output gradients per position where that is cheaper to store and
    to score than the flat gradient (store layout version 2); scores stay exact (docs/projection.md).

    ``nonfinite="raise"`` refuses NaN/inf gradients or losses with the example ids; ``"flag"`` stores
    those examples as zeros and lists them in ``store.nonfinite_examples()``.

    ``data`` yields ``(inputs, targets)`` or Mappings (Hugging Face style): a Mapping batch calls
    ``model(**batch)`` without its ``target_key`` entry, which holds the targets. With ``loss_fn=None``
    the loss is cross-entropy for logits (B, C), or the causal LM loss summed over tokens for logits
    (B, T, V) with targets (B, T); the model may return a tensor, a tuple or an object with ``logits``.
    Each parameter's per-example gradients come from one batched pass through layer hooks where its
    layer type allows, else from vmap, else a per-example loop; the choice is recorded in
    ``store.attrs["per_example_methods"]``.

    With ``client`` (a ``distributed.Client``; the active one is not used implicitly) the row blocks are
    computed as Dask tasks on its workers, each writing its own chunks of the same store.

    ``path=None`` keeps the store in this process's memory (freed with the returned store): a one-off
    query of a few examples ("why this prediction") that every scoring function takes like one on disk.
    Before any gradient is computed, the size the store will take is announced (``plan_capture`` gives
    the same estimate without capturing).

    ``preconditioner``: ``"adam"`` stores the features of P_c^{1/2} g_c with P_c = diag(1/(√v̂_c + ε)) from
    checkpoint c's Adam moments (so influence = Σ_c η_c g'ᵀ P_c g); the factored projection's layers and a
    factors store's factor layers take the rank-1 (Adafactor) form of those moments. ``"adafactor"``: the
    rank-1 form for every weight matrix. ``"auto"`` (default): "adam" when every checkpoint carries Adam moments
    for the selected parameters, else the SGD form, said in one log line. None / ``"none"``: the SGD form
    (plain gradients). Moments are read from the optimizer state saved with each checkpoint (a Trainer
    folder's ``optimizer.pt``); capture a test store from the same checkpoints as its train store
    (docs/preconditioning.md). ``"kfac"``: P_c = (F_c + λ)^{-1} from the EK-FAC curvature
    :func:`trackin_ooc.fit_curvature` fitted at each checkpoint on the train data, given as ``curvature=``
    (what it returned, or its file) to the train and the test capture alike; Linear and Conv layers only,
    exact or gaussian/rademacher projections; "auto" picks it when ``curvature`` is given, and only then.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture; each checkpoint's weights are loaded into it in turn.
    checkpoints : sequence of paths or state dicts
        Saved checkpoints (torch files, Lightning files, Hugging Face Trainer folders, safetensors).
    data : Dataset or DataLoader
        The examples, in the order their rows are stored.
    path : str, path or None
        Where the Zarr store goes (local or ``s3://``); None keeps it in memory.
    learning_rates : sequence of float, optional
        η_c per checkpoint; default: read from each checkpoint (its optimizer state or recorded rate).
    loss_fn : callable, optional
        ``loss_fn(output, targets)`` giving one loss per example; default cross-entropy or causal LM loss.
    layers : sequence of str or str, optional
        Parameter or module names (or a glob) whose gradients are captured; default: every trainable one.
    projection_dim : int, optional
        Stored features per example and checkpoint; None keeps gradients exact.
    projection : {"gaussian", "rademacher", "factored", "factors"}
        How gradients are projected (see docs/projection.md for which to pick).
    seed : int
        Seed of the random projection: train and test stores must share it.
    batch_size : int
        Examples per forward and backward pass.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of the features.
    overwrite : bool
        Replace an earlier gradient store at ``path`` instead of resuming or refusing.
    device : str or torch.device
        Where gradients are computed ("auto": CUDA when available).
    chunk_rows : int, optional
        Rows per Zarr chunk (and per written block); default from the feature width.
    storage_options : dict, optional
        fsspec options for a remote ``path``.
    progress : bool, optional
        Force the progress bar on or off; default: on a terminal or in Jupyter.
    nonfinite : {"raise", "flag"}
        What to do with examples whose gradients or losses are NaN/inf.
    client : distributed.Client, optional
        Compute the row blocks as tasks on this scheduler's workers.
    target_key : str
        The key holding the targets in Mapping batches.
    preconditioner : {"auto", "adam", "adafactor", "kfac", "none"} or None
        Optimizer- or curvature-aware gradients (above).
    curvature : Curvature, str or path, optional
        The fitted EK-FAC curvature for ``preconditioner="kfac"`` (what ``fit_curvature`` returned, or its file).

    Returns
    -------
    GradientStore
        The complete store, opened for reading.

    Raises
    ------
    CaptureError
        Bad options or data (an unknown projection or dtype, a batch without targets, ...).
    CheckpointError
        A checkpoint cannot be loaded, or has no moments where ``preconditioner="adam"`` needs them.
    StoreExistsError
        A different store is at ``path`` and ``overwrite`` is False.
    NonFiniteError
        NaN/inf gradients with ``nonfinite="raise"``.
    """
    in_memory = path is None
    if path is None:
        path = backends.new_memory_location("capture")
    if dtype not in STORAGE_DTYPES:
        raise CaptureError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if projection not in CAPTURE_PROJECTIONS:  # also without projection_dim: a typo never means exact
        raise CaptureError(
            f"unknown projection {projection!r}; use one of {', '.join(CAPTURE_PROJECTIONS)} "
            "(projection_dim=None with the default 'gaussian' keeps gradients exact)"
        )
    dev = resolve_device(device) if client is None else None
    # The output rule, once: never on or around a checkpoint; overwrite replaces only an earlier gradient store.
    checked = check_output_location(
        path,
        checkpoints_as_given(checkpoints),
        kind="gradients",
        overwrite=overwrite,
        resumable=True,
        input_what="checkpoint",
        inside_inputs_ok=True,
        storage_options=storage_options,
    )
    if not overwrite:  # refuse early; with overwrite the old store is removed only once inputs check out
        existing_store(path, storage_options)
    preconditioner = check_preconditioner(preconditioner)
    if preconditioner == "auto" and curvature is not None:  # a fitted curvature given: what it is for
        log.info("preconditioner='auto': kfac (a fitted curvature was given)")
        preconditioner = "kfac"
    names = select_parameters(model, layers)
    ckpts = load_checkpoints(
        model, checkpoints, learning_rates, moments_for=names if needs_moments(preconditioner) else None
    )
    if preconditioner == "kfac" and curvature is not None:
        from .curvature import as_curvature

        curvature = as_curvature(curvature)
    elif curvature is not None:
        raise CaptureError(
            f"curvature= is for preconditioner='kfac', not {preconditioner!r}; pass "
            "preconditioner='kfac' or leave curvature out"
        )
    params = dict(model.named_parameters())
    loader = as_loader(data, batch_size)
    n = dataset_length(loader)
    if projection == "factored" and projection_dim is not None:
        # One example, run once: each convolution's output positions decide how its gradient is projected.
        example, _ = probe_batch(loader.dataset, loader.collate_fn, target_key, 1, torch.device("cpu"))
        spec = factored_spec(model, names, projection_dim, seed, example=example)
    elif projection == "factors" and projection_dim is not None:
        raise CaptureError("projection='factors' keeps gradients exact: leave projection_dim out (None)")
    else:
        spec = make_spec(projection, projection_dim, seed, [(n, tuple(params[n].shape)) for n in names])
    layout = store_layout(spec, projection, model, names, loader, dev, target_key)  # "factors": per-layer choices
    kind = resolve_preconditioner(preconditioner, ckpts, names)
    if kind == "kfac":
        check_kfac(layout.spec, curvature, ckpts, names)
    spec = with_preconditioner(layout.spec, kind, model, curvature)
    settings = loader_settings(loader)
    label_dtype = probe_labels(loader.dataset, settings["collate_fn"], target_key)
    job = CaptureJob(
        model=model,
        checkpoints=checkpoints_as_given(checkpoints),
        learning_rates=[ck.learning_rate for ck in ckpts],
        checkpoint_hashes=recorded_hashes(ckpts, kind),
        spec=spec,
        dataset=loader.dataset,
        loss_fn=loss_fn,
        nonfinite=nonfinite,
        target_key=target_key,
        device=str(dev) if dev is not None else ("auto" if device is None else str(device)),
        **settings,
        curvature=curvature if kind == "kfac" else None,
    )
    job.per_example_methods = choose_per_example_methods(job, ckpts[0], dev)
    wanted = StoreSettings(
        n_checkpoints=len(ckpts),
        n_examples=n,
        feature_dim=layout.feature_dim,
        fingerprint=spec.fingerprint,
        learning_rates=tuple(job.learning_rates),
        checkpoint_hashes=tuple(job.checkpoint_hashes),
        dtype=dtype,
        loss_name=_loss_name(loss_fn),
        label_dtype=None if label_dtype is None else str(label_dtype),
        chunk_rows=None if chunk_rows is None else max(1, min(int(chunk_rows), n)),
        factors=layout.factors,
        preconditioner=spec.preconditioner,
    )
    t0 = time.perf_counter()
    lock = StoreLock(path, storage_options)  # one writer per store; released even on failure
    lock.acquire()
    try:
        store, blocks = _open_or_create(
            path,
            wanted,
            spec,
            ckpts,
            overwrite=overwrite,
            checked=checked,
            storage_options=storage_options,
            extra_attrs={
                "per_example_methods": job.per_example_methods,
                **_like_attrs(job),
                **layout.store_attrs,
                **moments_attrs(ckpts, kind, curvature),
            },
        )
        if blocks:
            announce(
                estimate_line(n, len(ckpts), layout.feature_dim, layout.factors, dtype, None if in_memory else path),
                progress,
            )
        if blocks and client is not None:
            from .scale_out import run_on_cluster

            run_on_cluster(client, job, store.path, blocks, storage_options=storage_options, progress=progress)
        elif blocks:
            rows = sum(stop - start for start, stop in blocks)
            with progress_bar(total=rows, desc="capture", unit="ex", enabled=progress) as bar:

                def advance(done: int) -> None:
                    bar.update(done)

                job.run(store.path, blocks, storage_options=storage_options, on_rows=advance, loaded=ckpts)
        store = GradientStore(store.path, storage_options=storage_options)
        store.mark_complete()
    finally:
        lock.release()
    log.info(
        "captured %d examples × %d checkpoints (%s) into %s in %.1f s (%d of %d row blocks this run)",
        n,
        len(ckpts),
        spec.describe(),
        store.path,
        time.perf_counter() - t0,
        len(blocks),
        len(store.row_blocks()),
    )
    if in_memory:
        backends.release_with(store, store.path)
    return store


def _like_attrs(job: CaptureJob) -> dict[str, Any]:
    """What ``capture_like`` needs beyond the spec: where the checkpoints were read (absolute paths; None for
    a state dict given in memory) and the target key of Mapping batches."""
    paths = [
        None if isinstance(c, Mapping) else (os.fspath(c) if "://" in os.fspath(c) else os.path.abspath(c))
        for c in job.checkpoints
    ]
    return {"checkpoint_paths": paths, "target_key": job.target_key}


def _open_or_create(
    path: str | os.PathLike[str],
    wanted: StoreSettings,
    spec: ProjectionSpec,
    ckpts: Sequence[Checkpoint],
    *,
    overwrite: bool,
    checked: Existing,
    storage_options: StorageOptions,
    extra_attrs: dict[str, Any] | None = None,
) -> tuple[GradientStore, list[tuple[int, int]]]:
    """(store, row blocks to write): a resumed store's missing blocks, or every block of a new one (laid out
    where ``checked``, what the output rule found, allows: with overwrite the earlier store is removed)."""
    if not overwrite:
        store = existing_store(path, storage_options)  # again, now under the lock
        if store is not None:
            blocks = check_resumable(store, wanted)
            log.info("resuming %s: %d of %d row blocks left", store.path, len(blocks), len(store.row_blocks()))
            return store, blocks
    rows = wanted.chunk_rows or default_chunk_rows(
        wanted.row_width, wanted.n_checkpoints, wanted.dtype, wanted.n_examples
    )
    store = GradientStore.create(
        path,
        n_checkpoints=wanted.n_checkpoints,
        n_examples=wanted.n_examples,
        spec=spec,
        learning_rates=list(wanted.learning_rates),
        dtype=wanted.dtype,
        checkpoint_names=[ck.name for ck in ckpts],
        checkpoint_hashes=list(wanted.checkpoint_hashes),
        loss_name=wanted.loss_name,
        label_dtype=wanted.label_dtype,
        chunk_rows=rows,
        storage_options=storage_options,
        with_norms=True,
        extra_attrs=extra_attrs,
        factors=wanted.factors,
        feature_dim=wanted.feature_dim,
        checked=checked,
    )
    return store, store.row_blocks()
