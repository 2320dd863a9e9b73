"""Which per-example gradient method each parameter uses, chosen once before a capture writes anything.

A probe batch (the first example, which the capture reads to lay out the store anyway) at the first
checkpoint tries the methods
(:class:`~..per_example.gradients.PerExampleGradients`: hooks where the layer type allows, checked
against the batch gradient; vmap for the rest; the per-example loop only where vmap fails). The choice
is recorded in the store's attributes (``per_example_methods``) and handed to every job, so all row
blocks, in-process or on Dask workers, use it. It is not part of the projection spec: every method is
exact, so stores captured by different methods share one feature space. The probe also surfaces bad
input (a batch without its targets, logits that fit no default loss) before a store is created.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from ..checkpoints import Checkpoint, drop_tied_duplicates
from ..per_example.batches import split_batch, to_device
from ..per_example.gradients import PerExampleGradients
from ..projection import factors as factors_spec
from ..projection.factored import plan_from_spec

# Examples in the probe batch. One is enough for the hooks' batch-gradient check (a use of a parameter
# the hooks miss shows in any batch), and reading no more than the store's layout does keeps a data set
# that stalls from stalling the capture before its store exists.
PROBE_EXAMPLES = 1


def probe_batch(dataset, collate_fn, target_key: str, n: int, device: torch.device):
    """(inputs, targets) of the first ``n`` examples, collated as the capture will."""
    collate = collate_fn or default_collate
    n = max(1, min(n, len(dataset)))
    inputs, targets = split_batch(collate([dataset[i] for i in range(n)]), target_key)
    return to_device(inputs, device), targets.to(device)


def choose_per_example_methods(job, checkpoint: Checkpoint, device: torch.device | None = None) -> dict[str, str]:
    """{parameter: "hooks" | "vmap" | "loop" | "factored" | "factors"} for a :class:`~.capture_job.CaptureJob`'s
    spec: parameters the factored projection hooks, or a factors store keeps as factors, need no probe."""
    spec = job.spec
    names = [n for n, _ in spec.layers]
    methods: dict[str, str] = {}
    if spec.kind == "factored":
        dense = {p for layer in plan_from_spec(spec) if layer.kind == "dense" for p in layer.params}
        methods = {n: "factored" for n in names if n not in dense}
        names = [n for n in names if n in dense]
    elif spec.kind == "factors":
        flat = set(factors_spec.plan_from_spec(spec).flat)
        methods = {n: "factors" for n in names if n not in flat}
        names = [n for n in names if n in flat]
    if not names:
        return methods
    dev = torch.device("cpu") if device is None else torch.device(device)
    model = job.model.to(dev).eval()
    state = {k: v.to(dev) for k, v in drop_tied_duplicates(model, checkpoint.state_dict).items()}
    inputs, targets = probe_batch(job.dataset, job.collate_fn, job.target_key, min(PROBE_EXAMPLES, job.batch_size), dev)
    chosen = PerExampleGradients(model, names, job.loss_fn).choose(state, inputs, targets)
    return {n: methods.get(n) or chosen[n] for n in (n for n, _ in spec.layers)}
