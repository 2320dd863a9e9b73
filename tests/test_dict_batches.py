"""Batches and model outputs as users bring them: Hugging Face style dict batches (targets under
``target_key``, a DataLoader's data collator honoured), outputs as tensors, tuples, Mappings or objects
with ``logits``, the default losses (cross-entropy; causal LM summed over tokens), and the one-line
errors for a batch without its targets and for logits no default loss fits (library and CLI)."""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import trackin_ooc as to
from trackin_ooc.capturing.per_example.losses import default_loss
from trackin_ooc.demo import architectures as arch

from .test_cli import cli_env, run_cli


class AsDicts(Dataset):
    """A (x, y) dataset as dict examples ``{"pixels": x, key: y}``."""

    def __init__(self, ds, key: str = "labels"):
        self.ds, self.key = ds, key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return {"pixels": x, self.key: y}


class Wrapped(nn.Module):
    """The same network, taking keyword ``pixels`` and returning its logits in another form."""

    def __init__(self, net: nn.Module, form: str = "tensor"):
        super().__init__()
        self.net, self.form = net, form

    def forward(self, pixels):
        logits = self.net(pixels)
        if self.form == "tuple":
            return logits, logits.detach()
        if self.form == "mapping":
            return {"logits": logits, "hidden": logits.detach()}
        if self.form == "object":
            return SimpleNamespace(logits=logits)
        return logits


@pytest.fixture(scope="module")
def wrapped_checkpoints(mlp, tmp_path_factory) -> list:
    """The MLP's checkpoints with keys under ``net.`` (what Wrapped(mlp) loads)."""
    root = tmp_path_factory.mktemp("wrapped")
    out = []
    for p in mlp.checkpoints:
        ck = torch.load(p, weights_only=True)
        ck["model_state_dict"] = {f"net.{k}": v for k, v in ck["model_state_dict"].items()}
        torch.save(ck, root / p.name)
        out.append(root / p.name)
    return out


@pytest.fixture(scope="module")
def plain_store(mlp, digits_test, tmp_path_factory):
    return to.capture(
        mlp.model,
        mlp.checkpoints,
        digits_test,
        tmp_path_factory.mktemp("plain") / "s.zarr",
        device="cpu",
        batch_size=16,
    )


