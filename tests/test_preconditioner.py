"""Optimizer-aware gradients: the Adam form P^{1/2} g and its rank-1 (Adafactor) form, from the moments that
real training runs save (torch files after AdamW steps, a Hugging Face Trainer folder, a Lightning .ckpt).

Every reference is computed here from the raw moments of the live optimizer (by parameter object, never through
the package's id mapping) and plain per-example autograd gradients.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trackin_ooc as to
from trackin_ooc.capturing.checkpoints import state_dict_sha256
from trackin_ooc.capturing.projection.dense import projection_matrix
from trackin_ooc.demo import digits_mlp

from .test_checkpoint_formats import fit_lightning

N = 16  # examples captured per store
LR = 1e-2


def capture(model, checkpoints, data, path, **kw) -> to.GradientStore:
    kw.setdefault("batch_size", 8)
    kw.setdefault("device", "cpu")
    return to.capture(model, checkpoints, data, path, **kw)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class RawMoments:
    """What a live optimizer held for one parameter when its checkpoint was saved."""

    v: torch.Tensor  # exp_avg_sq, or max_exp_avg_sq with amsgrad
    step: float
    beta2: float
    eps: float

    @property
    def v_hat(self) -> torch.Tensor:
        return self.v.double() / (1 - self.beta2**self.step)


def live_moments(optimizer, named_params) -> dict[str, RawMoments]:
    """{parameter name: its moments} read from the optimizer object by parameter identity."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in named_params if q is p)
            st = optimizer.state[p]
            v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
            out[name] = RawMoments(v.detach().clone(), float(st["step"]), float(group["betas"][1]), float(group["eps"]))
    return out


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the tokens of one example."""
    return nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum")


def per_example_grads(
    model: nn.Module, state, data: TensorDataset, names, loss_fn=nn.functional.cross_entropy
) -> dict[str, torch.Tensor]:
    """{name: (N, *shape)} by autograd, one example at a time, the model in eval mode."""
    model.load_state_dict(state)
    model.eval()
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i in range(len(data)):
        x, y = data[i]
        logits = model(x.unsqueeze(0))
        logits = getattr(logits, "logits", logits)
        loss = loss_fn(logits, y.unsqueeze(0))
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            out[n].append(g.detach())
    return {n: torch.stack(v) for n, v in out.items()}


def adam_scaled(grads, moments) -> dict[str, torch.Tensor]:
    """g ∘ (√v̂ + ε)^{-1/2} (float64)."""
    return {n: g.double() * (moments[n].v_hat.sqrt() + moments[n].eps).rsqrt() for n, g in grads.items()}


def flat(grads, names) -> np.ndarray:
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1).double().numpy()


def assert_rel(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    """Equal within ``rtol`` of the expected values' largest magnitude (float32 storage of float64 references)."""
    scale = np.abs(expected).max()
    assert scale > 0
    err = np.abs(np.asarray(actual, dtype=np.float64) - expected).max()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} × {scale:.3g}"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# ---- (a) torch files written after real AdamW steps ------------------------------------------------------
@dataclass
class Run:
    paths: list[Path]
    states: list[dict[str, torch.Tensor]]
    moments: list[dict[str, RawMoments]]
    make: callable
    rates: list[float]


