"""The out-of-core engine: block planning, NumPy/CuPy kernels and Dask graphs (knows no PyTorch)."""

from .array_module import ArrayBackend, resolve_backend
from .planning import BlockPlan, plan_blocks

__all__ = ["ArrayBackend", "resolve_backend", "BlockPlan", "plan_blocks"]
