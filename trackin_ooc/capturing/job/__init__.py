"""The capture job: lay out or resume a store, compute its row blocks in-process or on Dask workers, write them."""

from .capture import capture

__all__ = ["capture"]
