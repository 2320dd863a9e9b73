"""Capture: PyTorch checkpoints + data → per-example gradient features (knows torch, not Dask)."""

from .capture import capture
from .checkpoints import load_checkpoints
from .factored import describe_plan, factored_spec, plan_from_spec
from .layers import select_parameters
from .per_example import PerExampleGradients
from .projection import Projector, make_spec

__all__ = [
    "capture", "load_checkpoints", "select_parameters", "PerExampleGradients", "Projector", "make_spec",
    "factored_spec", "plan_from_spec", "describe_plan",
]
