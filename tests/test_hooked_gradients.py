"""Exact per-example gradients from one batched forward and backward through layer hooks.

On the architectures users bring (a BatchNorm ResNet, Hugging Face BERT with padded dict batches, GPT-2
with its language-modelling loss and tied head), ``to.capture(projection_dim=None)`` and exact influence
must equal a plain reference: the model in eval mode, one example at a time, ``torch.autograd.grad``
of that example's loss. The store records that every parameter used the batched (hooked) method.
Smaller models check each layer rule, the batch-gradient guard and the per-example loop as the last
resort.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import trackin_ooc as to
from trackin_ooc.capturing.per_example import PerExampleGradients
from trackin_ooc.capturing.per_example.gradients import _warned
from trackin_ooc.demo import architectures as arch
from trackin_ooc.demo import load_digits_split, train_with_checkpoints

RTOL = 1e-4
N_TRAIN, N_TEST = 24, 6


# ---- the three architectures, trained briefly with two checkpoints ----------------------------------
def _digits():
    return load_digits_split(n_train=200, seed=3)


def _resnet(root):
    split = _digits()
    train_all, test_all = arch.digits_rgb32(split.train), arch.digits_rgb32(split.test)
    model = arch.cifar_resnet(seed=0)
    ckpts = train_with_checkpoints(
        model, Subset(train_all, range(48)), root / "ckpt", epochs=2, lr=0.05, batch_size=16, checkpoint_every=1
    )
    train, test = Subset(train_all, range(N_TRAIN)), Subset(test_all, range(N_TEST))

    def loss(model, example):
        x, y = example
        return F.cross_entropy(model(x[None]), y[None])

    return dict(
        make=lambda: arch.cifar_resnet(seed=0),
        ckpts=ckpts,
        train=train,
        test=test,
        loss=loss,
        data=lambda ds: ds,
        labels=True,
    )


def _hf(root, task):
    split = _digits()
    train_all = arch.digit_token_dicts(split.train, task=task)
    test_all = arch.digit_token_dicts(split.test, task=task)
    make = arch.tiny_bert if task == "classify" else arch.tiny_gpt2
    model = make()
    ckpts = arch.train_dict_batches(
        model, Subset(train_all, range(96)), root / "ckpt", epochs=2, lr=0.05, batch_size=16, checkpoint_every=1
    )
    train, test = Subset(train_all, range(N_TRAIN)), Subset(test_all, range(N_TEST))

    def loss(model, example):  # one example, unpadded; Hugging Face's own losses as the reference
        ids = example["input_ids"][None]
        if task == "classify":
            return F.cross_entropy(
                model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, example["labels"][None]
            )
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        return out.loss * (ids.shape[1] - 1)  # HF averages over the predicted tokens; ours is their sum

    return dict(
        make=make,
        ckpts=ckpts,
        train=train,
        test=test,
        loss=loss,
        data=lambda ds: DataLoader(ds, batch_size=8, collate_fn=arch.pad_collate),
        labels=task == "classify",
    )


BUILDERS = {"resnet": _resnet, "bert": lambda root: _hf(root, "classify"), "gpt2": lambda root: _hf(root, "lm")}


@pytest.fixture(scope="module", params=list(BUILDERS))
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    case = BUILDERS[request.param](root)
    case["name"] = request.param
    return case


def reference_gradients(case, dataset) -> np.ndarray:
    """(checkpoint, example, parameter) by plain autograd, one example at a time, model in eval mode."""
    model = case["make"]()
    names = [n for n, _ in model.named_parameters()]
    out = []
    for path in case["ckpts"]:
        state = torch.load(path, weights_only=True)["model_state_dict"]
        model.load_state_dict(state)
        model.eval()
        params = dict(model.named_parameters())
        rows = []
        for i in range(len(dataset)):
            grads = torch.autograd.grad(case["loss"](model, dataset[i]), [params[n] for n in names], allow_unused=True)
            rows.append(
                torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1) for n, g in zip(names, grads)])
            )
        out.append(torch.stack(rows))
    return torch.stack(out).detach().numpy().astype(np.float64)


def test_exact_capture_and_influence_equal_the_per_example_autograd_reference(trained, tmp_path):
    case = trained
    kw = dict(device="cpu", batch_size=8)
    train = to.capture(case["make"](), case["ckpts"], case["data"](case["train"]), tmp_path / "train.zarr", **kw)
    test = to.capture(case["make"](), case["ckpts"], case["data"](case["test"]), tmp_path / "test.zarr", **kw)

    # Every parameter by the batched hooked method: never the per-example loop (nor vmap).
    methods = train.attrs["per_example_methods"]
    assert set(methods) == {n for n, _ in case["make"]().named_parameters()}
    assert set(methods.values()) == {"hooks"}, {n: m for n, m in methods.items() if m != "hooks"}
    assert test.attrs["per_example_methods"] == methods
    assert train.has_labels == case["labels"]

    ref_train, ref_test = reference_gradients(case, case["train"]), reference_gradients(case, case["test"])
    ours = train.read_grads().astype(np.float64)
    assert ours.shape == ref_train.shape
    err = np.linalg.norm(ours - ref_train, axis=2) / np.linalg.norm(ref_train, axis=2)
    assert err.max() < RTOL, f"{case['name']}: per-example gradients differ by up to {err.max():.2e} (relative)"

    lrs = np.asarray(train.learning_rates)
    want = np.einsum("c,cif,cjf->ij", lrs, ref_test, ref_train)
    got = to.influence(test, train).values
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


# ---- each layer rule on a small zoo, against a per-example loop ------------------------------------
class Zoo(nn.Module):
    """Every hooked layer type, a module called twice, and an embedding with a padding row."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=0)
        self.pos = nn.Embedding(5, 6)
        self.conv1d = nn.Conv1d(6, 8, 3, padding="same", groups=2, padding_mode="reflect")
        self.ln = nn.LayerNorm(8)
        self.conv2d = nn.Conv2d(1, 4, 3, stride=2, padding=1, dilation=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, ids, image):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T): broadcast over the batch
        h = self.embed(ids) + self.pos(positions)
        h = self.ln(self.conv1d(h.transpose(1, 2)).transpose(1, 2))
        h = self.shared(torch.relu(self.shared(h)))  # one Linear, two calls
        img = self.gn(torch.relu(self.bn(self.conv2d(image))))
        return self.head(torch.cat([h.mean(1), img.mean((2, 3))], dim=1))


