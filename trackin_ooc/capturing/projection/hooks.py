"""Factored capture: forward hooks collect layer inputs and outputs, one backward gives every δ.

One ordinary batched forward and backward (the sum of the per-example losses) per batch and
checkpoint: in eval mode examples do not interact, so the gradient of the summed loss with respect
to a layer's output, taken at example i, is δ of example i's own loss. The weight gradients of the
batch are never computed (the backward asks only for the layer outputs' gradients). Each layer's
features then come per position from the projected a_t and δ_t, or from its per-example gradient
G = Aᵀ Δ formed in chunks of examples, whichever costs less for the batch at hand (:mod:`.costs`);
its exact squared norm likewise from the Gram form or ‖G‖².

With a preconditioner (:mod:`.preconditioner`) each hooked layer's calls are scaled by its rank-1 P^{1/2}
(a and δ, see :mod:`.calls`) and the dense group's per-example gradients elementwise, before anything is
projected or normed.

A layer called on a tensor broadcast over the batch (position ids of shape (1, T)) gets its output
expanded to one copy per example, so δ stays per example.

The plan's dense group (parameters of other layer types: BatchNorm/LayerNorm/GroupNorm affine, tied
weights, grouped convolutions, ...) gets exact per-example gradients from the hooked rules of
:mod:`..per_example.hooked`, tapped in the same forward and backward; the parameters those rules do
not cover (or whose batch-gradient check fails on the first batch) from :class:`PerExampleGradients`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ..per_example.batches import call_functional
from ..per_example.gradients import PerExampleGradients
from ..per_example.hooked import LayerTap, gradient_mismatch, gradients_from_taps, open_taps, parameter_uses
from ..per_example.losses import LossFn, check_losses
from ..per_example.norms import dense_sq_norms, factored_sq_norms, row_sq_norms
from .calls import ConvCall, RowsCall
from .costs import norm_cost
from .factored import (
    FactorLayer,
    Factors,
    assemble,
    combine,
    dense_features,
    features_from_formed,
    plan_from_spec,
    project_input,
    project_output,
)
from .featurizer import HookedFeaturizer
from .preconditioner import LayerScale, Scales

log = logging.getLogger("trackin_ooc")

# Elements of per-example gradients formed at once (16 MiB of float32): bounds the formed path's memory, and
# a chunk this size is still in cache when it is hashed and normed (ResNet-18 on CIFAR: 2.1× a forward and
# backward, against 2.5× with 64 MiB chunks; GPT-2 13.8M 1.3× against 1.4–1.6×).
FORMED_CHUNK_ELEMENTS = 1 << 22


class FactorTap:
    """Forward hook of one factored layer: keeps (input, output) of every call while active."""

    def __init__(self, layer: FactorLayer, module: nn.Module):
        self.layer = layer
        self.module = module
        self.active = False
        self.batch = 0
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not self.active:
            return None
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise CaptureError(
                f"layer {self.layer.module!r} was called without a plain tensor input/output; "
                "the factored projection cannot hook it: leave it out of layers or use projection='gaussian'"
            )
        x = args[0]
        if self.batch > 1 and x.ndim and x.shape[0] == 1 and output.ndim and output.shape[0] == 1:
            # Shared by the whole batch (position ids of shape (1, T)): one copy per example, so the
            # gradient of the summed loss with respect to copy i is example i's own δ.
            output = output.expand(self.batch, *output.shape[1:])
        self.calls.append((x.detach(), output))
        # Later in-place ops (ReLU(inplace=True), +=) then change the copy, not the output whose
        # gradient is δ.
        return output.clone()

    def call(
        self, x: torch.Tensor, delta: torch.Tensor, batch: int, scale: LayerScale | None = None
    ) -> RowsCall | ConvCall:
        """One call's input and output gradient, per example (a shared input expanded to the batch); with
        ``scale``, those of the preconditioned layer."""
        x = _per_example(self.layer, x, batch)
        if delta.shape[0] != batch:
            raise _batch_error(self.layer, delta.shape)
        if self.layer.kind == "conv2d":
            return ConvCall(self.layer, cast(nn.Conv2d, self.module), x, delta, scale)
        x = x.reshape(batch, -1) if self.layer.kind == "embedding" else x.reshape(batch, -1, x.shape[-1])
        delta = delta.reshape(batch, -1, delta.shape[-1])
        pad = getattr(self.module, "padding_idx", None)
        if self.layer.kind == "embedding" and pad is not None:  # the padding row gets no gradient
            delta = delta * (x != pad).unsqueeze(-1).to(delta.dtype)
        return RowsCall(self.layer, x, delta, scale)


def _per_example(layer: FactorLayer, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` with the batch first: as it is, or expanded when it is shared by the batch (first dimension 1)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise _batch_error(layer, x.shape)


def _batch_error(layer: FactorLayer, shape) -> CaptureError:
    return CaptureError(
        f"layer {layer.module!r} saw a tensor of shape {tuple(shape)} whose first dimension is not the "
        "batch; the factored projection needs batch-first layers (e.g. batch_first=True): "
        "leave this layer out of layers or use projection='gaussian'"
    )


def layer_features(
    layer: FactorLayer, calls: Sequence[RowsCall | ConvCall], factors: Factors, batch: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One layer's features (B, width), exact squared gradient norms (B,) and the way they were computed
    ("per position" or "formed"), from its calls in the forward pass.

    The cheaper way for these positions (:meth:`FactorLayer.cost`, :func:`.costs.norm_cost`); both give
    the same features. A formed map is always computed from formed gradients.
    """
    positions = sum(c.positions for c in calls)
    per_position, formed = layer.cost(positions)
    norm_how, norm = norm_cost(layer.kind, layer.d_in, layer.d_out, positions)
    if layer.formed or formed <= per_position + norm:
        feats: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for g in _formed_chunks(layer, calls, batch):
            feats.append(features_from_formed(layer, g, factors))
            norms.append(row_sq_norms(g))
        return torch.cat(feats), torch.cat(norms), "formed"
    f = None
    p_in = factors.matrix(layer, "in")
    for c in calls:
        a_proj = (
            project_input(layer, c.rows(), factors)
            if p_in is None or layer.kind == "embedding"
            else c.project_input(p_in)
        )
        part = combine(layer, a_proj, project_output(layer, c.delta, factors), factors)
        f = part if f is None else f.add_(part)
    if norm_how == "formed":
        sq = torch.cat([row_sq_norms(g) for g in _formed_chunks(layer, calls, batch)])
    else:
        sq = factored_sq_norms(
            [c.rows() for c in calls],
            [c.delta for c in calls],
            bias=layer.has_bias,
            embedding=layer.kind == "embedding",
        )
    assert f is not None  # a layer runs at least once per batch
    return f, sq, "per position"


