"""Per-example gradients from one batched forward and backward, through module hooks.

For the layer types below the gradient of a parameter is a sum over positions of the layer's input
(or normalised input) against δ, the gradient of the loss with respect to the layer's output. Forward
hooks keep each call's input and output; one backward of the summed loss gives every δ. In eval mode
examples do not interact, so δ taken at example i is δ of example i's own loss, and

    Linear, Conv1d/2d, HF Conv1D:  g_i(W) = Σ_t δ_{i,t} a_{i,t}ᵀ          (over positions for a conv)
    Embedding:                      g_i(W)[v] = Σ_{t: id_{i,t} = v} δ_{i,t}
    LayerNorm, BatchNorm, GroupNorm g_i(γ) = Σ_t δ_{i,t} ⊙ x̂_{i,t},  g_i(β) = Σ_t δ_{i,t}

A parameter used by several calls (a module called twice, GPT-2's lm_head using the token embedding)
sums the contributions of all of them. Inputs broadcast over the batch (position ids of shape (1, T))
are expanded to the batch first, so each example's share is seen. :meth:`HookedGradients.check`
compares the batch gradient with the sum of the per-example ones once, catching a parameter used
outside the hooked modules' forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import Inputs, call_functional
from .losses import LossFn, check_losses

# Relative tolerance of the batch-gradient check (float32 sums over a batch).
CHECK_RTOL = 1e-3


def hook_kind(module: nn.Module) -> str | None:
    """The hooked rule for a module's parameters, or None (exact types: a subclass may use its weight
    outside ``forward``, as MultiheadAttention's ``out_proj`` does)."""
    t = type(module)
    if t in (nn.Linear,):
        return "linear"
    if t in (nn.Conv1d, nn.Conv2d):
        return "conv"
    if t is nn.Embedding:
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq else None
    if t is nn.LayerNorm:
        return "layer_norm"
    if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return "batch_norm" if module.track_running_stats else None
    if t is nn.GroupNorm:
        return "group_norm"
    if t.__name__ == "Conv1D" and t.__module__.startswith("transformers"):  # y = x @ W + b, W (in, out)
        return "hf_conv1d"
    return None


@dataclass
class _Use:
    """One module whose forward uses a selected parameter (as ``attr``)."""

    module: nn.Module
    module_name: str
    kind: str
    attrs: dict[str, str] = field(default_factory=dict)  # module attribute ("weight"/"bias") -> parameter name


def parameter_uses(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, list[_Use]], dict[str, str]]:
    """({hookable parameter: the modules using it}, {other parameter: why it is not hookable}).

    Tied parameters (one tensor under several module attributes) count every module that holds them.
    """
    wanted = set(names)
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    uses: dict[str, list[_Use]] = {n: [] for n in names}
    by_module: dict[int, _Use] = {}
    refused: dict[str, str] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            known = canonical.get(id(p))
            if known is None or known not in wanted:
                continue
            name = known
            kind = hook_kind(module)
            if kind is None or attr not in ("weight", "bias"):
                refused.setdefault(name, f"{type(module).__name__} {mod_name or 'model'!r}")
                continue
            use = by_module.get(id(module))
            if use is None:
                use = by_module[id(module)] = _Use(module, mod_name, kind)
            use.attrs[attr] = name
            if all(u.module is not module for u in uses[name]):
                uses[name].append(use)
    hookable = {n: u for n, u in uses.items() if n not in refused and u}
    for n in names:
        if n not in hookable and n not in refused:
            refused[n] = "not held by any module"
    return hookable, refused


