"""Real, offline example material: scikit-learn's digits, small models, SGD with checkpoints.

Used by ``trackin-ooc demo``, the notebooks, the tests and the benchmarks.
"""

from .digits import DigitsSplit, load_digits_split
from .models import digits_cnn, digits_mlp
from .training import train_with_checkpoints

__all__ = ["DigitsSplit", "load_digits_split", "digits_cnn", "digits_mlp", "train_with_checkpoints"]
