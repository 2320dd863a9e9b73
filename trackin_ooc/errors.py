"""Exception types: each says what went wrong and how to fix it, in one line.

Every error trackin-ooc raises on purpose is a :class:`TrackinError` defined here (and exported from
``trackin_ooc``), so ``except trackin_ooc.TrackinError`` catches all of them.
"""

from __future__ import annotations


class TrackinError(Exception):
    """Base class for every error trackin-ooc raises on purpose."""


class ArgumentError(TrackinError, ValueError):
    """An argument has a value that cannot work (say k <= 0, or k above the train set's size)."""


class StoreError(TrackinError):
    """A gradient store cannot be opened, read or written as asked."""


class StoreExistsError(StoreError, FileExistsError):
    """The output location already holds data and ``overwrite`` was not given."""


class IncompleteStoreError(StoreError):
    """The store was never finished (capture interrupted); resume the capture first."""


class IncompatibleStoresError(TrackinError, ValueError):
    """Two stores cannot be combined: different projection, checkpoints or learning rates."""


class CheckpointError(TrackinError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path does not exist."""


class CaptureError(TrackinError, ValueError):
    """The capture arguments are inconsistent (learning rates, layers, data)."""


class EmptyDatasetError(CaptureError):
    """The dataset yields no examples."""


class CorruptChunkError(StoreError):
    """A stored chunk failed its checksum: the data on disk is damaged."""


class StoreLockedError(StoreError):
    """Another live process is writing this store."""


class NonFiniteError(CaptureError):
    """Gradients or losses of some examples are NaN or infinite."""


class NonFiniteWarning(UserWarning):
    """A store scored has examples flagged for NaN/inf gradients (stored as zeros)."""


class OutputOverlapsInputError(StoreError, ValueError):
    """The output location is an input's location, lies inside one, or contains one."""


class OutputKindError(StoreExistsError):
    """The output location holds something that this writer's ``overwrite`` must not replace."""


class StaleIndexError(StoreError):
    """The index was built for another train store, or an older version of it (the store was rewritten)."""


class OutputFormatError(TrackinError, ValueError):
    """The output's extension names no format the writer knows."""


class LoadError(TrackinError, ValueError):
    """A ``MOD:FN`` reference cannot be imported, found, or called."""


class PlanningError(TrackinError, ValueError):
    """The memory budget cannot hold even the smallest blocks."""


class ClusterError(TrackinError, RuntimeError):
    """The Dask scheduler cannot be reached or the local cluster cannot start."""


class JobqueueError(ClusterError, ValueError):
    """A batch-system cluster cannot be configured or started as asked."""


class ViewError(TrackinError, ValueError):
    """An example or argument the views cannot use (the message names it and the fix)."""


class DemoOutputError(TrackinError, FileExistsError):
    """The demo's output folder holds files the demo did not write."""
