"""Which stores may be combined: same projection, checkpoints, learning rates and dtype.

Two factor stores (``projection="factors"``) combine when their specs agree, i.e. every layer made the
same choice (factors or flat); their positions per layer may differ (say, test sequences longer than
train ones): the factor kernels sum over each side's own positions.

Stores captured with different preconditioners (the SGD form and an Adam-preconditioned one, say) are refused
with a line of their own: their scores would mix two different inner products.
"""

from __future__ import annotations

import numpy as np

from ..errors import IncompatibleStoresError
from .gradient_store import GradientStore


def check_compatible(test: GradientStore, train: GradientStore) -> None:
    """Raise IncompatibleStoresError saying how the two stores differ (and how to fix it)."""
    problems = []
    if test.feature_dim != train.feature_dim:
        problems.append(f"feature width {test.feature_dim} vs {train.feature_dim}")
    if test.has_factors != train.has_factors:
        which = "test" if test.has_factors else "train"
        problems.append(f"only the {which} store keeps per-layer factors (projection='factors')")
    elif test.spec.preconditioner != train.spec.preconditioner:
        a, b = test.spec.preconditioner, train.spec.preconditioner
        problems.append(
            f"they were captured with different preconditioners (test {a!r}, train {b!r}): capture the "
            f"test store with preconditioner={b!r} (--preconditioner {b}) from the train checkpoints"
        )
    elif test.fingerprint != train.fingerprint:
        diff = test.spec.difference(train.spec) or "fingerprints differ"
        problems.append(f"projection spec differs ({diff})")
    if test.n_checkpoints != train.n_checkpoints:
        problems.append(f"{test.n_checkpoints} vs {train.n_checkpoints} checkpoints")
    elif not np.allclose(test.learning_rates, train.learning_rates, rtol=1e-9, atol=0):
        problems.append(f"learning rates {list(test.learning_rates)} vs {list(train.learning_rates)}")
    elif test.spec.preconditioner == train.spec.preconditioner:  # else the hashes cover different things
        ha, hb = test.checkpoint_hashes, train.checkpoint_hashes
        bad = [i for i, (a, b) in enumerate(zip(ha, hb)) if a and b and a != b]
        if bad:
            moments = " (or optimizer moments)" if test.spec.preconditioner != "none" else ""
            problems.append(f"checkpoint {bad[0]} has different weights{moments} in the two stores")
    if test.dtype != train.dtype:
        problems.append(f"storage dtype {test.dtype} vs {train.dtype}")
    if problems:
        raise IncompatibleStoresError(
            f"stores {test.path} and {train.path} cannot be combined: {'; '.join(problems)}; "
            "capture both with the same checkpoints, layers, projection, seed, preconditioner and dtype"
        )
