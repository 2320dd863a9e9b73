"""trackin-ooc: TracIn (TracInCP) training-data influence for datasets that do not fit in memory.

store = capture(model, checkpoints, data, "train.zarr", projection_dim=2048)
self_influence(store); influence(test, train, out="inf.zarr"); top_k(test, train, k=10)
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._version import __version__
from .datamodeling import lds, lds_from_predictions, subset_predictions
from .errors import (
    ArgumentError,
    CaptureError,
    CheckpointError,
    CheckpointNotFoundError,
    ClusterError,
    CorruptChunkError,
    DemoOutputError,
    EmptyDatasetError,
    IncompatibleStoresError,
    IncompleteStoreError,
    JobqueueError,
    LoadError,
    NonFiniteError,
    NonFiniteWarning,
    OutputFormatError,
    OutputKindError,
    OutputOverlapsInputError,
    PlanningError,
    StaleIndexError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    TrackinError,
    ViewError,
)
from .indexing import build_index, open_index
from .net import net_influence
from .retraining import open_runs, retrain
from .scores import influence, plan_for, self_influence, top_k
from .spec import ProjectionSpec
from .store import GradientStore, from_arrays, open_store
from .store.index_store import TopKIndex
from .views import InfluenceView, plan_table_html, report, show, token_gradient_mass

if _TYPE_CHECKING:  # type checkers see the lazy names as what they are
    from .capturing import capture
    from .capturing.job.like import capture_like
    from .capturing.job.plan import plan_capture

# Names that import torch: loaded on first use, so a Dask worker or CLI call that only scores never loads it.
_LAZY = {
    "capture": ("trackin_ooc.capturing", "capture"),
    "capture_like": ("trackin_ooc.capturing.job.like", "capture_like"),
    "plan_capture": ("trackin_ooc.capturing.job.plan", "plan_capture"),
    "fit_curvature": ("trackin_ooc.capturing.job.curvature", "fit_curvature"),
    "load_curvature": ("trackin_ooc.capturing.job.curvature", "load_curvature"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trackin_ooc' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names too, so that dir(trackin_ooc) and tab completion list capture.
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "__version__",
    "capture",
    "capture_like",
    "plan_capture",
    "fit_curvature",
    "load_curvature",
    "from_arrays",
    "open_store",
    "GradientStore",
    "ProjectionSpec",
    "self_influence",
    "influence",
    "top_k",
    "plan_for",
    "build_index",
    "open_index",
    "TopKIndex",
    "StaleIndexError",
    "net_influence",
    "retrain",
    "open_runs",
    "lds",
    "subset_predictions",
    "lds_from_predictions",
    "show",
    "report",
    "InfluenceView",
    "ViewError",
    "plan_table_html",
    "token_gradient_mass",
    "TrackinError",
    "ArgumentError",
    "StoreError",
    "StoreExistsError",
    "IncompleteStoreError",
    "NonFiniteError",
    "NonFiniteWarning",
    "IncompatibleStoresError",
    "CorruptChunkError",
    "StoreLockedError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CaptureError",
    "EmptyDatasetError",
    "OutputOverlapsInputError",
    "OutputKindError",
    "OutputFormatError",
    "LoadError",
    "PlanningError",
    "ClusterError",
    "JobqueueError",
    "DemoOutputError",
]
