"""Factored capture: forward hooks collect layer inputs and outputs, one backward gives every δ.

One ordinary batched forward and backward (the sum of the per-example losses) per batch and
checkpoint: in eval mode examples do not interact, so the gradient of the summed loss with respect
to a layer's output, taken at example i, is δ of example i's own loss. No per-example gradient of a
factored layer is ever formed, and the weight gradients themselves are never computed (the
backward asks only for the layer outputs' gradients).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ...errors import CaptureError
from ...spec import ProjectionSpec
from ..per_example.losses import LossFn, as_tuple, cross_entropy
from ..per_example.norms import dense_sq_norms, factored_sq_norms
from ..per_example.vmap import PerExampleGradients
from .factored import FactorLayer, Factors, combine, dense_features, plan_from_spec, project_input, project_output

log = logging.getLogger("trackin_ooc")


class _Tap:
    """Forward hook of one factored layer: keeps (input, output) of every call while active."""

    def __init__(self, layer: FactorLayer, module: nn.Module):
        self.layer = layer
        self.module = module
        self.active = False
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
        self.calls.append((args[0].detach(), output))
        # Later in-place ops (ReLU(inplace=True), +=) then change the copy, not the output whose
        # gradient is δ.
        return output.clone()

    def inputs(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """The layer input as (B, T, d_in without bias) rows, or token ids (B, T)."""
        kind, m = self.layer.kind, self.module
        if x.shape[0] != batch:
            raise _batch_error(self.layer, x.shape)
        if kind == "embedding":
            return x.reshape(batch, -1)
        if kind == "linear":
            return x.reshape(batch, -1, x.shape[-1])
        # conv2d: pad as the module's forward does, then unfold to (B, positions, C·kh·kw)
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        else:
            padding = m.padding
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        return cols.transpose(1, 2)

    def deltas(self, delta: torch.Tensor, batch: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Output gradients as (B, T, d_out)."""
        if delta.shape[0] != batch:
            raise _batch_error(self.layer, delta.shape)
        if self.layer.kind == "conv2d":
            return delta.reshape(batch, delta.shape[1], -1).transpose(1, 2)
        delta = delta.reshape(batch, -1, delta.shape[-1])
        pad = getattr(self.module, "padding_idx", None)
        if ids is not None and pad is not None:  # the padding row gets no gradient
            delta = delta * (ids != pad).unsqueeze(-1).to(delta.dtype)
        return delta


def _batch_error(layer: FactorLayer, shape) -> CaptureError:
    return CaptureError(
        f"layer {layer.module!r} saw a tensor of shape {tuple(shape)} whose first dimension is not the "
        "batch; the factored projection needs batch-first layers (e.g. batch_first=True): "
        "leave this layer out of layers or use projection='gaussian'"
    )