@pytest.mark.parametrize("form", ["tuple", "mapping", "object"])
def test_dict_batches_and_every_output_form_give_the_plain_models_gradients(
    form, mlp, wrapped_checkpoints, digits_test, plain_store, tmp_path
):
    store = to.capture(
        Wrapped(mlp.fresh(), form),
        wrapped_checkpoints,
        AsDicts(digits_test),
        tmp_path / "d.zarr",
        device="cpu",
        batch_size=16,
    )
    np.testing.assert_allclose(store.read_grads(), plain_store.read_grads(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(store.read_losses(), plain_store.read_losses(), rtol=1e-6)
    np.testing.assert_array_equal(store.labels(), digits_test.tensors[1].numpy())


def test_target_key_names_where_the_targets_are(mlp, wrapped_checkpoints, digits_test, plain_store, tmp_path):
    store = to.capture(
        Wrapped(mlp.fresh()),
        wrapped_checkpoints,
        AsDicts(digits_test, key="digit"),
        tmp_path / "k.zarr",
        device="cpu",
        batch_size=16,
        target_key="digit",
    )
    np.testing.assert_allclose(store.read_grads(), plain_store.read_grads(), rtol=1e-5, atol=1e-7)


def test_a_custom_loss_gets_the_model_output_as_it_is(mlp, wrapped_checkpoints, digits_test, plain_store, tmp_path):
    seen = []

    def loss_fn(outputs, targets):
        seen.append(type(outputs))
        return F.cross_entropy(outputs["logits"], targets, reduction="none")

    store = to.capture(
        Wrapped(mlp.fresh(), "mapping"),
        wrapped_checkpoints,
        AsDicts(digits_test),
        tmp_path / "c.zarr",
        device="cpu",
        batch_size=16,
        loss_fn=loss_fn,
    )
    assert seen and all(issubclass(t, Mapping) for t in seen)
    np.testing.assert_allclose(store.read_grads(), plain_store.read_grads(), rtol=1e-5, atol=1e-7)


def test_a_dict_batch_without_its_targets_is_refused_in_one_line_naming_the_key(
    mlp, wrapped_checkpoints, digits_test, tmp_path
):
    path = tmp_path / "missing.zarr"
    with pytest.raises(to.CaptureError) as err:
        to.capture(Wrapped(mlp.fresh()), wrapped_checkpoints, AsDicts(digits_test, key="digit"), path, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'labels'" in msg and "'digit'" in msg and "target_key" in msg
    assert not path.exists()  # refused before any store was laid out


def test_logits_that_fit_no_default_loss_are_refused_in_one_line_asking_for_loss_fn(
    mlp, wrapped_checkpoints, digits_test, tmp_path
):
    class PairTargets(Dataset):  # (B, 10) logits against integer targets of shape (B, 2)
        def __len__(self):
            return 12

        def __getitem__(self, i):
            x, y = digits_test[i]
            return {"pixels": x, "labels": torch.stack([y, y])}

    path = tmp_path / "shape.zarr"
    with pytest.raises(to.CaptureError) as err:
        to.capture(Wrapped(mlp.fresh()), wrapped_checkpoints, PairTargets(), path, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"logits of shape \((\d+), 10\).* targets of shape \(\1, 2\).*loss_fn", msg), msg
    assert not path.exists()


def test_default_loss_rules():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen)
    ids = torch.randint(0, 7, (3, 5), generator=gen)
    ids[1, 3:] = -100  # padding of a shorter sequence
    got = default_loss(logits, ids)
    # Position t predicts token t+1; -100 ignored; summed over tokens, per example.
    for i in range(3):
        keep = ids[i, 1:] != -100
        want = F.cross_entropy(logits[i, :-1][keep], ids[i, 1:][keep], reduction="sum")
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(
        default_loss((logits[:, 0],), ids[:, 0].clamp_min(0)),
        F.cross_entropy(logits[:, 0], ids[:, 0].clamp_min(0), reduction="none"),
    )
    with pytest.raises(to.CaptureError, match=r"logits of shape \(3, 5, 7\).*targets of shape \(3,\).*loss_fn"):
        default_loss(logits, ids[:, 0])
    with pytest.raises(to.CaptureError, match="float32 targets"):
        default_loss(logits[:, 0], torch.zeros(3))


def test_language_model_targets_are_not_stored_as_labels(tmp_path):
    from trackin_ooc.demo import load_digits_split

    data = Subset(arch.digit_token_dicts(load_digits_split(n_train=100).train, task="lm"), range(10))
    model = arch.tiny_gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    store = to.capture(
        model,
        [state],
        DataLoader(data, batch_size=4, collate_fn=arch.pad_collate),
        tmp_path / "lm.zarr",
        learning_rates=[0.1],
        device="cpu",
    )
    assert not store.has_labels and store.n_examples == 10
    assert np.all(np.isfinite(store.read_losses())) and np.all(store.read_losses() > 0)


# ---- CLI: --target-key -----------------------------------------------------------------------------
def test_cli_target_key_names_where_the_targets_are(mlp, wrapped_checkpoints, plain_store, tmp_path):
    code = tmp_path / "user.py"
    code.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from tests.test_dict_batches import AsDicts, Wrapped
        from tests.conftest import MLP_HIDDEN
        from trackin_ooc.demo import digits_mlp, load_digits_split

        def model():
            return Wrapped(digits_mlp(MLP_HIDDEN))

        def data():  # the conftest's digits_test, as dicts with the targets under "digit"
            from torch.utils.data import TensorDataset
            from tests.conftest import N_TEST, N_TRAIN
            x, y = load_digits_split(n_train=N_TRAIN, seed=0).test.tensors
            return AsDicts(TensorDataset(x[:N_TEST], y[:N_TEST]), key="digit")
    """)
    )
    args = [
        "capture",
        "--model",
        f"{code}:model",
        "--data",
        f"{code}:data",
        *[a for p in wrapped_checkpoints for a in ("--checkpoint", p)],
        "--batch-size",
        "64",
    ]
    done = run_cli(*args, "--target-key", "digit", "--out", tmp_path / "yes.zarr", cwd=tmp_path, env=cli_env())
    assert done.returncode == 0, done.stderr
    store = to.open_store(tmp_path / "yes.zarr")
    assert store.n_examples == plain_store.n_examples
    np.testing.assert_allclose(store.read_grads(), plain_store.read_grads(), rtol=1e-4, atol=1e-6)