def adamw_run(
    root: Path,
    digits,
    *,
    amsgrad: bool = False,
    make=lambda: digits_mlp((32,), seed=0),
    epochs: int = 3,
    optimizer=None,
) -> Run:
    """AdamW on 160 digits, a torch file per epoch: weights, the optimizer state and the learning rate."""
    root.mkdir(parents=True, exist_ok=True)
    model = make()
    named = list(model.named_parameters())
    opt = (
        optimizer(model)
        if optimizer
        else torch.optim.AdamW(model.parameters(), lr=LR, amsgrad=amsgrad, weight_decay=0.01)
    )
    x, y = digits.train.tensors
    gen = torch.Generator().manual_seed(0)
    run = Run([], [], [], make, [])
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(160, generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        path = root / f"epoch_{epoch}.pt"
        torch.save(
            {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "learning_rate": LR},
            path,
        )
        run.paths.append(path)
        run.states.append(snapshot(model))
        run.moments.append(live_moments(opt, named) if "betas" in opt.param_groups[0] else {})
        run.rates.append(LR)
    return run


@pytest.fixture(scope="module")
def adamw(tmp_path_factory, digits) -> Run:
    return adamw_run(tmp_path_factory.mktemp("adamw"), digits)


@pytest.fixture(scope="module")
def data(digits) -> TensorDataset:
    x, y = digits.test.tensors
    return TensorDataset(x[:N].clone(), y[:N].clone())


def reference_adam(run: Run, data, names, c: int) -> dict[str, torch.Tensor]:
    grads = per_example_grads(run.make(), run.states[c], data, names)
    return adam_scaled(grads, run.moments[c])


def test_auto_picks_adam_for_adamw_files_and_equals_the_scaled_autograd_gradients(adamw, data, tmp_path, caplog):
    names = [n for n, _ in adamw.make().named_parameters()]
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):
        store = capture(adamw.make(), adamw.paths, data, tmp_path / "exact.zarr")  # preconditioner="auto"
    said = [r.getMessage() for r in caplog.records if "preconditioner='auto'" in r.getMessage()]
    assert len(said) == 1 and "adam" in said[0] and "epoch_0.pt" in said[0]
    assert store.spec.preconditioner == "adam" and store.spec.preconditioner_layers == ()
    assert set(store.spec.preconditioner_forms().values()) == {"adam"}
    want_si = np.zeros(N)
    for c in range(len(adamw.paths)):
        ref = flat(reference_adam(adamw, data, names, c), names)
        assert_rel(store.read_grads(checkpoint=c), ref)
        assert_rel(store.read_sq_norms()[c], (ref**2).sum(1))  # the exact norms are the preconditioned ones
        want_si += LR * (ref**2).sum(1)
    assert_rel(to.self_influence(store, exact_norms=True).values, want_si)
    assert_rel(to.self_influence(store).values, want_si)
    # Dense projections project the scaled gradient (scale, then project).
    gauss = capture(
        adamw.make(), adamw.paths, data, tmp_path / "gauss.zarr", projection_dim=48, seed=3, preconditioner="adam"
    )
    for c in range(len(adamw.paths)):
        ref = reference_adam(adamw, data, names, c)
        want = sum(
            ref[n].reshape(N, -1) @ projection_matrix("gaussian", 3, n, ref[n][0].numel(), 48).double() for n in names
        ).numpy()
        assert_rel(gauss.read_grads(checkpoint=c), want)
        assert_rel(gauss.read_sq_norms()[c], (flat(ref, names) ** 2).sum(1))


def test_amsgrad_uses_the_bias_corrected_maximum(tmp_path, digits, data):
    run = adamw_run(tmp_path / "ams", digits, amsgrad=True, epochs=2)
    saved = torch.load(run.paths[-1], weights_only=True)["optimizer_state_dict"]
    entry = saved["state"][0]
    assert saved["param_groups"][0]["amsgrad"] and not torch.equal(entry["max_exp_avg_sq"], entry["exp_avg_sq"])
    names = ["1.weight", "3.bias"]
    store = capture(run.make(), run.paths, data, tmp_path / "ams.zarr", layers=names, preconditioner="adam")
    for c in range(2):
        assert_rel(store.read_grads(checkpoint=c), flat(reference_adam(run, data, names, c), names))


