"""Layer selection: which parameters' gradients TracIn uses (the paper's "cherry-picking")."""

from __future__ import annotations

import difflib
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
            raise CaptureError(f"no module or parameter named {layer!r} in the model; {_suggest(layer, model)}")
    return [n for n in params if n in chosen]


def _suggest(name: str, model: nn.Module, n: int = 3) -> str:
    """'did you mean ...?' with the few closest module or parameter names (difflib), never all of them."""
    with_params = [m for m, mod in model.named_modules() if m and any(True for _ in mod.parameters())]
    candidates = list(dict.fromkeys([*with_params, *(p for p, _ in model.named_parameters())]))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not close:  # a typo in the last part only: compare the last parts ("fc3" for "head.fc2")
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [tails[t] for t in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=n, cutoff=0.6)]
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    top = [m for m, _ in model.named_children() if m in with_params]
    shown = ", ".join(top[:8]) + (", ..." if len(top) > 8 else "")
    return (
        f"its top-level modules with parameters are {shown} ({len(candidates)} module and parameter names in "
        "all: model.named_modules() and model.named_parameters() list them)"
    )
