"""Checkpoints as training runs write them: read safely in any common format (formats), fitted to the model
(fitting), hashed (hashing), with their learning rates (learning_rates) and Adam moments (moments); loading puts
these together."""

from .fitting import check_fits, drop_tied_duplicates, fit_state_dict
from .formats import expand_checkpoints
from .hashing import state_dict_sha256
from .loading import Checkpoint, load_checkpoints
from .moments import FoundMoments, Moments, ParamMoments, read_moments

__all__ = [
    "Checkpoint",
    "FoundMoments",
    "Moments",
    "ParamMoments",
    "check_fits",
    "drop_tied_duplicates",
    "expand_checkpoints",
    "fit_state_dict",
    "load_checkpoints",
    "read_moments",
    "state_dict_sha256",
]
