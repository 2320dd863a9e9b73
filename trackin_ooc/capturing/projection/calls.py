"""One call of a hooked layer, per example: its input rows, projected inputs and formed gradients.

The hooks keep what a layer saw (its input as given, its output's gradient); these classes turn that
into what the features need, each the cheap way for its layer type:

- :class:`RowsCall` (Linear, Hugging Face ``Conv1D``, Embedding): rows (B, T, d_in) are a reshape;
  the formed gradient is one batched product Aᵀ Δ.
- :class:`ConvCall` (Conv2d): the input is never unfolded unless the Gram form of the norm asks for
  it. The input factor P_inᵀ a_t of every patch is a convolution of the input with P_in as kernels, and
  the per-example gradients are the convolution's weight gradient with the examples as groups (one
  grouped backward instead of unfolding T patches of C·kh·kw values).

A call made with a preconditioner's :class:`~.preconditioner.LayerScale` is the call of the scaled layer:
its inputs are multiplied by ``scale.inputs`` (a convolution's per patch column, applied wherever patches
are used, since the image itself cannot carry it; an Embedding's per token, folded into δ) and its output
gradients by ``scale.outputs``, so every product below is of P^{1/2}-scaled gradients. A ``ConvCall``'s ``x``
stays the unscaled image: read its inputs through ``rows()``, ``project_input()`` or ``formed()`` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .factored import FactorLayer
from .preconditioner import LayerScale


class RowsCall:
    """A Linear, ``Conv1D`` or Embedding call: inputs (B, T, d_in without bias) or token ids (B, T)."""

    def __init__(self, layer: FactorLayer, x: torch.Tensor, delta: torch.Tensor, scale: LayerScale | None = None):
        if scale is not None:
            if layer.kind == "embedding":  # a token's input is a one-hot row: its scale goes with its δ
                delta = delta.to(torch.float32) * scale.outputs * scale.inputs[x].unsqueeze(-1)
            else:
                x = x.to(torch.float32) * scale.inputs
                delta = delta.to(torch.float32) * scale.outputs
        self.layer = layer
        self.x = x
        self.delta = delta  # (B, T, d_out)

    @property
    def positions(self) -> int:
        return int(self.delta.shape[1])

    def rows(self) -> torch.Tensor:
        return self.x

    def project_input(self, p: torch.Tensor) -> torch.Tensor:
        """(B, T, n) = rows @ P_in (bias row of P_in added when the layer has a bias)."""
        a = self.x.to(torch.float32)
        if self.layer.has_bias:
            return torch.matmul(a, p[:-1]).add_(p[-1])
        return torch.matmul(a, p)

    def batch_weight_grad(self) -> torch.Tensor:
        """Σ over examples and positions of δ_t a_tᵀ, in the weight's own layout (no bias)."""
        layer = self.layer
        d = self.delta.reshape(-1, layer.d_out).to(torch.float32)
        if layer.kind == "embedding":
            ids = self.x.reshape(-1)
            return torch.zeros(layer.d_in, layer.d_out, device=d.device).index_add_(0, ids, d)
        a = self.x.reshape(d.shape[0], -1).to(torch.float32)
        return a.T @ d if layer.kind == "hf_conv1d" else d.T @ a

    def formed(self, start: int, stop: int) -> torch.Tensor:
        """Per-example gradients of examples ``start:stop`` as (b, d_in, d_out), bias row last (an
        Embedding's: (b, vocabulary, d_out), δ_t added to its token's row)."""
        d = self.delta[start:stop].to(torch.float32)
        if self.layer.kind == "embedding":
            ids = self.x[start:stop]
            g = torch.zeros(ids.shape[0], self.layer.d_in, self.layer.d_out, dtype=torch.float32, device=d.device)
            return g.scatter_add_(1, ids.unsqueeze(-1).expand(*ids.shape, self.layer.d_out), d)
        g = torch.bmm(self.x[start:stop].to(torch.float32).transpose(1, 2), d)
        if self.layer.has_bias:
            g = torch.cat([g, d.sum(1, keepdim=True)], dim=1)
        return g