class LayerTap:
    """Hooks on one module during a hooked pass: expand broadcast inputs, keep (input, output) per call."""

    def __init__(self, use: _Use, batch: int):
        self.use = use
        self.batch = batch
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.problem: str | None = None
        self.handles = [use.module.register_forward_pre_hook(self._pre), use.module.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            self.problem = "called without a positional tensor input"
            return None
        x = args[0]
        if x.ndim > 0 and x.shape[0] == 1 and self.batch > 1:  # shared over the batch: give each example its own
            return (x.expand(self.batch, *x.shape[1:]), *args[1:])
        return None

    def _post(self, module, args, output):
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            self.problem = "returned something other than a tensor"
            return None
        x = args[0]
        if x.ndim == 0 or x.shape[0] != self.batch or output.ndim == 0 or output.shape[0] != self.batch:
            self.problem = f"saw input {tuple(x.shape)} whose first dimension is not the batch ({self.batch})"
            return None
        if self.use.kind in ("batch_norm",) and module.training:
            self.problem = "is in training mode (batch statistics mix examples)"
            return None
        self.calls.append((_saved_input(self.use, module, x.detach()), output))
        # Later in-place ops (ReLU(inplace=True), +=) change the copy, not the output whose gradient is δ.
        return output.clone()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _saved_input(use: _Use, module: Any, x: torch.Tensor) -> torch.Tensor:
    """What the gradient rule needs of a call's input: the input itself, or for a normalisation layer
    its normalised input x̂, computed now, while the module holds the checkpoint's buffers."""
    with torch.no_grad():
        if use.kind == "layer_norm":
            return F.layer_norm(x, tuple(module.normalized_shape), None, None, module.eps)
        if use.kind == "batch_norm":
            return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
        if use.kind == "group_norm":
            return F.group_norm(x, module.num_groups, None, None, module.eps)
    return x


def _conv_weight_gradients(module: Any, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients (B, *weight.shape) of a Conv1d/Conv2d call: PyTorch's own weight
    gradient, vmapped over the examples (its batching rule turns the batch into convolution groups,
    several times faster on CPU than unfolding the input into patches)."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = [0] * len(module.kernel_size)
    else:
        padding = list(module.padding)
    weight = module.weight.detach()
    stride, dilation = list(module.stride), list(module.dilation)
    zeros = [0] * len(module.kernel_size)

    def one(xi: torch.Tensor, di: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            di.unsqueeze(0),
            xi.unsqueeze(0),
            weight,
            None,
            stride,
            padding,
            dilation,
            False,
            zeros,
            module.groups,
            [False, True, False],
        )[1]

    return torch.vmap(one)(x.to(delta.dtype), delta)


def _channel_sums(t: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    return t.reshape(batch, channels, -1).sum(-1)


def per_call_gradients(use: _Use, x: torch.Tensor, delta: torch.Tensor, want: set[str]) -> dict[str, torch.Tensor]:
    """Per-example gradients {attr: (B, *shape)} of the parameters ``want`` from one call's saved input
    (:func:`_saved_input`) and δ."""
    m: Any = use.module  # its attributes depend on its kind
    kind, batch = use.kind, x.shape[0]
    out: dict[str, torch.Tensor] = {}
    if kind in ("linear", "hf_conv1d"):
        a = x.reshape(batch, -1, x.shape[-1])
        d = delta.reshape(batch, -1, delta.shape[-1]).to(a.dtype)
        if "weight" in want:
            first, second = (d, a) if kind == "linear" else (a, d)  # HF Conv1D keeps its weight as (in, out)
            if a.shape[1] == 1:  # one position: an outer product
                out["weight"] = first.transpose(1, 2) * second
            else:
                out["weight"] = torch.bmm(first.transpose(1, 2), second)
        if "bias" in want:
            out["bias"] = d.sum(1)
    elif kind == "conv":
        if "weight" in want:
            out["weight"] = _conv_weight_gradients(m, x, delta)
        if "bias" in want:
            out["bias"] = delta.reshape(batch, delta.shape[1], -1).sum(-1)
    elif kind == "embedding":
        ids = x.reshape(batch, -1)
        d = delta.reshape(batch, ids.shape[1], -1)
        if m.padding_idx is not None:  # the padding row gets no gradient
            d = d * (ids != m.padding_idx).unsqueeze(-1).to(d.dtype)
        w = torch.zeros(batch, *m.weight.shape, dtype=d.dtype, device=d.device)
        rows = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
        w.index_put_((rows.reshape(-1), ids.reshape(-1)), d.reshape(-1, d.shape[-1]), accumulate=True)
        out["weight"] = w
    elif kind == "layer_norm":  # x: the normalised input x̂
        shape = tuple(m.normalized_shape)
        d = delta.reshape(batch, -1, *shape)
        if "weight" in want:
            out["weight"] = (d * x.reshape(batch, -1, *shape).to(d.dtype)).sum(1)
        if "bias" in want:
            out["bias"] = d.sum(1)
    elif kind in ("batch_norm", "group_norm"):  # x: the normalised input x̂
        channels = x.shape[1]
        if "weight" in want:
            out["weight"] = _channel_sums(delta * x.to(delta.dtype), batch, channels)
        if "bias" in want:
            out["bias"] = _channel_sums(delta, batch, channels)
    else:  # pragma: no cover - hook_kind names every kind handled here
        raise ValueError(f"no hooked rule for {kind!r}")
    return out


class HookedGradients:
    """Exact per-example gradients of hookable parameters from one batched forward and backward.

    :func:`parameter_uses` says which parameters are hookable; :meth:`__call__` computes them for any
    subset. ``check=True`` also compares the batch gradient of each with the sum of its per-example
    gradients and reports the parameters that fail (a use the hooks do not see).
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str], loss_fn: LossFn):
        self.model = model
        self.loss_fn = loss_fn
        self.uses, self.refused = parameter_uses(model, param_names)

    def __call__(
        self,
        state: Mapping[str, torch.Tensor],
        inputs: Inputs,
        targets: torch.Tensor,
        names: Sequence[str],
        *,
        check: bool = False,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, str]]:
        """({name: (B, *shape)}, losses (B,), {name: why its hooked gradient cannot be trusted})."""
        batch = targets.shape[0]
        names = [n for n in names if n in self.uses]
        leaves = {n: state[n].detach().requires_grad_(True) for n in names}
        taps = open_taps(self.uses, names, batch)
        try:
            with torch.enable_grad():
                out = call_functional(self.model, {**state, **leaves}, inputs)
        finally:
            for t in taps:
                t.remove()
        losses = check_losses(self.loss_fn(out, targets), batch)
        failed: dict[str, str] = {}
        for t in taps:
            if t.problem:
                for n in t.use.attrs.values():
                    failed.setdefault(n, f"{type(t.use.module).__name__} {t.use.module_name!r} {t.problem}")
        outputs = [o for t in taps for _, o in t.calls]
        live = [o for o in outputs if o.requires_grad]  # a call under no_grad contributes nothing
        wrt = live + (list(leaves.values()) if check else [])
        total = losses.sum()
        got = torch.autograd.grad(total, wrt, allow_unused=True) if wrt and total.requires_grad else (None,) * len(wrt)
        live_deltas = iter(got[: len(live)])
        deltas = iter([next(live_deltas) if o.requires_grad else None for o in outputs])
        grads = gradients_from_taps(taps, deltas, leaves, batch)
        if check:
            for n, batch_grad in zip(leaves, got[len(live) :]):
                if n not in failed:
                    why = gradient_mismatch(grads[n].sum(0), batch_grad)
                    if why:
                        failed[n] = why
        return grads, losses.detach(), failed


def open_taps(uses: Mapping[str, Sequence[_Use]], names: Sequence[str], batch: int) -> list[LayerTap]:
    """One tap per module that uses any of ``names`` (a module shared by several parameters is hooked once)."""
    modules: dict[int, _Use] = {}
    for n in names:
        for use in uses[n]:
            modules.setdefault(id(use.module), use)
    return [LayerTap(use, batch) for use in modules.values()]


def gradients_from_taps(
    taps: Sequence[LayerTap], deltas, params: Mapping[str, torch.Tensor], batch: int
) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)} for every parameter in ``params`` from the taps' calls and their output gradients
    ``deltas`` (one per call, in the taps' order; None for a call that contributes nothing). A parameter used
    by several calls sums them; one no call reached is zero. Clears the taps' calls."""
    grads: dict[str, torch.Tensor] = {}
    it = iter(deltas)
    for t in taps:
        want = {a for a, n in t.use.attrs.items() if n in params}
        for x, _ in t.calls:
            delta = next(it)
            if delta is None:
                continue
            with torch.no_grad():
                for attr, g in per_call_gradients(t.use, x, delta, want).items():
                    n = t.use.attrs[attr]
                    grads[n] = g if n not in grads else grads[n].add_(g)
        t.calls.clear()
    for n, like in params.items():
        if n not in grads:
            grads[n] = torch.zeros(batch, *like.shape, dtype=like.dtype, device=like.device)
    return grads


def gradient_mismatch(summed: torch.Tensor, batch_grad: torch.Tensor | None) -> str | None:
    want = torch.zeros_like(summed) if batch_grad is None else batch_grad.to(summed.dtype)
    err = (summed - want).abs().max().item()
    scale = want.abs().max().item()
    if err > CHECK_RTOL * scale + 1e-7:
        return (
            f"its batch gradient differs from the sum of the hooked per-example gradients by {err:.3g} "
            f"(scale {scale:.3g}): it is used outside the hooked modules' forward"
        )
    return None


__all__ = ["HookedGradients", "hook_kind", "parameter_uses", "per_call_gradients"]
