"""How capture spends its time: one forward/backward per batch and checkpoint, checkpoints loaded
once, projection matrices generated once per process, micro-batches sized to memory, a progress bar
in examples per second. (Speed itself is measured in benchmarks/, never asserted here.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trackin_ooc as to
from trackin_ooc.capturing.checkpoints import loading as checkpoints_module
from trackin_ooc.capturing.job.device import resolve_device
from trackin_ooc.capturing.per_example.vmap import PerExampleGradients
from trackin_ooc.capturing.projection import dense as projection_module
from trackin_ooc.capturing.projection.features import MEMORY_ENV, micro_batch_size


def cap(trained, data, path, **kw):
    kw.setdefault("device", "cpu")
    return to.capture(trained.model, trained.checkpoints, data, path, **kw)


def test_factored_capture_runs_one_forward_and_backward_per_batch_and_checkpoint(mlp, digits, tmp_path, monkeypatch):
    forwards = []
    handle = mlp.model.register_forward_hook(lambda m, a, o: forwards.append(a[0].shape[0]))
    backwards = []
    real_grad = torch.autograd.grad

    def counting_grad(*a, **k):
        backwards.append(1)
        return real_grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoints_module.torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    try:
        store = cap(mlp, digits.train, tmp_path / "f.zarr", projection="factored", projection_dim=1024, batch_size=64)
    finally:
        handle.remove()
    n, c = len(digits.train), len(mlp.checkpoints)
    batches = math.ceil(n / 64)
    assert store.complete and store.n_examples == n
    # No probe (no convolution whose positions to count, no dense group whose per-example methods to choose):
    # one batched forward and backward per batch and checkpoint, never one per example.
    assert len(forwards) == batches * c and sum(forwards) == n * c
    assert len(backwards) == batches * c
    assert len(loads) == c  # each checkpoint file read once, outside the batch loop


def test_projection_matrices_are_generated_once_per_process(mlp, digits, digits_test, tmp_path, monkeypatch):
    calls = []
    real = projection_module.generate_block

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(projection_module, "generate_block", counting)
    for kind in ("factored", "gaussian"):
        calls.clear()
        kw = dict(projection=kind, projection_dim=768, seed=987, batch_size=50)
        cap(mlp, digits.train, tmp_path / f"{kind}_train.zarr", **kw)
        first = len(calls)
        assert first > 0
        # Every batch and checkpoint of the first capture, and all of the second, reuse them.
        cap(mlp, digits_test, tmp_path / f"{kind}_test.zarr", **kw)
        assert len(calls) == first, f"{kind}: the second capture generated {len(calls) - first} blocks again"


def test_dense_projection_streams_each_block_once_per_batch_for_all_checkpoints(
    mlp, digits_test, tmp_path, monkeypatch
):
    """With a matrix larger than the block cache, blocks are regenerated per batch, but never per
    checkpoint: all checkpoints' gradients go through one pass."""
    calls = []
    real = projection_module.generate_block
    monkeypatch.setattr(projection_module, "generate_block", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(projection_module._CACHE, "budget", 0)  # nothing fits: no reuse across batches
    dim = 4096
    cap(mlp, digits_test, tmp_path / "d.zarr", projection="gaussian", projection_dim=dim, seed=321, batch_size=20)
    rows = projection_module.rows_per_block(dim)
    per_matrix = sum(math.ceil(p.numel() / rows) for p in mlp.model.parameters())
    batches = math.ceil(len(digits_test) / 20)
    assert len(mlp.checkpoints) > 1
    assert len(calls) == per_matrix * batches


def test_micro_batches_sized_to_memory_give_the_same_gradients(mlp, digits_test, tmp_path, monkeypatch):
    n_params = sum(p.numel() for p in mlp.model.parameters())
    c = len(mlp.checkpoints)
    per_example = 4 * n_params * (c + 2)  # every checkpoint's gradients + vmap's temporaries
    assert micro_batch_size(256, n_params, budget=10 * per_example, n_checkpoints=c) == 10
    assert micro_batch_size(256, n_params, budget=1, n_checkpoints=c) == 1
    assert micro_batch_size(4, n_params, budget=1 << 40, n_checkpoints=c) == 4

    whole = cap(mlp, digits_test, tmp_path / "whole.zarr", batch_size=32)
    sizes = []
    real = PerExampleGradients.__call__

    def spy(self, state, inputs, targets):
        sizes.append(targets.shape[0])
        return real(self, state, inputs, targets)

    monkeypatch.setattr(PerExampleGradients, "__call__", spy)
    monkeypatch.setenv(MEMORY_ENV, str(per_example * 7))  # room for 7 examples' gradients
    small = cap(mlp, digits_test, tmp_path / "small.zarr", batch_size=32)
    assert max(sizes) == 7 and sum(sizes) == len(digits_test) * len(mlp.checkpoints)
    np.testing.assert_allclose(small.read_grads(), whole.read_grads(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(small.read_losses(), whole.read_losses(), rtol=1e-6)


def test_progress_bar_reports_examples_per_second(mlp, digits_test, tmp_path, capsys):
    cap(mlp, digits_test, tmp_path / "p.zarr", projection="factored", projection_dim=256, progress=True, batch_size=8)
    err = capsys.readouterr().err
    assert "capture" in err and "examples/s" in err


def test_device_auto_picks_cuda_when_available():
    assert resolve_device("cpu").type == "cpu"
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(to.CaptureError, match="cuda"):
            resolve_device("cuda")