class ConvCall:
    """A Conv2d call: input (B, C, H, W) (padded here when the module pads other than with zeros) and
    output gradients (B, O, H', W')."""

    def __init__(
        self,
        layer: FactorLayer,
        module: nn.Conv2d,
        x: torch.Tensor,
        delta_map: torch.Tensor,
        scale: LayerScale | None = None,
    ):
        self.in_scale = None  # per patch column (C·kh·kw,), with a preconditioner
        if scale is not None:
            delta_map = delta_map.to(torch.float32) * scale.outputs.reshape(1, -1, 1, 1)
            self.in_scale = scale.inputs
        self.layer = layer
        self.module = module
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            self.padding: tuple[int, ...] = (0, 0)
        else:
            self.padding = tuple(module.padding)
        self.x = x
        self.delta_map = delta_map
        b, o = delta_map.shape[:2]
        self.delta = delta_map.reshape(b, o, -1).transpose(1, 2)  # (B, T, O)
        self._rows: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        return int(self.delta.shape[1])

    def rows(self) -> torch.Tensor:
        """Unfolded input patches (B, T, C·kh·kw), made once on first use."""
        if self._rows is None:
            m = self.module
            cols = F.unfold(self.x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
            self._rows = cols.transpose(1, 2) if self.in_scale is None else cols.transpose(1, 2) * self.in_scale
        return self._rows

    def project_input(self, p: torch.Tensor) -> torch.Tensor:
        """(B, T, n): every patch times P_in, as a convolution with the columns of P_in as kernels."""
        m = self.module
        n = p.shape[1]
        c = self.x.shape[1]
        weights = p[: p.shape[0] - self.layer.has_bias]
        if self.in_scale is not None:  # (a ∘ s)ᵀ P = aᵀ (diag(s) P)
            weights = weights * self.in_scale.unsqueeze(1)
        kernels = weights.T.reshape(n, c, *m.kernel_size).contiguous()
        bias = p[-1].contiguous() if self.layer.has_bias else None
        y = F.conv2d(self.x.to(torch.float32), kernels, bias, m.stride, self.padding, m.dilation)
        return y.reshape(y.shape[0], n, -1).transpose(1, 2)

    def batch_weight_grad(self) -> torch.Tensor:
        """The convolution's weight gradient for the whole batch (O, C, kh, kw)."""
        m = self.module
        x, d = self.x.to(torch.float32), self.delta_map.to(torch.float32)
        shape = x.new_empty(()).expand(d.shape[1], x.shape[1], *m.kernel_size)
        g = torch.ops.aten.convolution_backward(
            d, x, shape, None, m.stride, self.padding, m.dilation, False, (0, 0), 1, (False, True, False)
        )[1]
        return g if self.in_scale is None else g * self.in_scale.reshape(1, *g.shape[1:])

    def formed(self, start: int, stop: int) -> torch.Tensor:
        """Per-example weight gradients of examples ``start:stop`` as (b, d_in, d_out) (bias row last).

        A 1×1 kernel, or fewer positions than output channels: one batched product of the unfolded patches
        and the output gradients, which writes G in its (d_in, d_out) layout at once (a 1×1 kernel's patches
        are its input; otherwise they are smaller than G itself here). Otherwise the convolution's weight
        gradient with the examples as groups, which never unfolds the T patches. On 192 random convolutions
        (benchmarks/projection_cost.py) the batched product was up to 13× faster where few positions, or
        few input channels per group of a 1×1 kernel, leave a grouped backward idle, and up to 19× slower
        where many positions make 3×3 and 5×5 patches large; the rule's pick was 1.06× the faster on
        average, 2.9× in the worst case.
        """
        d = self.delta_map[start:stop].to(torch.float32)
        return self._patches(start, stop, d) if self.patches_first(int(d.shape[1])) else self._grouped(start, stop, d)

    def patches_first(self, channels: int) -> bool:
        """Whether :meth:`formed` uses the batched product of unfolded patches (see there)."""
        return tuple(self.module.kernel_size) == (1, 1) or self.positions < channels

    def _patches(self, start: int, stop: int, d: torch.Tensor) -> torch.Tensor:
        m = self.module
        b, o = d.shape[:2]
        x = self.x[start:stop].to(torch.float32)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        if self.in_scale is not None:
            cols = cols * self.in_scale.unsqueeze(-1)
        g = torch.bmm(cols, d.reshape(b, o, -1).transpose(1, 2))  # (b, C·kh·kw, O)
        if self.layer.has_bias:
            g = torch.cat([g, d.sum((2, 3)).unsqueeze(1)], dim=1)
        return g

    def _grouped(self, start: int, stop: int, d: torch.Tensor) -> torch.Tensor:
        m = self.module
        x = self.x[start:stop].to(torch.float32)
        b, c = x.shape[:2]
        o = d.shape[1]
        shape = x.new_empty(()).expand(b * o, c, *m.kernel_size)  # only its shape is read
        gw = torch.ops.aten.convolution_backward(
            d.reshape(1, b * o, *d.shape[2:]),
            x.reshape(1, b * c, *x.shape[2:]),
            shape,
            None,
            m.stride,
            self.padding,
            m.dilation,
            False,
            (0, 0),
            b,
            (False, True, False),
        )[1]
        g = gw.reshape(b, o, -1).transpose(1, 2)  # (b, C·kh·kw, O)
        if self.in_scale is not None:
            g = g * self.in_scale.unsqueeze(1)
        if self.layer.has_bias:
            g = torch.cat([g, d.sum((2, 3)).unsqueeze(1)], dim=1)
        return g
