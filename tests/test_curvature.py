"""The K-FAC preconditioner (preconditioner="kfac"): the curvature fitted at each checkpoint and the features
P^{1/2} g, against a reference computed here from plain per-example autograd gradients and the layers' inputs
cut into patches by hand (Tensor.unfold), with P = (Q_S ⊗ Q_A)(Λ + λ)^{-1}(Q_S ⊗ Q_A)ᵀ formed densely.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import trackin_ooc as to
from trackin_ooc.capturing.projection.dense import projection_matrix
from trackin_ooc.demo import load_digits_split
from trackin_ooc.demo.recipes import Recipe, train_run
from trackin_ooc.errors import CaptureError, IncompatibleStoresError

N_TRAIN, N_TEST = 24, 6


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Conv1dNet(nn.Module):
    """Digits as 64-sample signals."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 5, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(3 * 31, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.reshape(len(x), 1, 64))).flatten(1))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))


def conv2d(seed=0):
    torch.manual_seed(seed)
    return Conv2dNet()


def conv1d(seed=0):
    torch.manual_seed(seed)
    return Conv1dNet()


MODELS = {"mlp": mlp, "conv2d": conv2d, "conv1d": conv1d}


@pytest.fixture(scope="module")
def data():
    split = load_digits_split(n_train=N_TRAIN + 200, seed=3)
    x, y = split.train.tensors
    xt, yt = split.test.tensors
    return torch.utils.data.TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), torch.utils.data.TensorDataset(
        xt[:N_TEST], yt[:N_TEST]
    )


def trained(name, tmp_path, data, seed=0):
    """A model trained a few AdamW steps on the train data, with two checkpoints (different learning rates)."""
    recipe = Recipe(make_model=MODELS[name], optimizer="adamw", lr=1e-2, epochs=2, n_checkpoints=2, batch_size=8)
    model, paths = train_run(recipe, *data[0].tensors, tmp_path / f"ck-{name}-{seed}", seed=seed)
    for i, p in enumerate(paths):  # each checkpoint its own learning rate: η_c must weight each term
        ck = torch.load(p, weights_only=True)
        ck["learning_rate"] = 1e-2 * (i + 1)
        torch.save(ck, p)
    return model, paths


# ---- the reference --------------------------------------------------------------------------------------
def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs per output position (B, T, d_in), cut by hand: zero padding, then sliding windows."""
    if isinstance(module, nn.Linear):
        return x[:, None, :]
    if isinstance(module, nn.Conv1d):
        (k,), (s,), (p,) = module.kernel_size, module.stride, module.padding
        w = nn.functional.pad(x, (p, p)).unfold(2, k, s)  # (B, C, T, k)
        return w.permute(0, 2, 1, 3).reshape(x.shape[0], w.shape[2], -1)
    (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
    w = nn.functional.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Th, Tw, kh, kw)
    return w.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], w.shape[2] * w.shape[3], -1)


def per_example(model: nn.Module, dataset):
    """Per layer and example: the gradient G (d_out, d_in [+1 bias column]), inputs ã (T, d_in [+1]) and output
    gradients δ (T, d_out), one example at a time by autograd."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    out = {n: {"G": [], "a": [], "d": []} for n in layers}
    for x, y in zip(*dataset.tensors):
        seen = {}
        hooks = [
            m.register_forward_hook(lambda mod, args, o, n=n, seen=seen: seen.__setitem__(n, (args[0], o)))
            for n, m in layers.items()
        ]
        logits = model(x[None])
        for h in hooks:
            h.remove()
        outputs = [seen[n][1] for n in layers]
        params = [p for m in layers.values() for p in m.parameters(recurse=False)]
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y[None]), params + outputs)
        by_param = dict(zip(params, grads[: len(params)]))
        for (n, m), o_grad in zip(layers.items(), grads[len(params) :]):
            g = by_param[m.weight].reshape(m.weight.shape[0], -1).double()
            a = patches(m, seen[n][0].detach().double())[0]
            if m.bias is not None:
                g = torch.cat([g, by_param[m.bias].double()[:, None]], dim=1)
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            d = o_grad.double()[0].reshape(o_grad.shape[1], -1).T if not isinstance(m, nn.Linear) else o_grad.double()
            out[n]["G"].append(g)
            out[n]["a"].append(a)
            out[n]["d"].append(d)
    return {n: {k: torch.stack(v) for k, v in parts.items()} for n, parts in out.items()}


