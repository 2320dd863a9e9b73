"""PerExampleGradients: exact per-example loss gradients, each parameter by the fastest method that works.

Methods, per parameter:

- ``"hooks"`` (:mod:`.hooked`): Linear, Conv1d/2d, Embedding, LayerNorm, BatchNorm/GroupNorm affine and
  Hugging Face ``Conv1D`` parameters, from one batched forward and backward of the whole batch;
- ``"vmap"`` (:func:`.vmap.vmap_gradients`): any other parameter, by ``torch.func.vmap`` over ``grad``;
- ``"loop"`` (:func:`.vmap.loop_gradients`): one example at a time, only where vmap fails too (logged
  once with the reason and the parameters concerned).

The choice is made on the first batch (the hooked gradients are checked against the batch gradient
there) and kept; :attr:`PerExampleGradients.methods` says what was chosen. All three are exact and give
the same numbers (up to float rounding), so stores captured by different methods combine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ...errors import CaptureError
from .batches import Inputs
from .hooked import HookedGradients
from .losses import LossFn, default_loss
from .vmap import loop_gradients, vmap_gradients

log = logging.getLogger("trackin_ooc")

METHODS = ("hooks", "vmap", "loop")
# "hooks": hooked layers by hooks, the rest by vmap; "vmap": vmap for the whole model where it works
# (else as "hooks"). Hooks are the default: as fast as vmap or faster (docs/models.md).
PREFERENCES = ("hooks", "vmap")
DEFAULT_PREFERENCE = "hooks"

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _short(given: Iterable[str], limit: int = 6) -> str:
    names = list(given)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class PerExampleGradients:
    """Gradients of each example's own loss with respect to the selected parameters.

    ``methods``: a plan {parameter: "hooks" | "vmap" | "loop"} chosen earlier (say on a probe batch);
    without it the plan is chosen on the first call. ``prefer``: see :data:`PREFERENCES`.
    """

    def __init__(
        self,
        model: nn.Module,
        param_names: Sequence[str],
        loss_fn: LossFn | None = None,
        *,
        methods: Mapping[str, str] | None = None,
        prefer: str = DEFAULT_PREFERENCE,
    ):
        if prefer not in PREFERENCES:
            raise ValueError(f"prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
        self.model = model
        self.param_names = list(param_names)
        self.loss_fn = loss_fn or default_loss
        self.prefer = prefer
        self.hooked = HookedGradients(model, self.param_names, self.loss_fn)
        self.methods: dict[str, str] | None = None
        if methods is not None:
            plan = {n: methods.get(n) for n in self.param_names}
            bad = {n: m for n, m in plan.items() if m not in METHODS or (m == "hooks" and n not in self.hooked.uses)}
            if bad:
                raise ValueError(f"cannot use the per-example methods {bad}")
            self.methods = {n: str(m) for n, m in plan.items()}

    @property
    def method(self) -> str | None:
        """The methods in use, joined ("hooks", "hooks+vmap", ...), or None before the first batch."""
        if self.methods is None:
            return None
        return "+".join(m for m in METHODS if m in self.methods.values())

    def choose(self, state: Mapping[str, torch.Tensor], inputs: Inputs, targets: torch.Tensor) -> dict[str, str]:
        """Choose (once) and return the plan {parameter: method}, trying it on this batch."""
        if self.methods is None:
            self._choose_and_compute(state, inputs, targets)
        assert self.methods is not None  # chosen just now
        return dict(self.methods)

    def __call__(
        self, state: Mapping[str, torch.Tensor], inputs: Inputs, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({name: (batch, *shape)}, losses (batch,)) at the parameters in ``state``."""
        if self.methods is None:
            return self._choose_and_compute(state, inputs, targets)
        return self._compute(state, inputs, targets)

    def _compute(self, state, inputs, targets):
        methods = self.methods
        assert methods is not None  # chosen on the first batch
        grads: dict[str, torch.Tensor] = {}
        losses: torch.Tensor | None = None
        for method in METHODS:
            names = [n for n in self.param_names if methods[n] == method]
            if not names:
                continue
            if method == "hooks":
                g, loss, _ = self.hooked(state, inputs, targets, names)
            elif method == "vmap":
                g, loss = vmap_gradients(self.model, self.loss_fn, state, names, inputs, targets)
            else:
                g, loss = loop_gradients(self.model, self.loss_fn, state, names, inputs, targets)
            grads.update(g)
            losses = loss if losses is None else losses
        return {n: grads[n] for n in self.param_names}, losses

    def _choose_and_compute(self, state, inputs, targets):
        names = self.param_names
        if self.prefer == "vmap" or not self.hooked.uses:
            try:
                every = vmap_gradients(self.model, self.loss_fn, state, names, inputs, targets)
                self.methods = dict.fromkeys(names, "vmap")
                return every
            except Exception as e:  # vmap refuses many models (data-dependent control flow, in-place ops)
                if isinstance(e, CaptureError):  # bad input (a batch no default loss fits, ...): the user's to fix
                    raise
                vmap_error = e
                if not self.hooked.uses:
                    return self._loop_rest(state, inputs, targets, names, {}, {}, None, vmap_error)
        grads: dict[str, torch.Tensor] = {}
        losses: torch.Tensor | None = None
        hooked = [n for n in names if n in self.hooked.uses]
        failed: dict[str, str] = {}
        if hooked:
            try:
                g, losses, failed = self.hooked(state, inputs, targets, hooked, check=True)
            except Exception as e:  # a model the hooks cannot follow: every parameter goes to vmap
                if isinstance(e, CaptureError):  # bad input (loss shape, ...): the user's to fix
                    raise
                g, losses, failed = {}, None, dict.fromkeys(hooked, f"the hooked pass failed: {_first_line(e)}")
            if failed:
                first = next(iter(failed.values()))
                _warn_once(
                    f"per-example gradients: {len(failed)} parameters are not computed by hooks "
                    f"({_short(failed)}; {first}); using vmap for them"
                )
            grads = {n: v for n, v in g.items() if n not in failed}
        plan = dict.fromkeys(grads, "hooks")
        rest = [n for n in names if n not in plan]
        if rest:
            try:
                g, loss = vmap_gradients(self.model, self.loss_fn, state, rest, inputs, targets)
            except Exception as e:
                if isinstance(e, CaptureError):
                    raise
                return self._loop_rest(state, inputs, targets, rest, grads, plan, losses, e)
            grads.update(g)
            plan.update(dict.fromkeys(rest, "vmap"))
            losses = loss if losses is None else losses
        self.methods = {n: plan[n] for n in names}
        return {n: grads[n] for n in names}, losses

    def _loop_rest(self, state, inputs, targets, rest, grads, plan, losses, error):
        why = {n: self.hooked.refused.get(n, "") for n in rest}
        layers = _short([f"{n} ({w})" if w else n for n, w in why.items()])
        _warn_once(
            f"per-example gradients: vmap failed ({_first_line(error)}); {len(rest)} parameters not "
            f"covered by hooks use the per-example loop (slow): {layers}"
        )
        g, loss = loop_gradients(self.model, self.loss_fn, state, rest, inputs, targets)
        grads = {**grads, **g}
        plan = {**plan, **dict.fromkeys(rest, "loop")}
        self.methods = {n: plan[n] for n in self.param_names}
        return {n: grads[n] for n in self.param_names}, (loss if losses is None else losses)


__all__ = ["DEFAULT_PREFERENCE", "METHODS", "PREFERENCES", "PerExampleGradients"]
