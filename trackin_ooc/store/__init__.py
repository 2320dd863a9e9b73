"""Gradient stores on disk or object storage: the only package that knows the layout."""

from .backends import is_remote, normalize_path
from .from_arrays import from_arrays
from .gradient_store import GradientStore, StoreLike, is_unfinished, open_store, store_kind
from .guard import prepare_output
from .rows import RowBlock

__all__ = [
    "GradientStore",
    "StoreLike",
    "RowBlock",
    "from_arrays",
    "open_store",
    "prepare_output",
    "store_kind",
    "is_unfinished",
    "is_remote",
    "normalize_path",
]