# ---- (b) a folder written by the real Hugging Face Trainer ---------------------------------------------
@dataclass
class TrainerRun:
    run: Path
    states: list[dict[str, torch.Tensor]]
    moments: list[dict[str, RawMoments]]
    data: TensorDataset


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, digits) -> TrainerRun:
    """A tiny BERT (from a config) trained by Trainer with its default AdamW and weight decay, which puts
    biases and LayerNorm weights in a second parameter group: checkpoint-2 and checkpoint-4."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trackin_ooc.demo.architectures import CLS_ID, FIRST_PIXEL_ID, tiny_bert

    x, y = digits.train.tensors
    ids = torch.cat(
        [torch.full((48, 1), CLS_ID), torch.round(x[:48, 0, :2] * 16).long().reshape(48, -1) + FIRST_PIXEL_ID], dim=1
    )
    states, moments = [], []

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, model=None, optimizer=None, **kw):
            states.append(snapshot(model))
            moments.append(live_moments(optimizer, list(model.named_parameters())))

    run = tmp_path_factory.mktemp("hf") / "run"
    args = TrainingArguments(
        output_dir=str(run),
        per_device_train_batch_size=16,
        num_train_epochs=2,
        learning_rate=2e-3,
        weight_decay=0.01,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model=tiny_bert(),
            args=args,
            callbacks=[Snapshot()],
            train_dataset=[{"input_ids": i, "labels": t} for i, t in zip(ids, y)],
        )
        trainer.train()
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and len(groups[0]["params"]) and len(groups[1]["params"])  # decay, no decay
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert all((run / f / "optimizer.pt").is_file() for f in ("checkpoint-3", "checkpoint-6"))
    return TrainerRun(run, states, moments, TensorDataset(ids[:N], y[:N].clone()))


def test_trainer_folder_adam_form(trainer_run, tmp_path, caplog):
    from trackin_ooc.demo.architectures import tiny_bert

    layers = ["bert.encoder.layer.1", "classifier"]
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):
        store = capture(tiny_bert(), [trainer_run.run], trainer_run.data, tmp_path / "bert.zarr", layers=layers)
    assert store.spec.preconditioner == "adam"
    assert any(
        "preconditioner='auto': adam" in r.getMessage() and "optimizer.pt" in r.getMessage() for r in caplog.records
    )
    names = [n for n, _ in store.spec.layers]
    assert any(n.endswith("LayerNorm.weight") for n in names) and any(n.endswith(".bias") for n in names)
    for c in range(2):
        grads = per_example_grads(tiny_bert(), trainer_run.states[c], trainer_run.data, names)
        assert_rel(store.read_grads(checkpoint=c), flat(adam_scaled(grads, trainer_run.moments[c]), names))
    assert store.attrs["preconditioner_moments"][0].endswith("checkpoint-3/optimizer.pt")


def test_trainer_folder_without_readable_moments(trainer_run, tmp_path, caplog):
    from trackin_ooc.demo.architectures import tiny_bert

    folder = tmp_path / "checkpoint-3"
    shutil.copytree(trainer_run.run / "checkpoint-3", folder)
    (folder / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(to.CheckpointError) as err:
        capture(
            tiny_bert(), [folder], trainer_run.data, tmp_path / "s.zarr", layers=["classifier"], preconditioner="adam"
        )
    assert "optimizer.pt" in one_line(err) and not (tmp_path / "s.zarr").exists()
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):
        store = capture(tiny_bert(), [folder], trainer_run.data, tmp_path / "auto.zarr", layers=["classifier"])
    assert store.spec.preconditioner == "none"
    assert any(r.levelno == logging.WARNING and "optimizer.pt" in r.getMessage() for r in caplog.records)
    (folder / "optimizer.pt").unlink()
    with pytest.raises(to.CheckpointError) as err:
        capture(
            tiny_bert(), [folder], trainer_run.data, tmp_path / "s.zarr", layers=["classifier"], preconditioner="adam"
        )
    assert "has no optimizer.pt" in one_line(err) and "checkpoint-3" in str(err.value)


# ---- (c) a real Lightning checkpoint -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory, digits):
    import pytorch_lightning as pl

    saved: list[tuple[dict, dict]] = []

    class LitDigits(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = digits_mlp((32,), seed=0)
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(10))  # a buffer outside self.model

        def training_step(self, batch, _):
            x, y = batch
            return self.criterion(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

        def on_save_checkpoint(self, checkpoint):
            opt = self.trainer.optimizers[0]
            saved.append((snapshot(self.model), live_moments(opt, list(self.model.named_parameters()))))

    folder = tmp_path_factory.mktemp("lightning")
    x, y = digits.train.tensors
    files = fit_lightning(LitDigits(), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), folder, epochs=2)
    assert len(files) == len(saved) == 2
    return files, saved


def test_lightning_checkpoint_adam_form(lightning_run, data, tmp_path):
    files, saved = lightning_run
    raw = torch.load(files[0], weights_only=True)
    assert "optimizer_states" in raw and "exp_avg_sq" in raw["optimizer_states"][0]["state"][0]
    store = capture(digits_mlp((32,)), files, data, tmp_path / "lit.zarr")
    assert store.spec.preconditioner == "adam"
    names = [n for n, _ in store.spec.layers]
    for c, (state, moments) in enumerate(saved):
        grads = per_example_grads(digits_mlp((32,)), state, data, names)
        assert_rel(store.read_grads(checkpoint=c), flat(adam_scaled(grads, moments), names))


# ---- the SGD form: auto without moments, and None ----------------------------------------------------
def old_fingerprint(spec: to.ProjectionSpec) -> str:
    """The fingerprint a spec had before preconditioners existed (the same dict, nothing added)."""
    import hashlib
    import json

    from trackin_ooc.spec import GENERATOR, PROJECTION_KINDS

    d = {
        "kind": spec.kind,
        "dim": spec.dim,
        "seed": spec.seed,
        "generator": GENERATOR if spec.kind in PROJECTION_KINDS else None,
        "layers": [{"name": n, "shape": list(s)} for n, s in spec.layers],
        "extra": dict(spec.extra),
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_auto_keeps_the_sgd_form_without_adam_moments(mlp, digits, data, tmp_path, caplog):
    # SGD checkpoints without optimizer state (the session fixture), and a file with SGD momentum state.
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):
        auto = capture(mlp.fresh(), mlp.checkpoints, data, tmp_path / "auto.zarr", projection_dim=32)
    said = [r.getMessage() for r in caplog.records if "preconditioner='auto'" in r.getMessage()]
    assert len(said) == 1 and "SGD form" in said[0] and "epoch_004.pt" in said[0]
    none = capture(mlp.fresh(), mlp.checkpoints, data, tmp_path / "none.zarr", projection_dim=32, preconditioner=None)
    from trackin_ooc import testing as tt

    tt.assert_stores_identical(auto, none)
    assert none.spec.preconditioner == "none" and none.fingerprint == old_fingerprint(none.spec)
    assert "preconditioner_moments" not in none.attrs

    momentum = adamw_run(
        tmp_path / "sgd", digits, epochs=1, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):
        store = capture(momentum.make(), momentum.paths, data, tmp_path / "momentum.zarr")
    assert store.spec.preconditioner == "none"
    assert any("not an Adam-family optimizer" in r.getMessage() for r in caplog.records)


def test_none_keeps_the_sgd_form_on_adam_checkpoints(adamw, data, tmp_path):
    names = [n for n, _ in adamw.make().named_parameters()]
    store = capture(adamw.make(), adamw.paths, data, tmp_path / "sgd.zarr", preconditioner=None)
    plain = capture(adamw.make(), adamw.states, data, tmp_path / "plain.zarr", learning_rates=adamw.rates)
    assert store.spec.preconditioner == "none" and store.fingerprint == plain.fingerprint
    assert store.fingerprint == old_fingerprint(store.spec)
    # The hashes are of the weights alone, as before: the same as the plain state dicts'.
    assert store.checkpoint_hashes == plain.checkpoint_hashes == [state_dict_sha256(s) for s in adamw.states]
    for c in range(len(adamw.paths)):
        grads = per_example_grads(adamw.make(), adamw.states[c], data, names)
        assert_rel(store.read_grads(checkpoint=c), flat(grads, names))
    np.testing.assert_array_equal(store.read_grads(), plain.read_grads())


# ---- missing and mismatched moments ------------------------------------------------------------------
def test_adam_without_moments_names_the_checkpoint(mlp, data, tmp_path):
    with pytest.raises(to.CheckpointError) as err:
        capture(mlp.fresh(), mlp.checkpoints, data, tmp_path / "s.zarr", preconditioner="adam")
    msg = one_line(err)
    assert "epoch_004.pt" in msg and "no optimizer state" in msg and "preconditioner=None" in msg
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(to.CaptureError, match="unknown preconditioner 'adamw'"):
        capture(mlp.fresh(), mlp.checkpoints, data, tmp_path / "s.zarr", preconditioner="adamw")


def test_mismatched_moments_name_the_parameter(adamw, digits, data, tmp_path, caplog):
    # Moments of another architecture (hidden 16) saved beside these weights (hidden 32).
    other = adamw_run(tmp_path / "other", digits, epochs=1, make=lambda: digits_mlp((16,), seed=0))
    mixed = tmp_path / "mixed.pt"
    torch.save(
        {
            "model_state_dict": adamw.states[0],
            "learning_rate": LR,
            "optimizer_state_dict": torch.load(other.paths[0], weights_only=True)["optimizer_state_dict"],
        },
        mixed,
    )
    with pytest.raises(to.CheckpointError) as err:
        capture(adamw.make(), [mixed], data, tmp_path / "s.zarr", preconditioner="adam")
    msg = one_line(err)
    assert "mixed.pt" in msg and "1.weight" in msg and "(16, 64)" in msg and "(32, 64)" in msg
    assert "preconditioner=None" in msg and not (tmp_path / "s.zarr").exists()
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):  # auto: the SGD form, with a warning saying why
        store = capture(adamw.make(), [mixed], data, tmp_path / "auto.zarr")
    assert store.spec.preconditioner == "none"
    assert any(r.levelno == logging.WARNING and "1.weight" in r.getMessage() for r in caplog.records)

    # An optimizer over the last layer only (names recorded): the first selected parameter without moments.
    model = adamw.make()
    opt = torch.optim.AdamW([(n, p) for n, p in model.named_parameters() if n.startswith("3.")], lr=LR)
    x, y = digits.train.tensors
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    opt.step()
    part = tmp_path / "part.pt"
    torch.save({"model": snapshot(model), "optimizer": opt.state_dict(), "lr": LR}, part)
    with pytest.raises(to.CheckpointError) as err:
        capture(adamw.make(), [part], data, tmp_path / "s.zarr", preconditioner="adam")
    msg = one_line(err)
    assert "part.pt" in msg and "parameter 1.weight" in msg and "layers" in msg
    store = capture(adamw.make(), [part], data, tmp_path / "last.zarr", layers=["3"], preconditioner="adam")
    assert store.spec.preconditioner == "adam"

    # Unnamed ids that do not cover the model: the count is said, with the first parameter left without one.
    opt = torch.optim.AdamW(list(model.parameters())[2:], lr=LR)
    nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    opt.step()
    torch.save({"model": snapshot(model), "optimizer": opt.state_dict(), "lr": LR}, part)
    with pytest.raises(to.CheckpointError) as err:
        capture(adamw.make(), [part], data, tmp_path / "s.zarr", preconditioner="adam")
    msg = one_line(err)
    assert "holds 2 parameter ids, the model 4 parameters" in msg and "named_parameters()" in msg


def test_checkpoint_hashes_cover_the_moments(adamw, data, tmp_path):
    """A resumed capture notices an optimizer state that changed, as it notices changed weights."""
    copies = []
    for p in adamw.paths[:2]:
        copies.append(tmp_path / p.name)
        shutil.copy(p, copies[-1])
    kw = dict(projection_dim=16, chunk_rows=8, preconditioner="adam")
    store = capture(adamw.make(), copies, data, tmp_path / "s.zarr", **kw)
    assert store.checkpoint_hashes[0] != state_dict_sha256(adamw.states[0])
    group = store._writable()
    group["block_complete"][1:] = 0
    group.attrs["trackin_ooc"] = dict(group.attrs["trackin_ooc"], complete=False)
    saved = torch.load(copies[1], weights_only=True)
    saved["optimizer_state_dict"]["state"][0]["exp_avg_sq"] *= 2
    torch.save(saved, copies[1])
    with pytest.raises(to.CaptureError, match="checkpoint contents"):
        capture(adamw.make(), copies, data, tmp_path / "s.zarr", **kw)
    with pytest.raises(to.CaptureError) as err:  # resuming it as the SGD form: the preconditioner is named
        capture(adamw.make(), copies, data, tmp_path / "s.zarr", **{**kw, "preconditioner": None})
    assert "preconditioner: store adam vs this capture none" in one_line(err)


# ---- the rank-1 (Adafactor) form: flat, factored and factors stores ---------------------------------------
def rank1_scaled(grads, moments, layers) -> dict[str, torch.Tensor]:
    """The reference rank-1 form from the raw moments: per layer (weight as d_out × d_in via ``as_matrix``, its
    bias as one more input column) the Adafactor factorisation of v̂ + ε², P_ij = √(m' / (r'_i c'_j)) with
    r' = row means + ε², c' = column means + ε², m' = mean + ε²; every other parameter elementwise
    (√v̂ + ε)^{-1/2}."""
    out = adam_scaled(grads, moments)
    for weight, bias, as_matrix, from_matrix in layers:
        w = moments[weight]
        cols = [as_matrix(w.v_hat)] + ([moments[bias].v_hat.reshape(-1, 1)] if bias else [])
        v = torch.cat(cols, dim=1)
        e2 = w.eps**2
        r, c, m = v.mean(1) + e2, v.mean(0) + e2, v.mean() + e2
        s = (m / (r[:, None] * c[None, :])) ** 0.25  # P^{1/2}
        d_in = as_matrix(w.v_hat).shape[1]
        out[weight] = grads[weight].double() * from_matrix(s[:, :d_in])
        if bias:
            out[bias] = grads[bias].double() * s[:, d_in]
    return out


def linear_layer(weight: str, bias: str | None, shape=None):
    """(weight, bias, as d_out × d_in, back to the weight's shape) of a Linear or Conv2d."""
    return (weight, bias, lambda t: t.reshape(t.shape[0], -1), lambda m: m.reshape(shape) if shape else m)


def conv_net(seed: int = 0) -> nn.Module:
    """Two 3×3 convolutions (36 and 16 positions), a Linear, a LayerNorm (no factored form), a Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 24),
        nn.LayerNorm(24),
        nn.ReLU(),
        nn.Linear(24, 10),
    )


@pytest.fixture(scope="module")
def conv_adamw(tmp_path_factory, digits) -> Run:
    return adamw_run(tmp_path_factory.mktemp("conv_adamw"), digits, make=conv_net, epochs=2)


CONV_LAYERS = [
    linear_layer("0.weight", "0.bias", (6, 1, 3, 3)),
    linear_layer("2.weight", "2.bias", (8, 6, 3, 3)),
    linear_layer("5.weight", "5.bias"),
    linear_layer("8.weight", "8.bias"),
]


def test_factored_adam_uses_the_rank1_form_for_its_layers(conv_adamw, data, tmp_path, caplog):
    from trackin_ooc.capturing.projection.factored import plan_from_spec, project_gradients

    with caplog.at_level(logging.INFO, logger="trackin_ooc"):
        store = capture(
            conv_adamw.make(),
            conv_adamw.paths,
            data,
            tmp_path / "fac.zarr",
            projection="factored",
            projection_dim=160,
            preconditioner="adam",
        )
    spec = store.spec
    assert spec.preconditioner == "adam"
    assert [m for _, m, _ in spec.preconditioner_layers] == ["0", "2", "5", "8"]
    forms = spec.preconditioner_forms()
    assert forms["5.bias"] == forms["2.weight"] == "adafactor" and forms["6.weight"] == forms["6.bias"] == "adam"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preconditioner='adam'")]
    assert len(said) == 1 and "4 layers" in said[0]
    assert any(x.kind == "dense" and "6.weight" in x.params for x in plan_from_spec(spec))
    assert any(x.kind == "conv2d" and not x.in_identity for x in plan_from_spec(spec))  # a random input factor
    names = [n for n, _ in spec.layers]
    for c in range(2):
        grads = per_example_grads(conv_adamw.make(), conv_adamw.states[c], data, names)
        ref = rank1_scaled(grads, conv_adamw.moments[c], CONV_LAYERS)
        want = project_gradients(spec, {n: g.float() for n, g in ref.items()}).double().numpy()
        assert_rel(store.read_grads(checkpoint=c), want)
        assert_rel(store.read_sq_norms()[c], (flat(ref, names) ** 2).sum(1))
    # The flat capture with "adafactor" takes the same rank-1 form for every layer, and the same exact norms.
    flat_store = capture(conv_adamw.make(), conv_adamw.paths, data, tmp_path / "flat.zarr", preconditioner="adafactor")
    assert set(flat_store.spec.preconditioner_forms().values()) == {"adafactor", "adam"}
    for c in range(2):
        grads = per_example_grads(conv_adamw.make(), conv_adamw.states[c], data, names)
        ref = rank1_scaled(grads, conv_adamw.moments[c], CONV_LAYERS)
        assert_rel(flat_store.read_grads(checkpoint=c), flat(ref, names))
    assert_rel(
        to.self_influence(store, exact_norms=True).values, to.self_influence(flat_store, exact_norms=True).values
    )


def test_factors_store_adafactor_scores_equal_the_reference(adamw, data, tmp_path):
    names = [n for n, _ in adamw.make().named_parameters()]
    layers = [linear_layer("1.weight", "1.bias"), linear_layer("3.weight", "3.bias")]
    store = capture(
        adamw.make(), adamw.paths, data, tmp_path / "factors.zarr", projection="factors", preconditioner="adafactor"
    )
    assert store.has_factors and store.spec.preconditioner == "adafactor"
    ref = np.stack(
        [
            flat(
                rank1_scaled(per_example_grads(adamw.make(), adamw.states[c], data, names), adamw.moments[c], layers),
                names,
            )
            for c in range(len(adamw.paths))
        ]
    )
    want = np.einsum("c,cik,cjk->ij", np.asarray(adamw.rates), ref[:, :6], ref)
    assert_rel(to.influence(store.path, store.path).values[:6], want)
    assert_rel(to.self_influence(store, exact_norms=True).values, np.einsum("c,cik->i", adamw.rates, ref**2))
    # "adam" on a factors store: its factor layers take the same rank-1 form (here: every layer).
    as_adam = capture(
        adamw.make(), adamw.paths, data, tmp_path / "adam.zarr", projection="factors", preconditioner="adam"
    )
    assert set(as_adam.spec.preconditioner_forms().values()) == {"adafactor"}
    assert_rel(to.self_influence(as_adam, exact_norms=True).values, np.einsum("c,cik->i", adamw.rates, ref**2))


def test_scaled_calls_equal_the_scaled_gradients():
    """A preconditioned conv or Embedding call (a and δ scaled) forms P^{1/2} ∘ G, and gives the scaled patches."""
    from trackin_ooc.capturing.projection.calls import ConvCall, RowsCall
    from trackin_ooc.capturing.projection.factors import LayerChoice
    from trackin_ooc.capturing.projection.preconditioner import LayerScale

    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x, delta = torch.randn(4, 3, 6, 6, generator=gen), torch.randn(4, 5, 6, 6, generator=gen)
    layer = LayerChoice("conv2d", "c", ("c.weight", "c.bias"), 28, 5, "factors").tap_layer()
    p, q = torch.rand(5, generator=gen) + 0.5, torch.rand(28, generator=gen) + 0.5  # P^{1/2}_ij = p_i q_j
    plain = ConvCall(layer, conv, x, delta)
    scaled = ConvCall(layer, conv, x, delta, LayerScale(q[:-1] / q[-1], p * q[-1]))
    g = plain.formed(0, 4)  # (B, d_in incl. bias, d_out)
    torch.testing.assert_close(scaled.formed(0, 4), g * q[None, :, None] * p[None, None, :], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.rows(), plain.rows() * (q[:-1] / q[-1]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scaled.delta, plain.delta * p * q[-1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        scaled.batch_weight_grad().reshape(5, -1).T,
        (g[:, :-1] * (q[:-1] / q[-1])[None, :, None] * (p * q[-1])[None, None, :]).sum(0),
        rtol=1e-5,
        atol=1e-5,
    )

    emb = LayerChoice("embedding", "e", ("e.weight",), 11, 4, "factors").tap_layer()
    ids, d = torch.randint(0, 11, (3, 5), generator=gen), torch.randn(3, 5, 4, generator=gen)
    p, q = torch.rand(4, generator=gen) + 0.5, torch.rand(11, generator=gen) + 0.5
    g = RowsCall(emb, ids, d).formed(0, 3)  # (B, vocabulary, d_out)
    torch.testing.assert_close(
        RowsCall(emb, ids, d, LayerScale(q, p)).formed(0, 3), g * q[None, :, None] * p, rtol=1e-5, atol=1e-6
    )


def test_gpt2_factored_adam(digits, tmp_path):
    """GPT-2 (Conv1D layers stored (in, out), position ids shared by the batch, a tied embedding in the dense
    group) after real AdamW steps: the factored "adam" capture equals the reference."""
    from trackin_ooc.capturing.projection.factored import project_gradients
    from trackin_ooc.demo.architectures import CLS_ID, FIRST_PIXEL_ID, tiny_gpt2

    x, _ = digits.train.tensors
    ids = torch.cat(
        [torch.full((48, 1), CLS_ID), torch.round(x[:48, 0, :2] * 16).long().reshape(48, -1) + FIRST_PIXEL_ID], dim=1
    )
    model = tiny_gpt2(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for idx in torch.arange(48).split(16):
        opt.zero_grad()
        model(ids[idx], labels=ids[idx]).loss.backward()
        opt.step()
    path = tmp_path / "gpt2.pt"
    torch.save({"model": snapshot(model), "optimizer": opt.state_dict(), "lr": 2e-3}, path)
    moments = live_moments(opt, list(model.named_parameters()))
    data = TensorDataset(ids[:8], ids[:8].clone())
    layers = ["transformer.wte", "transformer.wpe", "transformer.h.1", "transformer.ln_f"]
    store = capture(
        tiny_gpt2(seed=3),
        [path],
        data,
        tmp_path / "gpt2.zarr",
        layers=layers,
        projection="factored",
        projection_dim=256,
    )
    spec = store.spec
    assert spec.preconditioner == "adam"
    kinds = {m: k for k, m, _ in spec.preconditioner_layers}
    assert kinds["transformer.h.1.attn.c_attn"] == "hf_conv1d" and kinds["transformer.wpe"] == "embedding"
    assert "transformer.wte" not in kinds  # tied to lm_head: the dense group, elementwise
    names = [n for n, _ in spec.layers]
    grads = per_example_grads(tiny_gpt2(seed=3), snapshot(model), data, names, loss_fn=lm_loss)
    conv1d = [
        (p[0], p[1] if len(p) == 2 else None, lambda t: t.T, lambda m: m.T)  # (in, out); (vocabulary, width)
        for k, _, p in spec.preconditioner_layers
        if k in ("hf_conv1d", "embedding")
    ]
    plain_linear = [
        linear_layer(*p) if len(p) == 2 else linear_layer(p[0], None)
        for k, _, p in spec.preconditioner_layers
        if k == "linear"
    ]
    ref = rank1_scaled(grads, moments, conv1d + plain_linear)
    want = project_gradients(spec, {n: g.float() for n, g in ref.items()}).double().numpy()
    assert_rel(store.read_grads(checkpoint=0), want)
    assert_rel(store.read_sq_norms()[0], (flat(ref, names) ** 2).sum(1))


# ---- stores with different preconditioners, info and the CLI ----------------------------------------------
def test_stores_with_different_preconditioners_are_refused(adamw, digits, data, tmp_path):
    x, y = digits.train.tensors
    train_data = TensorDataset(x[:24].clone(), y[:24].clone())
    train = capture(adamw.make(), adamw.paths, train_data, tmp_path / "train.zarr", preconditioner="adam")
    test = capture(adamw.make(), adamw.paths, data, tmp_path / "test.zarr", preconditioner="adam")
    names = [n for n, _ in adamw.make().named_parameters()]
    want = sum(
        LR
        * flat(reference_adam(adamw, data, names, c), names)
        @ flat(reference_adam(adamw, train_data, names, c), names).T
        for c in range(len(adamw.paths))
    )
    assert_rel(to.influence(test, train).values, want)  # Σ_c η_c g'ᵀ P_c g
    for other, kind in [(None, "none"), ("adafactor", "adafactor")]:
        mixed = capture(adamw.make(), adamw.paths, data, tmp_path / f"test_{kind}.zarr", preconditioner=other)
        for call in (to.influence, lambda a, b: to.top_k(a, b, k=3)):
            with pytest.raises(to.IncompatibleStoresError) as err:
                call(mixed, train)
            msg = one_line(err)
            assert "different preconditioners" in msg and f"test '{kind}', train 'adam'" in msg
            assert "preconditioner='adam'" in msg and "different weights" not in msg


def test_cli_preconditioner_option_and_info(adamw, tmp_path):
    import json

    from .test_cli import ok, run_cli

    ex = "trackin_ooc.demo.examples"
    common = [
        "capture",
        "--model",
        f"{ex}:digits_mlp_model",
        "--data",
        f"{ex}:digits_test_small",
        *[a for p in adamw.paths for a in ("--checkpoint", p)],
        "--batch-size",
        "50",
    ]
    ok(run_cli(*common, "--projection-dim", "16", "--preconditioner", "adam", "--out", "adam.zarr", cwd=tmp_path))
    store = to.open_store(tmp_path / "adam.zarr")
    assert store.spec.preconditioner == "adam"
    from trackin_ooc.demo.examples import digits_test_small

    lib = capture(
        adamw.make(),
        adamw.paths,
        digits_test_small(),
        tmp_path / "lib.zarr",
        projection_dim=16,
        preconditioner="adam",
        batch_size=50,
    )
    np.testing.assert_allclose(store.read_grads(), lib.read_grads(), rtol=1e-5, atol=1e-7)
    assert store.fingerprint == lib.fingerprint and store.checkpoint_hashes == lib.checkpoint_hashes

    text = ok(run_cli("info", "adam.zarr", cwd=tmp_path)).stdout
    assert "preconditioner  adam (features of P^1/2 g" in text
    info = json.loads(ok(run_cli("info", "adam.zarr", "--json", cwd=tmp_path)).stdout)
    assert info["preconditioner"]["kind"] == "adam" and info["preconditioner"]["adafactor_layers"] == []
    assert [m.split("/")[-1] for m in info["preconditioner"]["moments"]] == [
        f"{p.name} (optimizer_state_dict)" for p in adamw.paths
    ]

    ok(run_cli(*common, "--projection", "factored", "--projection-dim", "32", "--out", "fac.zarr", cwd=tmp_path))
    text = ok(run_cli("info", "fac.zarr", cwd=tmp_path)).stdout  # auto: adam, its layers in the rank-1 form
    assert "preconditioner  adam" in text and "Adafactor form  1, 3" in text

    capture(adamw.make(), adamw.paths, digits_test_small(), tmp_path / "none.zarr", preconditioner=None)
    assert "preconditioner  none (SGD form" in ok(run_cli("info", "none.zarr", cwd=tmp_path)).stdout
    from trackin_ooc.summary import store_info

    assert store_info(tmp_path / "none.zarr")["preconditioner"]["kind"] == "none"
    assert [x["module"] for x in store_info(tmp_path / "fac.zarr")["preconditioner"]["adafactor_layers"]] == ["1", "3"]

    bad = run_cli(*common, "--preconditioner", "sgd", "--out", "bad.zarr", cwd=tmp_path)
    assert bad.returncode == 2 and "sgd" in bad.stderr and not (tmp_path / "bad.zarr").exists()
    torch.save(adamw.states[0], tmp_path / "plain.pt")
    failed = run_cli(
        "capture",
        "--model",
        f"{ex}:digits_mlp_model",
        "--data",
        f"{ex}:digits_test_small",
        "--checkpoint",
        "plain.pt",
        "--lr",
        "0.01",
        "--preconditioner",
        "adam",
        "--out",
        "p.zarr",
        cwd=tmp_path,
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "plain.pt" in lines[0] and "--preconditioner none" in lines[0]
    assert not (tmp_path / "p.zarr").exists()


def test_scaled_out_adam_capture_equals_the_in_process_one(adamw, data, tmp_path):
    """Workers read the moments from the checkpoint files themselves and write the same bytes."""
    from distributed import Client, LocalCluster

    from trackin_ooc import testing as tt

    kw = dict(projection_dim=16, chunk_rows=4, preconditioner="adam")
    whole = capture(adamw.make(), adamw.paths, data, tmp_path / "whole.zarr", **kw)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        spread = capture(adamw.make(), adamw.paths, data, tmp_path / "spread.zarr", client=client, **kw)
    tt.assert_stores_identical(spread, whole)
