"""Projections of per-example gradients: dense (seeded blocks), factored (layer hooks), or exact."""

from .dense import Projector, make_spec
from .factored import describe_plan, factored_spec, plan_from_spec

__all__ = ["Projector", "describe_plan", "factored_spec", "make_spec", "plan_from_spec"]
