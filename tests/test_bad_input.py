"""Bad input fails early with a specific error whose message says what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trackin_ooc as to


def capture(trained, data, path, **kw):
    kw.setdefault("projection_dim", 32)
    return to.capture(trained.model, kw.pop("checkpoints", trained.checkpoints), data, path, **kw)


def test_missing_checkpoint_file(mlp, digits_test, tmp_path):
    missing = tmp_path / "epoch_999.pt"
    path = tmp_path / "s.zarr"
    with pytest.raises(to.CheckpointNotFoundError, match="not found") as err:
        capture(mlp, digits_test, path, checkpoints=[*mlp.checkpoints, missing])
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value)
    assert "check the path" in str(err.value)
    assert not path.exists()  # nothing half-made that would block a corrected rerun


def test_state_dict_that_does_not_fit_the_model(mlp, cnn, digits_test, tmp_path):
    path = tmp_path / "s.zarr"
    wrong = [mlp.checkpoints[0], cnn.checkpoints[1]]  # a CNN checkpoint for the MLP
    with pytest.raises(to.CheckpointError, match="does not fit the model") as err:
        capture(mlp, digits_test, path, checkpoints=wrong)
    msg = str(err.value)
    assert cnn.checkpoints[1].name in msg
    assert "missing" in msg and "unexpected" in msg  # names what is wrong
    assert "architecture" in msg  # and what to do
    assert not path.exists()

    # Same names, wrong shapes: an MLP with another hidden width.
    other = {k: v for k, v in mlp.model.state_dict().items()}
    other["1.weight"] = torch.zeros(32, 64)
    with pytest.raises(to.CheckpointError, match="shape"):
        capture(mlp, digits_test, path, checkpoints=[other], learning_rates=[0.1])


def test_wrong_number_of_learning_rates(mlp, digits_test, tmp_path):
    assert len(mlp.checkpoints) >= 2
    with pytest.raises(to.CaptureError, match="one learning rate per checkpoint") as err:
        capture(mlp, digits_test, tmp_path / "s.zarr", learning_rates=[0.1])
    assert f"1 learning rates for {len(mlp.checkpoints)} checkpoints" in str(err.value)


def test_checkpoint_without_learning_rate(mlp, digits_test, tmp_path):
    ckpt = torch.load(mlp.checkpoints[0], weights_only=True)
    plain = tmp_path / "plain.pt"
    torch.save(ckpt["model_state_dict"], plain)  # a bare state dict: no learning rate anywhere
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model_state_dict": ckpt["model_state_dict"], "epoch": 4}, wrapped)
    for path in (plain, wrapped):
        with pytest.raises(to.CaptureError, match="no learning rate") as err:
            capture(mlp, digits_test, tmp_path / f"{path.stem}.zarr", checkpoints=[path])
        assert "learning_rates=" in str(err.value)  # says how to give one
        assert not (tmp_path / f"{path.stem}.zarr").exists()
    # Given explicitly, the same checkpoint works and the store records the given rate, not 1.0.
    store = capture(mlp, digits_test, tmp_path / "ok.zarr", checkpoints=[plain], learning_rates=[0.03])
    np.testing.assert_array_equal(store.learning_rates, [0.03])


def test_empty_dataset(mlp, tmp_path):
    empty = TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))
    with pytest.raises(to.EmptyDatasetError, match="empty") as err:
        capture(mlp, empty, tmp_path / "s.zarr")
    assert isinstance(err.value, to.CaptureError)
    assert "at least one example" in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


def test_existing_store_without_overwrite(mlp, digits_test, tmp_path):
    path = tmp_path / "s.zarr"
    first = capture(mlp, digits_test, path)
    grads, store_id = first.read_grads(), first.store_id
    with pytest.raises(to.StoreExistsError, match="already exists") as err:
        capture(mlp, digits_test, path, projection_dim=16)
    assert "overwrite=True" in str(err.value)
    with pytest.raises(to.StoreExistsError, match="overwrite=True"):
        to.from_arrays(path, np.zeros((1, 3, 2), dtype=np.float32), [1.0])

    # The existing store is untouched and still opens.
    kept = to.open_store(path)
    assert kept.complete and kept.store_id == store_id and kept.feature_dim == 32
    np.testing.assert_array_equal(kept.read_grads(), grads)
    assert to.self_influence(path).sizes["example"] == len(digits_test)

    # With overwrite=True it is replaced.
    new = capture(mlp, digits_test, path, projection_dim=16, overwrite=True)
    assert new.feature_dim == 16 and new.store_id != store_id


def test_shuffling_dataloader(mlp, digits_test, tmp_path):
    loader = DataLoader(digits_test, batch_size=16, shuffle=True)
    with pytest.raises(to.CaptureError, match="dataset order") as err:
        capture(mlp, loader, tmp_path / "s.zarr")
    assert "shuffle=False" in str(err.value)
    assert not (tmp_path / "s.zarr").exists()
    # A loader that keeps dataset order is fine and gives the dataset's own rows.
    ordered = capture(mlp, DataLoader(digits_test, batch_size=16, shuffle=False), tmp_path / "a.zarr")
    direct = capture(mlp, digits_test, tmp_path / "b.zarr")
    np.testing.assert_allclose(ordered.read_grads(), direct.read_grads(), rtol=1e-5, atol=1e-7)
