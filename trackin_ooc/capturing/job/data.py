"""Batches in dataset order from a Dataset or a non-shuffling DataLoader: ``(inputs, targets)`` pairs or
Hugging Face style dicts holding the targets under a key."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from ...errors import CaptureError, EmptyDatasetError
from ..per_example.batches import Inputs, split_batch, to_device


def as_loader(data, batch_size: int) -> DataLoader:
    """A DataLoader that yields examples in dataset order (ids 0..N-1)."""
    if isinstance(data, DataLoader):
        sampler = getattr(data.batch_sampler, "sampler", data.sampler)
        if not isinstance(sampler, SequentialSampler):
            raise CaptureError(
                "the DataLoader does not yield examples in dataset order (shuffle or a custom sampler); "
                "pass the Dataset itself or a DataLoader with shuffle=False"
            )
        return data
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise CaptureError(f"data must be a torch Dataset or DataLoader, got {type(data).__name__}")
    if batch_size <= 0:
        raise CaptureError(f"batch_size must be positive, got {batch_size}")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def dataset_length(loader: DataLoader) -> int:
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]  # a Dataset without __len__ raises TypeError
    except TypeError:
        raise CaptureError("the dataset has no length; trackin-ooc needs len(dataset) to lay out the store") from None
    if n == 0:
        raise EmptyDatasetError("the dataset is empty; give a dataset with at least one example")
    return n


def batches(
    loader: DataLoader, device: torch.device, target_key: str = "labels"
) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """(inputs, targets) on ``device``: inputs a tensor, a tuple of tensors, or a dict of keyword
    arguments (a Mapping batch without its ``target_key`` entry, which holds the targets)."""
    for item in loader:
        inputs, targets = split_batch(item, target_key)
        yield to_device(inputs, device), targets.to(device)
