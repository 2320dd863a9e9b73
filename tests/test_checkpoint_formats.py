"""Checkpoints as training runs write them, written by the real libraries (Hugging Face Trainer, PyTorch
Lightning, ``save_pretrained``, ``torch.save``, safetensors): each round-trips through ``to.capture`` with its
learning rates and gives the gradients (and checkpoint hashes) of the same weights passed as plain state dicts.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trackin_ooc as to
from trackin_ooc.capturing.checkpoints import load_checkpoints, state_dict_sha256
from trackin_ooc.demo import digits_mlp
from trackin_ooc.demo.architectures import CLS_ID, FIRST_PIXEL_ID, cifar_resnet, digits_rgb32, tiny_bert, tiny_gpt2

from .test_cli import ok, run_cli

N = 24  # examples captured per store


def capture(model, checkpoints, data, path, **kw) -> to.GradientStore:
    kw.setdefault("batch_size", 12)
    kw.setdefault("device", "cpu")
    return to.capture(model, checkpoints, data, path, **kw)


def assert_same_capture(store: to.GradientStore, plain: to.GradientStore) -> None:
    """Same gradients, losses, learning rates and checkpoint hashes (the weights are the same)."""
    np.testing.assert_array_equal(store.read_grads(), plain.read_grads())
    np.testing.assert_array_equal(store.read_losses(), plain.read_losses())
    np.testing.assert_array_equal(store.learning_rates, plain.learning_rates)
    assert store.checkpoint_hashes == plain.checkpoint_hashes


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def digit_tokens(dataset: TensorDataset, n: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` pixel rows of ``n`` digits as token ids after a [CLS] token (fixed length), and labels."""
    x, y = dataset.tensors
    pixels = torch.round(x[:n, 0, :rows] * 16).to(torch.int64).reshape(n, -1) + FIRST_PIXEL_ID
    return torch.cat([torch.full((n, 1), CLS_ID), pixels], dim=1), y[:n].clone()


# ---- a Hugging Face Trainer run: BERT, linear decay, checkpoint-3/6/9 -----------------------------
@dataclass
class TrainerRun:
    run: Path
    steps: list[int]
    rates: list[float]  # the learning rate the Trainer logged at each saved step (from memory, not files)
    states: list[dict[str, torch.Tensor]]  # the weights at each save, copied by a callback
    ids: torch.Tensor
    labels: torch.Tensor


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, digits) -> TrainerRun:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ids, labels = digit_tokens(digits.train, 48)
    states = []

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            states.append(snapshot(model))

    run = tmp_path_factory.mktemp("trainer") / "run"
    args = TrainingArguments(
        output_dir=str(run),
        per_device_train_batch_size=16,
        num_train_epochs=3,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        callbacks=[Snapshot()],
        train_dataset=[{"input_ids": i, "labels": y} for i, y in zip(ids, labels)],
    )
    trainer.train()
    steps = [3, 6, 9]
    assert sorted(p.name for p in run.iterdir()) == [f"checkpoint-{s}" for s in steps]
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    return TrainerRun(run, steps, [logged[s] for s in steps], states, ids, labels)


def test_trainer_run_folder_round_trips(trainer_run, tmp_path):
    data = TensorDataset(trainer_run.ids[:N], trainer_run.labels[:N])
    layers = ["bert.encoder.layer.1", "classifier"]
    store = capture(tiny_bert(), [trainer_run.run], data, tmp_path / "run.zarr", layers=layers)
    assert store.checkpoint_names == [f"checkpoint-{s}" for s in trainer_run.steps]  # step order
    np.testing.assert_array_equal(store.learning_rates, trainer_run.rates)
    assert np.all(np.diff(store.learning_rates) < 0)  # the decaying schedule, not one rate
    plain = capture(
        tiny_bert(), trainer_run.states, data, tmp_path / "plain.zarr", layers=layers, learning_rates=trainer_run.rates
    )
    assert_same_capture(store, plain)

    # One checkpoint folder on its own, and explicit learning rates, which always win.
    one = capture(tiny_bert(), [trainer_run.run / "checkpoint-6"], data, tmp_path / "one.zarr", layers=layers)
    assert one.checkpoint_names == ["checkpoint-6"] and one.learning_rates.tolist() == [trainer_run.rates[1]]
    np.testing.assert_array_equal(one.read_grads(checkpoint=0), store.read_grads(checkpoint=1))
    given = capture(
        tiny_bert(), [trainer_run.run], data, tmp_path / "given.zarr", layers=layers, learning_rates=[0.3, 0.2, 0.1]
    )  # one per checkpoint after the run folder expands
    assert given.learning_rates.tolist() == [0.3, 0.2, 0.1]
    with pytest.raises(to.CaptureError, match="expand to 3") as err:
        capture(tiny_bert(), [trainer_run.run], data, tmp_path / "bad.zarr", learning_rates=[0.1])
    assert "checkpoint-3" in str(err.value) and not (tmp_path / "bad.zarr").exists()


