"""trackin-ooc: TracIn (TracInCP) training-data influence for datasets that do not fit in memory.

    store = capture(model, checkpoints, data, "train.zarr", projection_dim=2048)
    self_influence(store); influence(test, train, out="inf.zarr"); top_k(test, train, k=10)
"""

from ._version import __version__
from .errors import (
    ArgumentError,
    CaptureError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptChunkError,
    EmptyDatasetError,
    IncompatibleStoresError,
    IncompleteStoreError,
    NonFiniteError,
    NonFiniteWarning,
    OutputKindError,
    OutputOverlapsInputError,
    StaleIndexError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    TrackinError,
)
from .indexing import build_index, open_index
from .net import net_influence
from .scores import influence, plan_for, self_influence, top_k
from .spec import ProjectionSpec
from .store import GradientStore, from_arrays, open_store
from .store.index_store import TopKIndex
from .views import InfluenceView, ViewError, plan_table_html, report, show, token_gradient_mass


def __getattr__(name: str):
    # torch is imported only where capture runs: a Dask worker or CLI call that only scores never loads it.
    if name == "capture":
        from .capturing import capture

        globals()["capture"] = capture
        return capture
    raise AttributeError(f"module 'trackin_ooc' has no attribute {name!r}")


__all__ = [
    "__version__",
    "capture", "from_arrays", "open_store", "GradientStore", "ProjectionSpec",
    "self_influence", "influence", "top_k", "plan_for",
    "build_index", "open_index", "TopKIndex", "StaleIndexError", "net_influence",
    "show", "report", "InfluenceView", "ViewError", "plan_table_html", "token_gradient_mass",
    "TrackinError", "ArgumentError", "StoreError", "StoreExistsError", "IncompleteStoreError", "NonFiniteError",
    "NonFiniteWarning",
    "IncompatibleStoresError", "CorruptChunkError", "StoreLockedError", "CheckpointError",
    "CheckpointNotFoundError", "CaptureError", "EmptyDatasetError", "OutputOverlapsInputError", "OutputKindError",
]
