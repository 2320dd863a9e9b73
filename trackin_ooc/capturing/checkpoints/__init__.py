"""Checkpoints as training runs write them: load safely, check they fit the model, find learning rates."""

from .loading import Checkpoint, check_fits, drop_tied_duplicates, load_checkpoints

__all__ = ["Checkpoint", "check_fits", "drop_tied_duplicates", "load_checkpoints"]