def _loop_reference(model, state, inputs, targets, names):
    model.load_state_dict(state)
    model.eval()
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i in range(len(targets)):
        x = tuple(t[i : i + 1] for t in inputs)
        loss = F.cross_entropy(model(*x), targets[i : i + 1])
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def _zoo_batch(batch=7):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (batch, 5), generator=gen)
    ids[:, -1] = 0  # padding tokens
    image = torch.randn(batch, 1, 8, 8, generator=gen)
    return (ids, image), torch.randint(0, 3, (batch,), generator=gen)


def _trained_state(model):
    model.train()
    with torch.no_grad():  # BatchNorm running statistics that are not the defaults
        model(*_zoo_batch(32)[0])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_layer_rule_matches_the_per_example_loop():
    torch.manual_seed(0)
    model = Zoo()
    state = _trained_state(model)
    names = [n for n, _ in model.named_parameters()]
    inputs, targets = _zoo_batch()
    model.eval()
    peg = PerExampleGradients(model, names)
    grads, losses = peg(state, inputs, targets)
    assert peg.methods == dict.fromkeys(names, "hooks")
    ref = _loop_reference(model, state, inputs, targets, names)
    for n in names:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert losses.shape == targets.shape


class FunctionalReuse(nn.Module):
    """A Linear whose weight is also used outside its forward (F.linear): hooks alone would miss that use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = torch.tanh(F.linear(h, self.fc.weight))  # a second use the fc module's hooks never see
        return self.out(h)


def test_a_weight_used_outside_its_module_is_caught_and_computed_by_vmap():
    torch.manual_seed(0)
    model = FunctionalReuse().eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(9, 6)
    y = torch.randint(0, 3, (9,))
    peg = PerExampleGradients(model, names)
    grads, _ = peg(state, (x,), y)
    assert peg.methods["fc.weight"] == "vmap"
    assert peg.methods["out.weight"] == peg.methods["fc.bias"] == "hooks"
    ref = _loop_reference(model, state, (x,), y, names)
    for n in names:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)


class Branchy(nn.Module):
    """Data-dependent control flow (vmap refuses it) and a bare parameter no hook rule covers."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.lin(x)
        if bool((x.abs().sum() > 0).item()):
            h = h * self.scale
        return h


def test_the_per_example_loop_is_the_last_resort_for_the_uncovered_parameters_only(caplog):
    torch.manual_seed(0)
    model = Branchy().eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    _warned.clear()
    with caplog.at_level(logging.WARNING, logger="trackin_ooc"):
        peg = PerExampleGradients(model, names)
        grads, _ = peg(state, (x,), y)
        peg(state, (x,), y)
        PerExampleGradients(model, names)(state, (x,), y)  # another instance: no second warning
    assert peg.methods == {"lin.weight": "hooks", "lin.bias": "hooks", "scale": "loop"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "per-example loop" in warnings[0] and "scale" in warnings[0] and "lin." not in warnings[0]
    ref = _loop_reference(model, state, (x,), y, names)
    for n in names:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)


class PartlyFrozen(nn.Module):
    """A layer run under no_grad inside forward: its parameters get no gradient, the others theirs."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.relu(self.frozen(x))
        return self.head(h)


def test_a_layer_run_without_grad_gets_zero_gradients_from_hooks():
    torch.manual_seed(0)
    model = PartlyFrozen().eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    peg = PerExampleGradients(model, names)
    grads, _ = peg(state, (x,), y)
    assert set(peg.methods.values()) == {"hooks"}
    ref = _loop_reference(model, state, (x,), y, names)
    assert not grads["frozen.weight"].any()
    for n in names:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)


def test_methods_given_in_advance_are_used_as_given():
    torch.manual_seed(0)
    model = FunctionalReuse().eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    plan = dict.fromkeys(names, "vmap")
    peg = PerExampleGradients(model, names, methods=plan)
    peg(state, (x,), y)
    assert peg.methods == plan
    with pytest.raises(ValueError, match="cannot use"):
        PerExampleGradients(model, names, methods={**plan, "fc.weight": "magic"})


def test_a_mlp_capture_records_hooks_for_every_parameter(mlp, digits_test, tmp_path):
    store = to.capture(
        mlp.model,
        mlp.checkpoints,
        TensorDataset(*digits_test.tensors),
        tmp_path / "m.zarr",
        device="cpu",
        batch_size=64,
    )
    assert store.attrs["per_example_methods"] == {n: "hooks" for n, _ in mlp.model.named_parameters()}
