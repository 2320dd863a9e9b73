"""NaN or infinite gradients and losses: refused with the example ids, or stored as zeros and flagged.

Real captures of the digits MLP on data with poisoned examples (a NaN pixel gives NaN gradients;
a loss that is infinite for one class gives infinite losses with finite gradients).
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import trackin_ooc as to

from .test_cli import EX, ok, run_cli
from .test_cli_errors import FAILURE, check_failure

BAD = (7, 123)


@pytest.fixture(scope="module")
def poisoned(digits) -> TensorDataset:
    x, y = (t.clone() for t in digits.train.tensors)
    x[BAD[0]].view(-1)[3] = float("nan")
    x[BAD[1]].view(-1)[10] = float("inf")
    return TensorDataset(x, y)


def test_nan_gradients_are_refused_with_the_example_ids(mlp, poisoned, tmp_path):
    out = tmp_path / "s.zarr"
    with pytest.raises(to.NonFiniteError) as err:
        to.capture(mlp.model, mlp.checkpoints, poisoned, out, projection_dim=16, batch_size=256, chunk_rows=128)
    message = str(err.value)
    assert "ids 7, 123" in message and "2 example(s)" in message and "nonfinite='flag'" in message
    assert "\n" not in message
    store = to.open_store(out)
    assert not store.complete and not store.blocks_done()[0]  # the poisoned block is not marked written
    with pytest.raises(to.IncompleteStoreError):
        to.self_influence(store)


def test_flagged_examples_are_stored_as_zeros_and_listed(mlp, digits, poisoned, tmp_path):
    kw = dict(projection_dim=16, batch_size=64, chunk_rows=128)
    clean = to.capture(mlp.model, mlp.checkpoints, digits.train, tmp_path / "clean.zarr", **kw)
    flagged = to.capture(mlp.model, mlp.checkpoints, poisoned, tmp_path / "flagged.zarr", nonfinite="flag", **kw)
    assert flagged.complete and flagged.n_nonfinite == 2
    assert flagged.nonfinite_examples().tolist() == list(BAD)
    g, ref = flagged.read_grads(), clean.read_grads()
    assert np.isfinite(g).all() and not g[:, list(BAD)].any()
    keep = np.setdiff1d(np.arange(len(digits.train)), BAD)
    np.testing.assert_allclose(g[:, keep], ref[:, keep], rtol=1e-5, atol=1e-6)
    assert np.isnan(flagged.read_losses()[:, BAD[0]]).all()  # the loss is kept as it was
    with pytest.warns(to.NonFiniteWarning, match="2 example"):
        si = to.self_influence(flagged)
    assert np.isfinite(si.values).all() and (si.values[list(BAD)] == 0).all()


def test_infinite_losses_are_refused(mlp, digits, tmp_path):
    def inf_for_threes(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none") + torch.where(targets == 3, torch.inf, 0.0)

    with pytest.raises(to.NonFiniteError, match="non-finite gradients or losses"):
        to.capture(
            mlp.model, mlp.checkpoints, digits.train, tmp_path / "s.zarr", projection_dim=16, loss_fn=inf_for_threes
        )


def test_a_refused_capture_resumes_with_flagging(mlp, poisoned, tmp_path):
    """Blocks before the poisoned one are kept; rerunning with nonfinite='flag' finishes the store."""
    out = tmp_path / "s.zarr"
    kw = dict(projection_dim=16, batch_size=50, chunk_rows=100)
    with pytest.raises(to.NonFiniteError, match="ids 7"):
        to.capture(mlp.model, mlp.checkpoints, poisoned, out, **kw)
    assert not to.open_store(out).blocks_done().any()
    x = poisoned.tensors[0].clone()
    x[BAD[0]] = 0.0  # fix example 7: the capture now stops at 123
    with pytest.raises(to.NonFiniteError, match="ids 123"):
        to.capture(mlp.model, mlp.checkpoints, TensorDataset(x, poisoned.tensors[1]), out, **kw)
    assert to.open_store(out).blocks_done().tolist()[:2] == [True, False]
    store = to.capture(mlp.model, mlp.checkpoints, poisoned, out, nonfinite="flag", **kw)
    assert store.complete and store.nonfinite_examples().tolist() == [123]  # block 0 was kept, not redone


def test_cli_refuses_or_flags_nonfinite_examples(mlp, tmp_path):
    (tmp_path / "usercode.py").write_text(
        textwrap.dedent(f"""
        from torch.utils.data import Dataset
        from {EX.split(":")[0]} import digits_train_small

        class _NaNAt5(Dataset):
            def __init__(self):
                self.base = digits_train_small()
            def __len__(self):
                return len(self.base)
            def __getitem__(self, i):
                x, y = self.base[i]
                return (x * float("nan"), y) if i == 5 else (x, y)

        def data():
            return _NaNAt5()
    """)
    )
    from trackin_ooc.demo import train_with_checkpoints
    from trackin_ooc.demo.examples import digits_mlp_model, digits_train_small

    ckpts = train_with_checkpoints(
        digits_mlp_model(), digits_train_small(), tmp_path / "ckpt", epochs=2, checkpoint_every=1, seed=0
    )
    args = [
        "capture",
        "--model",
        f"{EX}:digits_mlp_model",
        "--data",
        "usercode.py:data",
        "--projection-dim",
        "8",
        "--out",
        "s.zarr",
    ]
    for c in ckpts:
        args += ["--checkpoint", str(c)]
    check_failure(run_cli(*args, cwd=tmp_path), FAILURE, "ids 5", "--allow-nonfinite")
    ok(run_cli(*args, "--allow-nonfinite", cwd=tmp_path))
    info = ok(run_cli("info", "s.zarr", cwd=tmp_path)).stdout
    assert "non-finite      1 example(s) stored as zeros (ids 5)" in info
