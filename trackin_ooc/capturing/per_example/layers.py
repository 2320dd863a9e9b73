"""Layer selection: which parameters' gradients TracIn uses (the paper's "cherry-picking")."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...errors import CaptureError


def select_parameters(model: nn.Module, layers: Sequence[str] | str | None) -> list[str]:
    """Parameter names, in the model's order, for module or parameter names in ``layers``.

    ``None`` selects every trainable parameter. A module name selects all of its parameters
    (recursively); a parameter name selects just that one.
    """
    params = dict(model.named_parameters())
    if layers is None:
        names = [n for n, p in params.items() if p.requires_grad]
        if not names:
            raise CaptureError("the model has no trainable parameters; pass layers=[...] explicitly")
        return names
    if isinstance(layers, str):
        layers = [s for s in layers.split(",") if s]
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for layer in layers:
        if layer in params:
            chosen.add(layer)
        elif layer in modules and layer != "":
            sub = [f"{layer}.{n}" for n, _ in modules[layer].named_parameters()]
            if not sub:
                raise CaptureError(f"module {layer!r} has no parameters; choose a layer with weights")
            chosen.update(sub)
        else:
            known = [m for m in modules if m and any(True for _ in modules[m].parameters(recurse=False))]
            raise CaptureError(
                f"no module or parameter named {layer!r} in the model; choose from: {', '.join(known)}"
            )
    return [n for n in params if n in chosen]