def test_trainer_folder_variants_load_the_same_weights(trainer_run, tmp_path):
    """Sharded safetensors (with an index) and pytorch_model.bin (with the position_ids buffer older BERT
    files kept, non-persistent today) read as the same weights and learning rate as model.safetensors."""
    source = trainer_run.run / "checkpoint-6"
    model = tiny_bert()
    model.load_state_dict(trainer_run.states[1])
    sharded = tmp_path / "sharded" / "checkpoint-6"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    binary = tmp_path / "bin" / "checkpoint-6"
    binary.mkdir(parents=True)
    legacy = snapshot(model) | {"bert.embeddings.position_ids": torch.arange(80)[None]}
    torch.save(legacy, binary / "pytorch_model.bin")
    bin_shards = tmp_path / "bin_shards" / "checkpoint-6"  # pytorch_model-0000i-of-00002.bin + index
    bin_shards.mkdir(parents=True)
    names = list(legacy)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: legacy[k] for k in part}, bin_shards / shard)
        weight_map |= dict.fromkeys(part, shard)
    (bin_shards / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    folders = [sharded, binary, bin_shards]
    for folder in folders:
        shutil.copy(source / "trainer_state.json", folder)
    loaded = load_checkpoints(tiny_bert(), [source, *folders])
    assert len({ck.sha256 for ck in loaded}) == 1
    assert [ck.learning_rate for ck in loaded] == [trainer_run.rates[1]] * 4
    assert [ck.name for ck in loaded] == ["checkpoint-6"] * 4


def test_trainer_folder_without_trainer_state(trainer_run, tmp_path):
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(trainer_run.run / "checkpoint-3", folder)
    (folder / "trainer_state.json").unlink()
    data = TensorDataset(trainer_run.ids[:N], trainer_run.labels[:N])
    with pytest.raises(to.CaptureError, match="no learning rate") as err:
        capture(tiny_bert(), [folder], data, tmp_path / "s.zarr", layers=["classifier"])
    msg = str(err.value)
    assert "trainer_state.json" in msg and "learning_rates=" in msg and "\n" not in msg
    assert not (tmp_path / "s.zarr").exists()
    store = capture(tiny_bert(), folder, data, tmp_path / "ok.zarr", layers=["classifier"], learning_rates=[0.01])
    assert store.learning_rates.tolist() == [0.01]


def test_cli_captures_a_run_folder(trainer_run, tmp_path):
    torch.save({"ids": trainer_run.ids[:N], "labels": trainer_run.labels[:N]}, tmp_path / "tokens.pt")
    (tmp_path / "usercode.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from trackin_ooc.demo.architectures import tiny_bert\n\n"
        "def model():\n    return tiny_bert()\n\n"
        "def data():\n"
        "    t = torch.load('tokens.pt', weights_only=True)\n"
        "    return TensorDataset(t['ids'], t['labels'])\n"
    )
    ok(
        run_cli(
            "capture",
            "--model",
            "usercode.py:model",
            "--data",
            "usercode.py:data",
            "--checkpoint",
            str(trainer_run.run),
            "--layers",
            "classifier",
            "--out",
            "s.zarr",
            cwd=tmp_path,
        )
    )
    store = to.open_store(tmp_path / "s.zarr")
    assert store.complete and store.n_examples == N
    assert store.checkpoint_names == [f"checkpoint-{s}" for s in trainer_run.steps]
    np.testing.assert_array_equal(store.learning_rates, trainer_run.rates)


# ---- PyTorch Lightning: .ckpt files, "model." prefixes, optimizer_states ----------------------------
@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory, digits):
    import pytorch_lightning as pl

    saved: list[tuple[float, dict[str, torch.Tensor]]] = []

    class LitDigits(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = digits_mlp()
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(10))  # a buffer outside self.model

        def training_step(self, batch, _):
            x, y = batch
            return self.criterion(self.model(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

        def on_save_checkpoint(self, checkpoint):
            saved.append((self.trainer.optimizers[0].param_groups[0]["lr"], snapshot(self.model)))

    folder = tmp_path_factory.mktemp("lightning")
    x, y = digits.train.tensors
    files = fit_lightning(LitDigits(), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), folder, epochs=3)
    assert len(files) == len(saved) == 3
    return files, saved


def fit_lightning(module, loader: DataLoader, folder: Path, epochs: int) -> list[Path]:
    """Train ``module`` with a real Lightning Trainer on the CPU, one .ckpt per epoch in ``folder`` (step order)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1)],
        )
        trainer.fit(module, loader)
    return sorted(folder.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))


def test_lightning_checkpoints_round_trip(lightning_run, digits, tmp_path):
    files, saved = lightning_run
    raw = torch.load(files[0], weights_only=True)
    assert "optimizer_states" in raw and all(k.startswith(("model.", "criterion.")) for k in raw["state_dict"])
    data = TensorDataset(*(t[:N] for t in digits.test.tensors))
    store = capture(digits_mlp(), files, data, tmp_path / "lit.zarr")
    rates = [lr for lr, _ in saved]
    np.testing.assert_array_equal(store.learning_rates, rates)
    assert np.all(np.diff(store.learning_rates) < 0)
    assert store.checkpoint_names == [f.name for f in files]
    plain = capture(digits_mlp(), [s for _, s in saved], data, tmp_path / "plain.zarr", learning_rates=rates)
    assert_same_capture(store, plain)


# ---- a torch file with optimizer state: a BatchNorm ResNet ------------------------------------------
def test_resnet_with_optimizer_state_round_trips(digits, tmp_path):
    x, y = digits.train.tensors
    images = digits_rgb32(TensorDataset(x[:48], y[:48]))
    model = cifar_resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.3)
    paths, rates, states = [], [], []
    for epoch in range(3):
        model.train()
        for xb, yb in DataLoader(images, batch_size=16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()
        paths.append(tmp_path / f"epoch_{epoch}.pt")
        torch.save(
            {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": epoch},
            paths[-1],
        )
        rates.append(opt.param_groups[0]["lr"])
        states.append(snapshot(model))
    assert states[-1]["bn1.num_batches_tracked"].ndim == 0 and int(states[-1]["bn1.num_batches_tracked"]) == 9

    x_test, y_test = digits_rgb32(TensorDataset(*(t[:12] for t in digits.test.tensors))).tensors
    data = TensorDataset(x_test, y_test)
    store = capture(cifar_resnet(seed=1), paths, data, tmp_path / "resnet.zarr", layers=["stages.2", "fc"])
    np.testing.assert_allclose(store.learning_rates, rates, rtol=1e-15)
    plain = capture(
        cifar_resnet(seed=1), states, data, tmp_path / "plain.zarr", layers=["stages.2", "fc"], learning_rates=rates
    )
    assert_same_capture(store, plain)

    # The BatchNorm running statistics of each checkpoint are used, though no BatchNorm parameter or buffer
    # of the stem is selected: the fc gradient of example 0 equals autograd on the loaded model in eval mode.
    fc = capture(cifar_resnet(seed=1), paths, data, tmp_path / "fc.zarr", layers=["fc"], batch_size=4)
    for c, state in enumerate(states):
        ref = cifar_resnet(seed=2)
        ref.load_state_dict(state)
        ref.eval()
        nn.functional.cross_entropy(ref(x_test[:1]), y_test[:1]).backward()
        want = torch.cat([ref.fc.weight.grad.reshape(-1), ref.fc.bias.grad]).numpy()
        np.testing.assert_allclose(fc.read_grads(checkpoint=c)[0], want, rtol=1e-4, atol=1e-6)


def test_optimizer_groups_with_different_learning_rates(mlp, digits_test, tmp_path):
    model = mlp.fresh()
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.01}])
    path = tmp_path / "groups.pt"
    torch.save({"model": snapshot(mlp.model), "optimizer": opt.state_dict()}, path)
    with pytest.raises(to.CaptureError, match="different learning rates") as err:
        capture(model, [path], digits_test, tmp_path / "s.zarr")
    msg = str(err.value)
    assert "0.1, 0.01" in msg and "learning_rates=" in msg and "\n" not in msg
    assert not (tmp_path / "s.zarr").exists()
    store = capture(model, [path], digits_test, tmp_path / "ok.zarr", learning_rates=[0.05])
    assert store.learning_rates.tolist() == [0.05]


def test_run_folder_without_checkpoints(mlp, digits_test, tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "checkpoint-final").mkdir()  # not checkpoint-<step>
    with pytest.raises(to.CheckpointError, match="neither model weights") as err:
        capture(mlp.model, [run], digits_test, tmp_path / "s.zarr", learning_rates=[0.1])
    assert "checkpoint-N" in str(err.value) and str(run) in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


# ---- safetensors files ---------------------------------------------------------------------------
def test_safetensors_files_with_learning_rates(mlp, digits_test, tmp_path):
    states = [torch.load(p, weights_only=True)["model_state_dict"] for p in mlp.checkpoints]
    files = []
    for p, state in zip(mlp.checkpoints, states):
        files.append(tmp_path / f"{p.stem}.safetensors")
        save_file(state, files[-1])
    rates = [0.1 / (i + 1) for i in range(len(files))]
    with pytest.raises(to.CaptureError, match="no learning rate") as err:
        capture(mlp.fresh(), files, digits_test, tmp_path / "none.zarr")
    assert "safetensors" in str(err.value) and "learning_rates=" in str(err.value)
    store = capture(mlp.fresh(), files, digits_test, tmp_path / "st.zarr", learning_rates=rates)
    assert store.checkpoint_names == [f.name for f in files]
    np.testing.assert_array_equal(store.learning_rates, rates)
    plain = capture(mlp.fresh(), states, digits_test, tmp_path / "plain.zarr", learning_rates=rates)
    assert_same_capture(store, plain)


def test_gpt2_saved_with_tied_weights_stored_once(digits, tmp_path):
    ids, _ = digit_tokens(digits.train, 16)
    data = TensorDataset(ids, ids)  # causal language modelling: the targets are the inputs
    run, states = tmp_path / "run", []
    for step, seed in ((100, 0), (200, 1)):
        model = tiny_gpt2(seed=seed)
        model.save_pretrained(run / f"checkpoint-{step}")
        states.append(snapshot(model))
    with safe_open(run / "checkpoint-100" / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored  # the tie is stored once
    assert "lm_head.weight" in states[0]

    store = capture(tiny_gpt2(seed=5), [run], data, tmp_path / "gpt2.zarr", learning_rates=[0.1, 0.05])
    assert store.checkpoint_names == ["checkpoint-100", "checkpoint-200"]
    plain = capture(tiny_gpt2(seed=5), states, data, tmp_path / "plain.zarr", learning_rates=[0.1, 0.05])
    assert_same_capture(store, plain)
    assert np.all(np.isfinite(store.read_grads())) and np.abs(store.read_grads()).max() > 0

    # A file of an older transformers version that kept the attention masks: the model drops them.
    legacy = {k: v for k, v in states[0].items() if k != "lm_head.weight"}
    legacy |= {f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 80, 80).tril().bool() for i in range(2)}
    torch.save(legacy, tmp_path / "legacy.bin")
    (ck,) = load_checkpoints(tiny_gpt2(), [tmp_path / "legacy.bin"], [0.1])
    assert ck.sha256 == state_dict_sha256(states[0]) == store.checkpoint_hashes[0]


def test_state_dict_hash_takes_any_buffer():
    """0-dim, integer and bool buffers hash; a change in any of them changes the hash."""
    sd = {
        "count": torch.tensor(7),
        "mask": torch.ones(3, dtype=torch.bool),
        "w": torch.ones(2, 2, dtype=torch.bfloat16),
    }
    h = state_dict_sha256(sd)
    assert h == state_dict_sha256({k: v.clone() for k, v in sd.items()})
    for key, other in [
        ("count", torch.tensor(8)),
        ("mask", torch.tensor([1, 0, 1]).bool()),
        ("w", torch.full((2, 2), 2.0, dtype=torch.bfloat16)),
        ("count", torch.tensor(7.0)),
    ]:
        assert state_dict_sha256(sd | {key: other}) != h, key


def test_trainer_state_learning_rate_is_the_last_logged_at_or_before_the_step(tmp_path, mlp):
    """log_history may run past global_step (a state copied from a later save) and hold entries without
    a learning rate (evaluation, the final summary)."""
    folder = tmp_path / "checkpoint-20"
    folder.mkdir()
    save_file(torch.load(mlp.checkpoints[0], weights_only=True)["model_state_dict"], folder / "model.safetensors")
    history = [
        {"step": 10, "learning_rate": 0.5},
        {"step": 20, "learning_rate": 0.25, "loss": 1.0},
        {"step": 20, "eval_loss": 0.9},
        {"step": 30, "learning_rate": 0.125},
    ]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))
    (ck,) = load_checkpoints(mlp.fresh(), folder)
    assert ck.learning_rate == 0.25 and ck.name == "checkpoint-20"


# ---- run folders through scale-out and resume ----------------------------------------------------
def mlp_run_folder(mlp, root: Path) -> tuple[Path, list[float]]:
    """The MLP's checkpoints laid out as a Trainer run: checkpoint-N/model.safetensors + trainer_state.json."""
    run, rates = root / "run", []
    for i, p in enumerate(mlp.checkpoints):
        step = 10 * (i + 1)
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(torch.load(p, weights_only=True)["model_state_dict"], folder / "model.safetensors")
        rates.append(0.1 * 0.5**i)
        state = {"global_step": step, "log_history": [{"step": step, "learning_rate": rates[-1]}]}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return run, rates


def test_run_folder_scaled_out_and_resumed(mlp, digits_test, tmp_path):
    """Workers reload the run folder themselves (a job ships paths); a resumed capture checks their hashes."""
    from distributed import Client, LocalCluster

    from trackin_ooc import testing as tt

    run, rates = mlp_run_folder(mlp, tmp_path)
    kw = dict(projection_dim=16, chunk_rows=20, batch_size=10)
    whole = capture(mlp.fresh(), [run], digits_test, tmp_path / "whole.zarr", **kw)
    np.testing.assert_array_equal(whole.learning_rates, rates)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        spread = capture(mlp.fresh(), [run], digits_test, tmp_path / "spread.zarr", client=client, **kw)
    tt.assert_stores_identical(spread, whole)

    part = capture(mlp.fresh(), [run], digits_test, tmp_path / "part.zarr", **kw)
    group = part._writable()
    group["block_complete"][1:] = 0
    group.attrs["trackin_ooc"] = dict(group.attrs["trackin_ooc"], complete=False)
    tt.assert_stores_identical(capture(mlp.fresh(), [run], digits_test, tmp_path / "part.zarr", **kw), whole)
    # Other weights in one checkpoint folder: the resumed capture is refused, naming the difference.
    group["block_complete"][1:] = 0
    group.attrs["trackin_ooc"] = dict(group.attrs["trackin_ooc"], complete=False)
    save_file(
        torch.load(mlp.checkpoints[0], weights_only=True)["model_state_dict"],
        run / "checkpoint-20" / "model.safetensors",
    )
    with pytest.raises(to.CaptureError, match="checkpoint contents"):
        capture(mlp.fresh(), [run], digits_test, tmp_path / "part.zarr", **kw)


# ---- the worked examples of docs/checkpoints.md ---------------------------------------------------
def test_docs_worked_examples_run(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parent.parent / "docs" / "checkpoints.md").read_text()
    section = text.split("## Bringing a Trainer run / a Lightning run")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(blocks[0], "docs/checkpoints.md (Trainer)", "exec"), ns)
        assert ns["store"].checkpoint_names == ["checkpoint-4", "checkpoint-8"]
        assert ns["store"].learning_rates[0] > ns["store"].learning_rates[1] > 0
        assert ns["store"].n_examples == 64 and ns["store"].complete
        exec(compile(blocks[1], "docs/checkpoints.md (Lightning)", "exec"), ns)
        assert ns["store"].checkpoint_names == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=2-step=6.ckpt"]
        np.testing.assert_allclose(ns["store"].learning_rates, [0.05, 0.025, 0.0125], rtol=1e-12)
        exec(compile(blocks[2], "docs/checkpoints.md (safetensors)", "exec"), ns)
        assert ns["store"].learning_rates.tolist() == [0.1, 0.05]