class FactoredFeatures:
    """Per-example factored features of a batch at each checkpoint: (C, B, spec.dim), losses (C, B).

    Registers forward hooks on the model's factored layers until :meth:`close`. Parameters of
    other layer types (the plan's dense group) get per-example gradients from
    :class:`PerExampleGradients` (hooks off) and the dense projection.
    """

    method = "factored hooks"

    def __init__(self, model: nn.Module, spec: ProjectionSpec, loss_fn: LossFn | None = None,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.spec = spec
        self.loss_fn = loss_fn or cross_entropy
        self.device = torch.device(device)
        self.plan = plan_from_spec(spec)
        self.factors = Factors(spec.seed, self.device)
        modules = dict(model.named_modules())
        self.taps: list[_Tap] = []
        self.dense: FactorLayer | None = None
        self._dense_grads: PerExampleGradients | None = None
        try:
            for layer in self.plan:
                if layer.kind == "dense":
                    self.dense = layer
                    self._dense_grads = PerExampleGradients(model, layer.params, self.loss_fn)
                elif layer.kind != "pad":
                    self.taps.append(_Tap(layer, modules[layer.module]))
        except Exception:
            self.close()
            raise
        self._weights = [t.layer.weight for t in self.taps]
        self._checked = False

    def prepare(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per checkpoint, once: (state whose factored weights require grad, the plain state)."""
        hooked = set(self._weights)
        with_grad = {k: (v.detach().requires_grad_(True) if k in hooked else v) for k, v in state.items()}
        return with_grad, state

    def __call__(self, states, inputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (C, B, dim) and losses (C, B) at every prepared checkpoint state."""
        out = [self.one(prepared, inputs, targets) for prepared in states]
        return tuple(torch.stack([o[i] for o in out]) for i in range(3))

    def one(self, prepared, inputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (B, dim), losses (B,) and exact squared gradient norms (B,) at one prepared
        checkpoint: one forward and backward."""
        state, plain = prepared
        x = as_tuple(inputs)
        batch = targets.shape[0]
        for t in self.taps:
            t.calls.clear()
            t.active = True
        try:
            with torch.enable_grad():
                out = functional_call(self.model, state, x)
        finally:
            for t in self.taps:
                t.active = False
        losses = self.loss_fn(out, targets)
        if losses.shape != (batch,):
            raise CaptureError(
                f"loss_fn returned shape {tuple(losses.shape)}; it must return one loss per example, "
                f"shape ({batch},) (use reduction='none')"
            )
        outputs = [o for t in self.taps for _, o in t.calls]
        check = not self._checked  # first batch: also the weights' batch gradients, to verify the hooks
        wrt = outputs + ([state[w] for w in self._weights] if check and outputs else [])
        grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True) if wrt else ()
        if check:
            self._checked = True
            self._check_hooks(grads[: len(outputs)], grads[len(outputs):], state)
        deltas = iter(grads[: len(outputs)])
        parts: dict[int, torch.Tensor] = {}
        sq_norms = torch.zeros(batch, dtype=torch.float32, device=self.device)
        for t in self.taps:
            f = None
            seen_in, seen_out = [], []
            for a, _o in t.calls:
                delta = next(deltas)
                if delta is None:
                    continue
                ids = a.reshape(batch, -1) if t.layer.kind == "embedding" else None
                x_in, d_out = t.inputs(a, batch), t.deltas(delta, batch, ids)
                seen_in.append(x_in)
                seen_out.append(d_out)
                g = combine(t.layer, project_input(t.layer, x_in, self.factors),
                            project_output(t.layer, d_out, self.factors))
                f = g if f is None else f.add_(g)
            parts[id(t.layer)] = f if f is not None else torch.zeros(batch, t.layer.width, device=self.device)
            if seen_in:
                sq_norms += factored_sq_norms(seen_in, seen_out, bias=bool(t.layer.has_bias),
                                              embedding=t.layer.kind == "embedding")
            t.calls.clear()
        if self.dense is not None:
            grads, _ = self._dense_grads(plain, inputs, targets)
            sq_norms += dense_sq_norms({n: grads[n] for n in self.dense.params}, batch)
            parts[id(self.dense)] = dense_features(self.spec, self.dense, grads, self.device)
        feats = torch.cat([parts.get(id(x)) if x.kind != "pad" else torch.zeros(batch, x.width, device=self.device)
                           for x in self.plan], dim=1)
        return feats.detach(), losses.detach(), sq_norms.detach()

    def _check_hooks(self, deltas, wgrads, state) -> None:
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
                b = a.shape[0]
                if layer.kind == "embedding":
                    ids = a.reshape(b, -1)
                    d = t.deltas(delta, b, ids).reshape(-1, layer.d_out)
                    g = torch.zeros(layer.d_in, layer.d_out, device=d.device).index_add_(0, ids.reshape(-1), d)
                else:
                    ai = t.inputs(a, b).reshape(-1, layer.d_in - layer.has_bias).to(torch.float32)
                    d = t.deltas(delta, b).reshape(-1, layer.d_out).to(torch.float32)
                    g = (d.T @ ai).reshape(wg.shape) if wg is not None else None
                total = g if total is None else total + g
            want = torch.zeros_like(state[layer.weight]) if wg is None else wg.to(torch.float32)
            have = torch.zeros_like(want) if total is None else total.reshape(want.shape)
            err = (have - want).abs().max().item()
            scale = max(want.abs().max().item(), 1e-12)
            if err > 1e-3 * scale + 1e-6:
                raise CaptureError(
                    f"the factored projection does not see all of {layer.weight!r}'s gradient (the weight is "
                    "used outside its module's forward, or the layer's batch dimension is not first); "
                    "leave it out of layers or use projection='gaussian'"
                )

    def close(self) -> None:
        for t in self.taps:
            t.handle.remove()
        self.taps = []

    def __enter__(self) -> FactoredFeatures:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
