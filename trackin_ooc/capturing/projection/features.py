"""Featurizers: one batch at every checkpoint → (features (C, B, dim), per-example losses (C, B),
exact squared gradient norms (C, B)).

Three kinds behind one interface (:class:`~.featurizer.Featurizer`: ``prepare(state, scales)`` once per
checkpoint, then ``rows(...)`` per batch with all prepared states, making a
:class:`~trackin_ooc.store.rows.RowBlock`; ``scales``: the checkpoint's preconditioner,
:class:`~.preconditioner.Scales`, or None for plain gradients): :class:`DenseFeatures` forms per-example
gradients (torch.func) and projects them densely or keeps them exact, in micro-batches sized to a memory
budget, all checkpoints in one pass over the projection matrix (each block is generated at most once per
micro-batch, even when the matrix is larger than the block cache); :class:`~.hooks.FactoredFeatures`
never forms them (factored projection through layer hooks); :class:`~.factors.FactorsFeatures` keeps
exact per-layer factors.
"""

from __future__ import annotations

import os

import psutil
import torch
from torch import nn

from ...spec import ProjectionSpec
from ..per_example.batches import slice_inputs
from ..per_example.gradients import PerExampleGradients
from ..per_example.losses import LossFn
from ..per_example.norms import dense_sq_norms
from .dense import Projector
from .featurizer import Featurizer, FeaturizerBase
from .preconditioner import Scales

# Bytes the per-example gradients of one micro-batch may take; default: a share of free memory.
MEMORY_ENV = "TRACKIN_OOC_CAPTURE_MEMORY"


def capture_memory_budget(device: torch.device) -> int:
    """Bytes for per-example gradients at once: $TRACKIN_OOC_CAPTURE_MEMORY, else ¼ of free device
    memory (GPU) or ⅛ of available RAM (CPU)."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        return int(float(env))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return psutil.virtual_memory().available // 8


def micro_batch_size(batch: int, n_parameters: int, budget: int, n_checkpoints: int = 1) -> int:
    """Examples per micro-batch so that their float32 gradients at every checkpoint, plus twice one
    checkpoint's for vmap's temporaries, fit ``budget`` bytes."""
    per_example = 4 * max(1, n_parameters) * (n_checkpoints + 2)
    return max(1, min(batch, budget // per_example))


class DenseFeatures(FeaturizerBase):
    """Per-example gradients of the selected parameters, then the dense projection (or exact).

    ``methods``: the per-example method of each parameter ({name: "hooks" | "vmap" | "loop"}), chosen
    before the capture; None: chosen on the first batch (:class:`PerExampleGradients`).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ProjectionSpec,
        loss_fn: LossFn | None,
        device: torch.device,
        memory_budget: int | None = None,
        methods: dict[str, str] | None = None,
    ):
        self.spec = spec
        self.per_example = PerExampleGradients(model, [n for n, _ in spec.layers], loss_fn, methods=methods)
        self.projector = Projector(spec, device=device)
        self.budget = capture_memory_budget(device) if memory_budget is None else int(memory_budget)

    @property
    def method(self) -> str | None:
        return self.per_example.method

    @property
    def per_example_methods(self) -> dict[str, str] | None:
        """{parameter: "hooks" | "vmap" | "loop"} once chosen."""
        return self.per_example.methods

    def prepare(
        self, state: dict[str, torch.Tensor], scales: Scales | None = None
    ) -> tuple[dict[str, torch.Tensor], Scales | None]:
        return state, scales

    def _gradients(self, prepared, inputs, targets: torch.Tensor):
        """Per-example gradients at one prepared checkpoint, times its P^{1/2} if it has one."""
        state, scales = prepared
        grads, losses = self.per_example(state, inputs, targets)
        return (grads if scales is None else scales.apply(grads)), losses

    def __call__(self, states, inputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (C, B, dim), losses (C, B) and exact squared gradient norms (C, B)."""
        b, c = targets.shape[0], len(states)
        step = micro_batch_size(b, self.spec.n_parameters, self.budget, c)
        feats, losses, norms = [], [], []
        for start in range(0, b, step):
            stop = min(b, start + step)
            x = slice_inputs(inputs, start, stop, b) if step < b else inputs
            per_ckpt = [self._gradients(prepared, x, targets[start:stop]) for prepared in states]
            losses.append(torch.stack([loss for _, loss in per_ckpt]))
            norms.append(torch.stack([dense_sq_norms(g, stop - start) for g, _ in per_ckpt]))
            # One projector call for all checkpoints: (C·rows, D) against each block once.
            grads = {n: torch.cat([g.pop(n) for g, _ in per_ckpt]) for n in list(per_ckpt[0][0])}
            del per_ckpt
            feats.append(self.projector(grads).reshape(c, stop - start, -1))
            del grads
        if len(feats) == 1:
            return feats[0], losses[0], norms[0]
        return torch.cat(feats, dim=1), torch.cat(losses, dim=1), torch.cat(norms, dim=1)


def make_featurizer(
    model: nn.Module,
    spec: ProjectionSpec,
    loss_fn: LossFn | None,
    device: torch.device,
    methods: dict[str, str] | None = None,
) -> Featurizer:
    """The featurizer for a spec: factored hooks for ``factored``, per-layer factors (exact) for
    ``factors``, per-example gradients otherwise."""
    if spec.kind == "factors":
        from .factors import FactorsFeatures

        return FactorsFeatures(model, spec, loss_fn, device, methods=methods)
    if spec.kind == "factored":
        from .hooks import FactoredFeatures

        return FactoredFeatures(model, spec, loss_fn, device, methods=methods)
    # methods: the per-parameter per-example methods chosen before the capture (see DenseFeatures)
    return DenseFeatures(model, spec, loss_fn, device, methods=methods)
