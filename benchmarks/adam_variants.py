"""Does a detail of the Adam-aware form move its LDS? The SGD-form features of a quality-benchmark run scored
with variants of P = diag(1/(√v̂ + ε)): ε, the bias correction, which checkpoint's moments.

    .venv/bin/python benchmarks/adam_variants.py --work benchmarks/_data/quality --runs mnist1d-mlp,digits-cnn

Reads the checkpoints and retrainings ``benchmarks/quality.py`` left under ``--work`` for each AdamW run
(clean labels), captures the exact SGD-form train and test stores once, and prints the LDS of each variant
and the spread of log P where the per-example gradients' energy lies (docs/quality.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import trackin_ooc as to

sys.path.insert(0, str(Path(__file__).parent))
from quality import Config  # noqa: E402


def moments(path) -> tuple[np.ndarray, float]:
    """(bias-corrected v̂ of every parameter, flattened in model.parameters() order, step) of a checkpoint."""
    state = torch.load(path, weights_only=True)["optimizer_state_dict"]
    ids = [i for g in state["param_groups"] for i in g["params"]]
    beta2 = state["param_groups"][0]["betas"][1]
    step = float(state["state"][ids[0]]["step"])
    v = np.concatenate([state["state"][i]["exp_avg_sq"].double().flatten().numpy() for i in ids])
    return v / (1 - beta2**step), step


def run(name: str, work: Path) -> None:
    dataset, arch = name.split("-")
    found = sorted(work.glob(f"{dataset}-{arch}-adamw-clean-*"))
    if not found:
        raise SystemExit(f"no clean-label AdamW run of {name} under {work}; run benchmarks/quality.py first")
    folder = found[-1]
    cfg = Config(dataset, arch, "adamw", 2000 if dataset == "mnist1d" else 1500, 100)
    split = cfg.split(0.0)
    model = cfg.make_model()(seed=0)
    ckpts = sorted((folder / "checkpoints").glob("*.pt"))
    runs = to.open_runs(folder / "runs.zarr")
    kw = dict(preconditioner=None, overwrite=True, progress=False)
    train = to.capture(model, ckpts, split.train, folder / "variants-train.zarr", **kw)
    test = to.capture(model, ckpts, split.test, folder / "variants-test.zarr", **kw)
    mask = runs["subset"].values.T.astype(np.float64)
    g = [train.read_grads(checkpoint=c).astype(np.float64) for c in range(len(ckpts))]
    t = [test.read_grads(checkpoint=c).astype(np.float64) for c in range(len(ckpts))]
    vh, steps = zip(*(moments(p) for p in ckpts))
    lr = train.learning_rates

    def lds(p) -> float:
        pred = sum(lr[c] * (t[c] * p[c]) @ (g[c].T @ mask) for c in range(len(ckpts)))
        return float(np.nanmean(to.lds_from_predictions(pred, runs["output"].values)))

    eps, beta2 = 1e-8, 0.999
    prev = (vh[0],) + vh[:-1]
    variants = {
        "SGD form": [np.ones_like(v) for v in vh],
        "Adam-aware": [1 / (np.sqrt(v) + eps) for v in vh],
        "eps = 0": [1 / np.maximum(np.sqrt(v), 1e-30) for v in vh],
        "eps = 1e-4": [1 / (np.sqrt(v) + 1e-4) for v in vh],
        "no bias correction": [1 / (np.sqrt(v * (1 - beta2**s)) + eps) for v, s in zip(vh, steps)],
        "previous checkpoint's v_hat": [1 / (np.sqrt(v) + eps) for v in prev],
        "mean of both": [1 / (np.sqrt((v + q) / 2) + eps) for v, q in zip(vh, prev)],
    }
    energy = (g[-1] ** 2).sum(0)
    w = energy / energy.sum()
    logp = np.log(variants["Adam-aware"][-1])
    spread = float(np.sqrt((w * (logp - (w * logp).sum()) ** 2).sum()))
    scores = {k: lds(p) for k, p in variants.items()}
    print(
        f"{name}-adamw: "
        + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        + f"  Adam/SGD {scores['Adam-aware'] / scores['SGD form']:.2f}  spread of log P {spread:.2f}",
        flush=True,
    )
    for s in (train, test):
        shutil.rmtree(s.path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(__file__).parent / "_data" / "quality"))
    ap.add_argument("--runs", default="mnist1d-mlp,mnist1d-cnn,digits-mlp,digits-cnn")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.runs.split(","):
        run(name, Path(args.work))


if __name__ == "__main__":
    main()
