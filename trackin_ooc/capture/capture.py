"""capture(): per-checkpoint per-example gradients → projection → row blocks of a gradient store."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import CaptureError
from ..progress import progress_bar
from ..store import GradientStore, prepare_output
from ..store.backends import StorageOptions
from ..store.layout import STORAGE_DTYPES
from ..store.lock import StoreLock
from .checkpoints import drop_tied_duplicates, load_checkpoints
from .data import as_loader, batches, dataset_length
from .factored import factored_spec
from .features import make_featurizer
from .layers import select_parameters
from .per_example import LossFn
from .projection import make_spec
from .writer import BlockWriter

log = logging.getLogger("trackin_ooc")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CaptureError("device 'cuda' was asked for but torch sees no CUDA device; use device='cpu'")
    return dev


def _loss_name(loss_fn) -> str:
    if loss_fn is None:
        return "cross_entropy"
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def capture(
    model: nn.Module,
    checkpoints: Sequence[str | os.PathLike | Mapping[str, torch.Tensor]],
    data,
    path: str | os.PathLike,
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
) -> GradientStore:
    """Write per-example loss gradients of ``data`` at every checkpoint to a gradient store at ``path``.

    Gradients are computed per batch with ``torch.func``, projected to ``projection_dim`` dims (or kept
    exact when it is None), and written in whole row blocks as they are produced, so memory holds a
    few blocks, never the whole matrix. The store is marked complete after its last block.

    ``projection="factored"`` never forms per-example gradients of Linear, Conv2d and Embedding
    layers: hooks collect each layer's inputs and output gradients in one batched forward and
    backward, and each side is projected on its own (docs/projection.md); ``projection_dim`` is
    then split across layers and the split is recorded in the spec.
    """
    if dtype not in STORAGE_DTYPES:
        raise CaptureError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    if not overwrite:  # refuse early; with overwrite the old store is removed only once inputs check out
        prepare_output(path, overwrite=False, storage_options=storage_options, what="gradient store")
    ckpts = load_checkpoints(model, checkpoints, learning_rates)
    names = select_parameters(model, layers)
    params = dict(model.named_parameters())
    if projection == "factored" and projection_dim is not None:
        spec = factored_spec(model, names, projection_dim, seed)
    else:
        spec = make_spec(projection, projection_dim, seed, [(n, tuple(params[n].shape)) for n in names])
    loader = as_loader(data, batch_size)
    n = dataset_length(loader)
    t0 = time.perf_counter()

    model = model.to(dev).eval()
    featurize = make_featurizer(model, spec, loss_fn, dev)
    lock = StoreLock(path, storage_options)  # one writer per store; released even on failure
    lock.acquire()
    try:
        # Every checkpoint is loaded (and moved to the device) once, outside the batch loop.
        states = [
            featurize.prepare({k: v.to(dev) for k, v in drop_tied_duplicates(model, ck.state_dict).items()})
            for ck in ckpts
        ]
        store = _capture_batches(featurize, states, ckpts, spec, loader, n, dev, path, loss_fn=loss_fn,
                                 dtype=dtype, chunk_rows=chunk_rows, overwrite=overwrite,
                                 storage_options=storage_options, progress=progress)
    finally:
        featurize.close()
        lock.release()
    log.info(
        "captured %d examples × %d checkpoints (%s) into %s in %.1f s, per-example method %s",
        n, len(ckpts), spec.describe(), store.path, time.perf_counter() - t0, featurize.method,
    )
    return store


def _capture_batches(featurize, states, ckpts, spec, loader, n, dev, path, *, loss_fn, dtype, chunk_rows,
                     overwrite, storage_options, progress) -> GradientStore:
    """The batch loop: features per batch and checkpoint into row blocks written in the background."""
    store: GradientStore | None = None
    writer = None
    seen = 0

    try:
        with progress_bar(total=n, desc="capture", unit="ex", enabled=progress) as bar:
            for inputs, targets in batches(loader, dev):
                b = targets.shape[0]
                if seen + b > n:
                    raise CaptureError(f"the data yielded more than len(dataset)={n} examples")
                labels = targets.detach().cpu().numpy() if targets.ndim == 1 else None
                if store is None:
                    store = GradientStore.create(
                        path,
                        n_checkpoints=len(ckpts),
                        n_examples=n,
                        spec=spec,
                        learning_rates=[ck.learning_rate for ck in ckpts],
                        dtype=dtype,
                        checkpoint_names=[ck.name for ck in ckpts],
                        checkpoint_hashes=[ck.sha256 for ck in ckpts],
                        loss_name=_loss_name(loss_fn),
                        label_dtype=None if labels is None else labels.dtype,
                        chunk_rows=chunk_rows,
                        overwrite=overwrite,
                        storage_options=storage_options,
                    )
                    with_labels = labels is not None
                    writer = BlockWriter(store, with_labels=with_labels)
                f, loss = featurize(states, inputs, targets)  # (C, b, dim), (C, b)
                feats = f.detach().to("cpu", torch.float32).numpy()
                losses = loss.detach().to("cpu", torch.float32).numpy()
                writer.add(feats, losses, labels if with_labels else None)
                seen += b
                bar.update(b)
    except BaseException:
        if writer is not None:  # let queued block writes finish and stop the writer thread
            try:
                writer.close()
            except Exception:
                pass
        raise
    if writer is None:
        raise CaptureError("the data yielded no batches although len(dataset) > 0")
    writer.close()
    if seen != n:
        raise CaptureError(f"the data yielded {seen} examples but len(dataset) is {n}; fix the dataset")
    store.mark_complete()
    return store
