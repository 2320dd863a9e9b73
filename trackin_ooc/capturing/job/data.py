"""Batches in dataset order from a Dataset or a non-shuffling DataLoader."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from ...errors import CaptureError, EmptyDatasetError


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
        n = len(loader.dataset)
    except TypeError:
        raise CaptureError(
            "the dataset has no length; trackin-ooc needs len(dataset) to lay out the store"
        ) from None
    if n == 0:
        raise EmptyDatasetError("the dataset is empty; give a dataset with at least one example")
    return n


def batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[object, torch.Tensor]]:
    """(inputs, targets) on ``device``; inputs may be a tensor or a tuple of tensors."""
    for item in loader:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise CaptureError("each batch must be (inputs, targets); wrap the dataset to yield that pair")
        inputs, targets = item
        if isinstance(inputs, (tuple, list)):
            inputs = tuple(t.to(device) for t in inputs)
        else:
            inputs = inputs.to(device)
        yield inputs, torch.as_tensor(targets).to(device)
