"""Capture: PyTorch checkpoints + data → per-example gradient features in a store (knows torch, not Dask).

Rooms, each importing only those listed after it:

- ``job``: :func:`capture`, the capture job, block writing, resuming, scale-out on Dask workers;
- ``projection``: dense, factored and exact feature maps of per-example gradients;
- ``per_example``: layer selection, losses and model outputs, per-example gradient methods, exact norms;
- ``checkpoints``: checkpoint formats and learning rates.

Importing :mod:`trackin_ooc` does not import this package (nor torch); ``trackin_ooc.capture`` loads it.
"""

from .job import capture

__all__ = ["capture"]