def reference(model, paths, train, test, damping=0.1):
    """(influence (test, train), self-influence (train,)) = Σ_c η_c g'ᵀ P_c g with the dense EK-FAC P_c."""
    influence, self_inf = 0.0, 0.0
    for path in paths:
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["model_state_dict"])
        model.eval()
        tr, te = per_example(model, train), per_example(model, test)
        for n, parts in tr.items():
            G, a, d = parts["G"], parts["a"], parts["d"]
            # The hand-cut patches reproduce autograd's gradient: G = Σ_t δ_t ãᵀ_t.
            torch.testing.assert_close(torch.einsum("bto,bti->boi", d, a), G, rtol=1e-5, atol=1e-7)
            qa = torch.linalg.eigh(torch.einsum("bti,btj->ij", a, a) / len(G)).eigenvectors
            qs = torch.linalg.eigh(torch.einsum("bti,btj->ij", d, d) / len(G)).eigenvectors
            lam = ((qs.T @ G @ qa) ** 2).mean(0)
            q = torch.kron(qs, qa)  # vec(G) row-major: (Q_S ⊗ Q_A)ᵀ vec(G) = vec(Q_Sᵀ G Q_A)
            p = q @ torch.diag(1.0 / (lam + damping * lam.mean()).flatten()) @ q.T
            g, g_test = G.reshape(len(G), -1), te[n]["G"].reshape(len(te[n]["G"]), -1)
            influence = influence + ck["learning_rate"] * (g_test @ p @ g.T)
            self_inf = self_inf + ck["learning_rate"] * torch.einsum("bi,ij,bj->b", g, p, g)
    return influence.numpy(), self_inf.numpy()


def capture(model, paths, data, curvature, **kw):
    return to.capture(
        model,
        paths,
        data,
        None,
        preconditioner="kfac",
        curvature=curvature,
        batch_size=8,
        device="cpu",
        progress=False,
        **kw,
    )


def assert_relative(ours, ref, rtol=1e-4):
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


# ---- equal to the reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,seed", [("mlp", 0), ("mlp", 1), ("conv2d", 2), ("conv1d", 3)])
def test_kfac_equals_dense_reference(name, seed, data, tmp_path):
    model, paths = trained(name, tmp_path, data, seed=seed)
    train, test = data
    curvature = to.fit_curvature(model, paths, train, tmp_path / "curvature.pt", batch_size=7)
    tr = capture(model, paths, train, tmp_path / "curvature.pt")  # the file
    te = capture(model, paths, test, curvature)  # the object
    ref_inf, ref_self = reference(MODELS[name](), paths, train, test)
    assert_relative(to.influence(te, tr, progress=False).values, ref_inf)
    assert_relative(to.self_influence(tr, progress=False).values, ref_self)
    assert tr.spec.preconditioner == "kfac" and tr.spec.fingerprint == te.spec.fingerprint
    assert tr.spec.describe_preconditioner().startswith("kfac")


def test_kfac_differs_from_the_sgd_form_and_projects_like_exact_features(data, tmp_path):
    """The preconditioner changes the scores (else the test above could pass on plain gradients), and a
    gaussian-projected K-FAC store holds the projection of the exact K-FAC features."""
    model, paths = trained("mlp", tmp_path, data)
    train, test = data
    curvature = to.fit_curvature(model, paths, train)
    stores = {  # in-memory stores live as long as a reference to them
        "kfac": (capture(model, paths, test, curvature), capture(model, paths, train, curvature)),
        "plain": tuple(to.capture(model, paths, d, None, preconditioner=None, progress=False) for d in (test, train)),
    }
    kfac, plain = (to.influence(*stores[k], progress=False).values for k in ("kfac", "plain"))
    assert np.corrcoef(kfac.ravel(), plain.ravel())[0, 1] < 0.99
    exact = stores["kfac"][1]
    proj = capture(model, paths, train, curvature, projection_dim=48, seed=3)
    for c in range(len(paths)):
        feats, start, want = exact.read_grads(checkpoint=c).astype(np.float64), 0, 0
        for name, shape in exact.spec.layers:
            size = int(np.prod(shape))
            matrix = projection_matrix("gaussian", 3, name, size, 48).double().numpy()
            want = want + feats[:, start : start + size] @ matrix
            start += size
        assert_relative(proj.read_grads(checkpoint=c), want)


# ---- refused, each in one line -------------------------------------------------------------------------
def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_kfac_refusals(data, tmp_path):
    model, paths = trained("mlp", tmp_path, data)
    train, _ = data
    curvature = to.fit_curvature(model, paths, train, tmp_path / "c.pt")
    with pytest.raises(CaptureError) as e:
        capture(model, paths, train, None)
    one_line(e, "curvature=", "fit_curvature")
    with pytest.raises(CaptureError) as e:  # fitted at the first checkpoint only
        capture(model, paths, train, to.fit_curvature(model, paths[:1], train))
    one_line(e, "fitted at 1 checkpoints")
    other, other_paths = trained("mlp", tmp_path, data, seed=5)  # same architecture, other weights
    with pytest.raises(CaptureError) as e:
        capture(model, other_paths, train, curvature)
    one_line(e, "other weights than checkpoint")
    with pytest.raises(CaptureError) as e:  # other parameters selected than fitted
        capture(model, paths, train, curvature, layers=["3.weight", "3.bias"])
    one_line(e, "covers parameter 1.weight, not selected")
    with pytest.raises(CaptureError) as e:
        capture(model, paths, train, curvature, projection="factored", projection_dim=64)
    one_line(e, "projection='factored'")
    auto = to.capture(model, paths, train, None, curvature=curvature, progress=False)  # "auto" with a curvature
    explicit = capture(model, paths, train, curvature)
    assert auto.spec.preconditioner == "kfac" and auto.spec.fingerprint == explicit.spec.fingerprint
    with pytest.raises(CaptureError) as e:
        to.capture(model, paths, train, None, preconditioner="adam", curvature=curvature, progress=False)
    one_line(e, "curvature= is for preconditioner='kfac'")
    with pytest.raises(CaptureError) as e:
        to.fit_curvature(model, paths, train, tmp_path / "c.pt")
    one_line(e, "exists", "overwrite")
    with pytest.raises(CaptureError) as e:
        to.fit_curvature(model, paths, train, damping=0)
    one_line(e, "damping must be a positive number")
    with pytest.raises(CaptureError) as e:
        to.load_curvature(paths[0])
    one_line(e, "not a trackin-ooc curvature file")
    normed = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.LayerNorm(12), nn.Linear(12, 10))
    with pytest.raises(CaptureError) as e:
        to.fit_curvature(normed, [normed.state_dict()], train)
    one_line(e, "parameter 2.weight is in a LayerNorm", "layers=")


