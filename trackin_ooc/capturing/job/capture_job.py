"""CaptureJob: everything needed to compute row blocks of a store, picklable, run in-process or as a Dask task.

A job loads the model's checkpoints and builds its featurizer once per :meth:`CaptureJob.run`, then
computes the row blocks it is given, in order, and writes each whole block to the store. Batches are
cut inside each block (block-relative), so a block's numbers do not depend on which blocks were
computed before it: a resumed or scaled-out capture writes the same bytes as a single uninterrupted
one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ...store import GradientStore
from ...store.backends import StorageOptions
from ..checkpoints import Checkpoint, drop_tied_duplicates, expand_checkpoints, load_checkpoints
from ..per_example.batches import split_batch
from ..per_example.losses import LossFn
from ..projection.features import make_featurizer
from ..projection.preconditioner import kfac_scales, preconditioner_scales
from .data import batches
from .device import resolve_device
from .finite import NONFINITE_POLICIES, check_finite
from .writer import BlockWriter

Block = tuple[int, int]


class BlockBatches:
    """Batch sampler: each block [start, stop) cut into batches of ``batch_size`` from its start."""

    def __init__(self, blocks: Sequence[Block], batch_size: int):
        self.blocks = list(blocks)
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.blocks:
            for s in range(start, stop, self.batch_size):
                yield list(range(s, min(stop, s + self.batch_size)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.blocks)


@dataclass
class CaptureJob:
    """A capture's inputs, resolved and checked by :func:`~.capture.capture`; the store is laid out already."""

    model: nn.Module
    checkpoints: list  # paths or state dicts, as the user gave them
    learning_rates: list[float]
    checkpoint_hashes: list[str]
    spec: ProjectionSpec
    dataset: Dataset
    batch_size: int
    loss_fn: LossFn | None = None
    collate_fn: Callable | None = None
    num_workers: int = 0
    pin_memory: bool = False
    device: str = "auto"
    nonfinite: str = "raise"
    target_key: str = "labels"  # the targets' key in Mapping batches
    per_example_methods: dict[str, str] | None = None  # {parameter: method}, see .methods
    curvature: Any = None  # preconditioner="kfac": the fitted Curvature (.curvature)

    def __post_init__(self):
        if self.nonfinite not in NONFINITE_POLICIES:
            raise CaptureError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.nonfinite!r}")

    def loader(self, blocks: Sequence[Block]) -> DataLoader:
        """Batches of ``blocks`` (in order), through the user's collate function and loader workers."""
        kwargs: dict[str, Any] = dict(
            collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        if self.collate_fn is None:
            kwargs.pop("collate_fn")
        return DataLoader(self.dataset, batch_sampler=BlockBatches(blocks, self.batch_size), **kwargs)

    def run(
        self,
        path: str | os.PathLike,
        blocks: Sequence[Block],
        *,
        storage_options: StorageOptions = None,
        on_rows: Callable[[int], None] | None = None,
        skip_written: bool = False,
        loaded: list[Checkpoint] | None = None,
    ) -> int:
        """Compute and write ``blocks`` of the store at ``path``; return how many blocks were written.

        ``skip_written`` re-checks the store's block flags first (a retried Dask task skips what an
        earlier try finished). ``loaded``: the checkpoints already loaded in this process (else they
        are loaded here, once, and checked against the hashes the store records).
        """
        store = GradientStore(path, storage_options=storage_options)
        if skip_written:
            done = store.blocks_done()
            blocks = [b for b in blocks if not done[b[0] // store.chunk_rows]]
        if not blocks:
            return 0
        dev = resolve_device(self.device)
        preconditioned = self.spec.preconditioner in ("adam", "adafactor")  # from the checkpoints' moments
        kfac = self.spec.preconditioner == "kfac"
        if kfac and (self.curvature is None or self.curvature.sha256 != dict(self.spec.extra)["kfac"]["sha256"]):
            raise CaptureError(
                "this store was captured with another fitted curvature than the one given; pass the "
                "curvature it was captured with (curvature=), or overwrite=True to start over"
            )
        if loaded is None:
            names = [n for n, _ in self.spec.layers] if preconditioned else None
            loaded = load_checkpoints(self.model, self.checkpoints, self.learning_rates, moments_for=names)
        ckpts = loaded
        bad = next((ck for ck in ckpts if preconditioned and (ck.moments is None or ck.moments.value is None)), None)
        if bad is not None:
            why = bad.moments.error or bad.moments.absent if bad.moments is not None else "they were not read"
            raise CaptureError(
                f"the Adam moments of checkpoint {bad.name} changed while the capture ran ({why}); "
                "rerun the capture once the checkpoints are final"
            )
        changed = [ck.name for ck, h in zip(ckpts, self.checkpoint_hashes) if ck.recorded_sha256(preconditioned) != h]
        if changed:
            raise CaptureError(
                f"checkpoint {', '.join(changed)} changed while the capture ran (its tensors"
                f"{' or optimizer moments' if preconditioned else ''} hash differently); "
                "rerun the capture once the checkpoints are final"
            )
        model = self.model.to(dev).eval()
        featurize = make_featurizer(model, self.spec, self.loss_fn, dev, methods=self.per_example_methods)
        writer = None
        try:
            # Every checkpoint is loaded (and moved to the device) once, outside the batch loop.
            states = [
                featurize.prepare(
                    {k: v.to(dev) for k, v in drop_tied_duplicates(model, ck.state_dict).items()},
                    kfac_scales(self.curvature, i, dev)
                    if kfac
                    else preconditioner_scales(self.spec, ck.read_moments, dev)
                    if preconditioned
                    else None,
                )
                for i, ck in enumerate(ckpts)
            ]
            writer = BlockWriter(store, blocks, with_labels=store.has_labels)
            loader = self.loader(blocks)
            for index, (inputs, targets) in zip(
                BlockBatches(blocks, self.batch_size), batches(loader, dev, self.target_key)
            ):
                b, start = targets.shape[0], index[0]
                if b != len(index):
                    raise CaptureError(
                        f"a batch of {len(index)} examples came back with {b} targets; "
                        "the collate function must keep one target per example"
                    )
                rows = check_finite(
                    featurize.rows(states, inputs, targets), start, self.nonfinite, store.checkpoint_names
                )
                rows.labels = targets.detach().cpu().numpy() if store.has_labels else None
                writer.add(rows)
                if on_rows is not None:
                    on_rows(b)
        except BaseException:
            if writer is not None:  # let queued block writes finish and stop the writer thread
                try:
                    writer.close()
                except Exception:
                    pass
            raise
        finally:
            featurize.close()
        written = writer.close()
        if written != len(blocks):
            raise CaptureError(
                f"the data yielded too few examples for {len(blocks) - written} row blocks; "
                "len(dataset) must equal the number of examples it yields"
            )
        return written


def probe_labels(dataset: Dataset, collate_fn: Callable | None, target_key: str = "labels") -> np.dtype | None:
    """dtype of per-example labels (targets that are one scalar per example), or None (sequences, ...)."""
    from torch.utils.data import default_collate

    collate = collate_fn or default_collate
    _, targets = split_batch(collate([dataset[0]]), target_key)
    return targets.numpy().dtype if targets.ndim == 1 else None


def loader_settings(loader: DataLoader) -> dict:
    """The parts of a user's DataLoader a job reuses on its own block batches."""
    return dict(
        batch_size=loader.batch_size or 1,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def checkpoints_as_given(checkpoints) -> list:
    """Paths as strings, state dicts as they are (a job ships these to workers); a run folder as the
    ``checkpoint-N`` folders it held now, so that every worker loads these same checkpoints."""
    return expand_checkpoints(checkpoints)
