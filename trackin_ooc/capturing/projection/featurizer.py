"""The featurizer interface: what a capture job asks of every way of turning a batch into store rows.

Three kinds implement it: :class:`~.features.DenseFeatures` (per-example gradients, dense projection or
exact), :class:`~.hooks.FactoredFeatures` (the factored projection through layer hooks) and
:class:`~.factors.FactorsFeatures` (exact per-layer factors). A job calls :meth:`Featurizer.prepare` once
per checkpoint, then :meth:`Featurizer.rows` once per batch with every prepared state, and
:meth:`Featurizer.close` at the end; it never asks which kind it holds.

:class:`FeaturizerBase` makes :meth:`~Featurizer.rows` from the kind's ``__call__`` (device tensors) and its
:meth:`~FeaturizerBase.to_host`; :class:`HookedFeaturizer` is what the two hook-based kinds share: their
model, loss and device, the forward hooks they open and close, and the one-time check that the hooks see a
weight's whole batch gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ...store.rows import RowBlock
from ..per_example.losses import LossFn, default_loss
from .preconditioner import Scales


@runtime_checkable
class Featurizer(Protocol):
    """One batch at every checkpoint → a :class:`~trackin_ooc.store.rows.RowBlock` of features, losses and
    exact squared gradient norms."""

    def prepare(self, state: dict[str, torch.Tensor], scales: Scales | None = None) -> Any:
        """A checkpoint's state (and preconditioner ``scales``, or None for plain gradients), made ready once."""
        ...

    def rows(self, states: Sequence[Any], inputs: Any, targets: torch.Tensor) -> RowBlock:
        """The batch's rows at every prepared checkpoint (``states``), on the host."""
        ...

    def close(self) -> None:
        """Remove whatever the featurizer attached to the model (hooks)."""
        ...


def host(x: torch.Tensor) -> np.ndarray:
    """A float32 NumPy copy of a device tensor."""
    return x.detach().to("cpu", torch.float32).numpy()


class FeaturizerBase:
    """:meth:`rows` from ``__call__`` (features, losses (C, B), squared norms (C, B) as device tensors)."""

    def __call__(
        self, states: Sequence[Any], inputs: Any, targets: torch.Tensor
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to_host(self, features: Any) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """(flat features (C, B, F) float32, per-layer factor arrays by store name or None) on the host."""
        return host(features), None

    def rows(self, states: Sequence[Any], inputs: Any, targets: torch.Tensor) -> RowBlock:
        features, losses, sq_norms = self(states, inputs, targets)
        grads, factors = self.to_host(features)
        return RowBlock(grads, host(losses), sq_norms=host(sq_norms), factors=factors)

    def close(self) -> None:
        pass

    def __enter__(self) -> FeaturizerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HookedFeaturizer(FeaturizerBase):
    """Forward hooks (``taps``, each with a ``handle``) on chosen layers of ``model``, removed by :meth:`close`."""

    method: ClassVar[str]

    def __init__(
        self, model: nn.Module, spec: ProjectionSpec, loss_fn: LossFn | None, device: torch.device | str
    ) -> None:
        self.model = model
        self.spec = spec
        self.loss_fn = loss_fn or default_loss
        self.device = torch.device(device)
        self.taps: list[Any] = []
        self._checked = False  # the hooks' batch gradients are compared once, on the first batch

    @contextlib.contextmanager
    def _opening(self) -> Iterator[None]:
        """Around opening the hooks: a failure removes the ones already opened."""
        try:
            yield
        except Exception:
            self.close()
            raise

    @staticmethod
    def _require_batch_gradient(have: torch.Tensor, want: torch.Tensor, problem: str) -> None:
        """Raise ``CaptureError(problem)`` unless the hooks' batch gradient ``have`` matches autograd's ``want``."""
        err = (have - want).abs().max().item()
        if err > 1e-3 * max(want.abs().max().item(), 1e-12) + 1e-6:
            raise CaptureError(problem)

    def close(self) -> None:
        for t in self.taps:
            t.handle.remove()
        self.taps = []
