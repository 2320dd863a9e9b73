"""Per-example loss gradients: which parameters, which loss, and how each layer's gradients are computed."""

from .layers import select_parameters
from .losses import LossFn, cross_entropy
from .vmap import PerExampleGradients

__all__ = ["LossFn", "PerExampleGradients", "cross_entropy", "select_parameters"]
