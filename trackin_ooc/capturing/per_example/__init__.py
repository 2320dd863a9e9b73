"""Per-example loss gradients: which parameters, which batches and losses, and how each parameter's
gradients are computed (hooks, vmap or a per-example loop)."""

from .batches import call_functional, call_model, split_batch
from .gradients import PerExampleGradients
from .layers import select_parameters
from .losses import LossFn, cross_entropy, default_loss, model_output_logits

__all__ = [
    "LossFn",
    "PerExampleGradients",
    "call_functional",
    "call_model",
    "cross_entropy",
    "default_loss",
    "model_output_logits",
    "select_parameters",
    "split_batch",
]