def test_stores_of_different_fits_are_refused_together(data, tmp_path):
    model, paths = trained("mlp", tmp_path, data)
    train, test = data
    tr = capture(model, paths, train, to.fit_curvature(model, paths, train, damping=0.1))
    te = capture(model, paths, test, to.fit_curvature(model, paths, train, damping=0.2))
    with pytest.raises(IncompatibleStoresError) as e:
        to.influence(te, tr, progress=False)
    assert "fitted curvature differs" in str(e.value)
    sgd = to.capture(model, paths, test, None, preconditioner=None, progress=False)
    with pytest.raises(IncompatibleStoresError) as e:
        to.influence(sgd, tr, progress=False)
    assert "preconditioner" in str(e.value)


def test_curvature_file_round_trip(data, tmp_path):
    model, paths = trained("conv2d", tmp_path, data)
    fitted = to.fit_curvature(model, paths, data[0], tmp_path / "c.pt")
    loaded = to.load_curvature(tmp_path / "c.pt")
    assert loaded.sha256 == fitted.sha256 and loaded.parameters == fitted.parameters
    assert loaded.checkpoint_hashes == fitted.checkpoint_hashes and len(loaded.layers) == len(paths)
    refit = to.fit_curvature(model, paths, data[0], tmp_path / "c.pt", damping=0.3, overwrite=True)
    assert refit.sha256 != fitted.sha256 and to.load_curvature(tmp_path / "c.pt").sha256 == refit.sha256


# ---- the command line ----------------------------------------------------------------------------------
USER_CODE = """
import torch
from torch import nn
from trackin_ooc.demo import load_digits_split


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))


def _split():
    split = load_digits_split(n_train=224, seed=3)
    return split.train.tensors, split.test.tensors


def train():
    (x, y), _ = _split()
    return torch.utils.data.TensorDataset(x[:24], y[:24])


def test():
    _, (x, y) = _split()
    return torch.utils.data.TensorDataset(x[:6], y[:6])
"""


def test_cli_fit_curvature_then_capture_kfac(data, tmp_path):
    from .test_cli import ok, run_cli

    (tmp_path / "user.py").write_text(USER_CODE)
    model, paths = trained("mlp", tmp_path, data)
    user = tmp_path / "user.py"
    cks = [a for p in paths for a in ("--checkpoint", p)]
    ok(
        run_cli(
            "fit-curvature", "--model", f"{user}:model", "--data", f"{user}:train", *cks, "--out", "c.pt", cwd=tmp_path
        )
    )
    ok(
        run_cli(
            "capture",
            "--model",
            f"{user}:model",
            "--data",
            f"{user}:train",
            *cks,
            "--preconditioner",
            "kfac",
            "--curvature",
            "c.pt",
            "--out",
            "train.zarr",
            cwd=tmp_path,
        )
    )
    ok(
        run_cli(
            "capture",
            "--like",
            "train.zarr",
            "--model",
            f"{user}:model",
            "--data",
            f"{user}:test",
            "--out",
            "test.zarr",
            cwd=tmp_path,
        )
    )
    curvature = to.fit_curvature(model, paths, data[0])
    assert curvature.sha256 == to.load_curvature(tmp_path / "c.pt").sha256
    te, tr = capture(model, paths, data[1], curvature), capture(model, paths, data[0], curvature)
    want = to.influence(te, tr, progress=False).values
    got = to.influence(
        to.open_store(tmp_path / "test.zarr"), to.open_store(tmp_path / "train.zarr"), progress=False
    ).values
    assert_relative(got, want, rtol=1e-5)
    refused = run_cli(
        "capture",
        "--model",
        f"{user}:model",
        "--data",
        f"{user}:train",
        *cks,
        "--preconditioner",
        "kfac",
        "--out",
        "other.zarr",
        cwd=tmp_path,
    )
    assert refused.returncode == 1 and "fit-curvature" in refused.stderr and "Traceback" not in refused.stderr
    again = run_cli(
        "fit-curvature", "--model", f"{user}:model", "--data", f"{user}:train", *cks, "--out", "c.pt", cwd=tmp_path
    )
    assert again.returncode == 1 and "--overwrite" in again.stderr