def _gradients(total: torch.Tensor, wrt: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """d total / d each of ``wrt``; None for a tensor outside the graph (a call made under no_grad)."""
    live = [i for i, t in enumerate(wrt) if t.requires_grad]
    got = torch.autograd.grad(total, [wrt[i] for i in live], allow_unused=True) if live and total.requires_grad else ()
    out: list[torch.Tensor | None] = [None] * len(wrt)
    for i, g in zip(live, got):
        out[i] = g
    return out


def _formed_chunks(layer: FactorLayer, calls: Sequence[RowsCall | ConvCall], batch: int):
    """Per-example gradients (b, d_in, d_out), summed over calls, for chunks of examples within
    FORMED_CHUNK_ELEMENTS."""
    step = max(1, FORMED_CHUNK_ELEMENTS // max(1, layer.exact_width))
    for s in range(0, batch, step):
        e = min(batch, s + step)
        g = None
        for c in calls:
            part = c.formed(s, e)
            g = part if g is None else g.add_(part)
        yield g


class _DenseGroup:
    """Per-example gradients of the plan's dense group, from the factored pass itself where possible.

    Parameters with a hooked rule (:func:`..per_example.hooked.parameter_uses`) are tapped during the
    factored forward and get their δ from the same backward; the rest, and any parameter whose
    batch-gradient check fails on the first batch, come from :class:`PerExampleGradients` (its own
    pass: vmap, or the per-example loop where vmap fails).
    """

    def __init__(self, model: nn.Module, params: Sequence[str], loss_fn: LossFn, methods: Mapping[str, str] | None):
        self.model = model
        self.params = list(params)
        self.loss_fn = loss_fn
        self.uses, _ = parameter_uses(model, self.params)
        forced = {n for n in self.params if methods and methods.get(n) not in (None, "hooks")}
        self.hooked = [n for n in self.params if n in self.uses and n not in forced]
        self._methods = methods
        self.others: PerExampleGradients | None = None
        self._set_others([n for n in self.params if n not in self.hooked])
        self.taps: list[LayerTap] = []

    def _set_others(self, names: list[str]) -> None:
        plan = (
            {n: self._methods[n] for n in names}
            if self._methods and all(self._methods.get(n) in ("vmap", "loop") for n in names)
            else None
        )
        self.others = PerExampleGradients(self.model, names, self.loss_fn, methods=plan) if names else None

    def start(self, batch: int) -> None:
        self.taps = open_taps(self.uses, self.hooked, batch)

    def stop(self) -> None:
        for t in self.taps:
            t.remove()

    def outputs(self) -> list[torch.Tensor]:
        return [o for t in self.taps for _, o in t.calls]

    def gradients(self, deltas, batch_grads, plain, inputs, targets, batch: int) -> dict[str, torch.Tensor]:
        """{name: (B, *shape)} of every dense parameter. ``batch_grads`` (first batch only): the hooked
        parameters' batch gradients, to check the taps saw every use."""
        hooked = set(self.hooked)
        failed = {
            n: f"{type(t.use.module).__name__} {t.use.module_name!r} {t.problem}"
            for t in self.taps
            if t.problem
            for n in t.use.attrs.values()
            if n in hooked
        }
        grads = gradients_from_taps(self.taps, deltas, {n: plain[n] for n in self.hooked}, batch)
        self.taps = []
        if batch_grads is not None:
            for n, bg in zip(self.hooked, batch_grads):
                why = failed.get(n) or gradient_mismatch(grads[n].sum(0), bg)
                if why:
                    failed[n] = why
            if failed:
                log.warning(
                    "factored projection: %d parameters of the dense group are not computed by hooks "
                    "(%s: %s); using vmap for them",
                    len(failed),
                    next(iter(failed)),
                    next(iter(failed.values())),
                )
                self.hooked = [n for n in self.hooked if n not in failed]
                self._set_others([n for n in self.params if n not in self.hooked])
        if self.others is not None:
            g, _ = self.others(plain, inputs, targets)
            grads.update(g)
        return {n: grads[n] for n in self.params}


class FactoredFeatures(HookedFeaturizer):
    """Per-example factored features of a batch at each checkpoint: (C, B, spec.dim), losses (C, B).

    Registers forward hooks on the model's factored layers until :meth:`close`. Parameters of
    other layer types (the plan's dense group) get exact per-example gradients (hooked rules where they
    apply, else :class:`PerExampleGradients`) and the dense projection. ``methods``: per-example
    methods chosen for the dense group before the capture ({name: "hooks" | "vmap" | "loop"}).
    """

    method = "factored hooks"

    def __init__(
        self,
        model: nn.Module,
        spec: ProjectionSpec,
        loss_fn: LossFn | None = None,
        device: torch.device | str = "cpu",
        methods: Mapping[str, str] | None = None,
    ):
        super().__init__(model, spec, loss_fn, device)
        self.plan = plan_from_spec(spec)
        self.factors = Factors(spec.seed, self.device)
        modules = dict(model.named_modules())
        self.dense: FactorLayer | None = None
        self._dense_group: _DenseGroup | None = None
        # How each hooked layer's features were computed in the last batch ("per position" or "formed").
        self.paths: dict[str, str] = {}
        with self._opening():
            for layer in self.plan:
                if layer.kind == "dense":
                    self.dense = layer
                    self._dense_group = _DenseGroup(model, layer.params, self.loss_fn, methods)
                elif layer.kind != "pad":
                    self.taps.append(FactorTap(layer, modules[layer.module]))
        self._weights = [t.layer.weight for t in self.taps]

    def prepare(self, state: dict[str, torch.Tensor], scales: Scales | None = None):
        """Per checkpoint, once: (state whose factored weights require grad, the plain state, the checkpoint's
        preconditioner scales or None)."""
        hooked = set(self._weights) | set(self._dense_group.hooked if self._dense_group else ())
        with_grad = {k: (v.detach().requires_grad_(True) if k in hooked else v) for k, v in state.items()}
        return with_grad, state, scales

    def __call__(
        self, states: Sequence[Any], inputs: Any, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (C, B, dim), losses (C, B) and exact squared norms (C, B) at every prepared state."""
        out = [self.one(prepared, inputs, targets) for prepared in states]
        feats, losses, sq_norms = (torch.stack([o[i] for o in out]) for i in range(3))
        return feats, losses, sq_norms

    def one(self, prepared, inputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (B, dim), losses (B,) and exact squared gradient norms (B,) at one prepared
        checkpoint: one forward and backward."""
        state, plain, scales = prepared
        batch = targets.shape[0]
        dense = self._dense_group
        for t in self.taps:
            t.calls.clear()
            t.batch = batch
            t.active = True
        if dense is not None:
            dense.start(batch)
        try:
            with torch.enable_grad():
                out = call_functional(self.model, state, inputs)
        finally:
            for t in self.taps:
                t.active = False
            if dense is not None:
                dense.stop()
        losses = check_losses(self.loss_fn(out, targets), batch)
        outputs = [o for t in self.taps for _, o in t.calls]
        dense_outputs = dense.outputs() if dense is not None else []
        check = not self._checked  # first batch: also the weights' batch gradients, to verify the hooks
        checked = (self._weights + (dense.hooked if dense is not None else [])) if check else []
        grads = _gradients(losses.sum(), outputs + dense_outputs + [state[w] for w in checked])
        n_out, n_dense = len(outputs), len(dense_outputs)
        if check:
            self._checked = True
            self._check_hooks(
                grads[:n_out], grads[n_out + n_dense : n_out + n_dense + len(self._weights)], state, batch
            )
        deltas = iter(grads[:n_out])
        parts: dict[int, torch.Tensor] = {}
        sq_norms = torch.zeros(batch, dtype=torch.float32, device=self.device)
        for t in self.taps:
            scale = None if scales is None else scales.layers[t.layer.module]
            calls = [
                t.call(a, delta, batch, scale)
                for (a, _o), delta in zip(t.calls, [next(deltas) for _ in t.calls])
                if delta is not None
            ]
            t.calls.clear()
            if not calls:
                parts[id(t.layer)] = torch.zeros(batch, t.layer.out_width, device=self.device)
                continue
            f, sq, how = layer_features(t.layer, calls, self.factors, batch)
            parts[id(t.layer)] = f
            sq_norms += sq
            self.paths[t.layer.module] = how
        if dense is not None:
            batch_grads = grads[n_out + n_dense + len(self._weights) :] if check else None
            g = dense.gradients(grads[n_out : n_out + n_dense], batch_grads, plain, inputs, targets, batch)
            if scales is not None:
                g = scales.apply(g)
            sq_norms += dense_sq_norms(g, batch)
            assert self.dense is not None  # a dense group exists only with its layer
            parts[id(self.dense)] = dense_features(self.spec, self.dense, g, self.device)
        feats = assemble(self.plan, [parts.get(id(x)) for x in self.plan], batch, self.device)
        return feats.detach(), losses.detach(), sq_norms.detach()

    def _check_hooks(self, deltas, wgrads, state, batch: int) -> None:
        """Once: the batch gradient of every factored weight must equal Σ_examples Σ_t δ_t a_tᵀ.

        Catches a weight used outside its module's forward (tied or functional uses), where the
        hooks would silently miss part of the gradient.
        """
        if not wgrads:
            return
        it = iter(deltas)
        for t, wg in zip(self.taps, wgrads):
            layer = t.layer
            total = None
            for a, _ in t.calls:
                delta = next(it)
                if delta is None:
                    continue
                g = t.call(a, delta, batch).batch_weight_grad()
                total = g if total is None else total + g
            want = torch.zeros_like(state[layer.weight]) if wg is None else wg.to(torch.float32)
            have = torch.zeros_like(want) if total is None else total.reshape(want.shape)
            self._require_batch_gradient(
                have,
                want,
                f"the factored projection does not see all of {layer.weight!r}'s gradient (the weight is "
                "used outside its module's forward, or the layer's batch dimension is not first); "
                "leave it out of layers or use projection='gaussian'",
            )
