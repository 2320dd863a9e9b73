"""Mean per-row Spearman of projected vs exact influence, dense Gaussian and factored, over dims.

    .venv/bin/python benchmarks/projection_quality.py [--dims 256,...,16384] [--seeds 0,1] [--markdown]

Digits MLP 64-256-256-10 (85k parameters) and digits CNN with 32 channels (14.7k), 3 SGD
checkpoints each; 500 train × 100 test real digits. Every score goes through the public API
(capture → store → influence). Prints the table that docs/projection.md shows (--markdown) and
the factored plan at 8192.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from _common import mean_row_spearman, trained

import trackin_ooc as to
from trackin_ooc.capturing.projection.factored import describe_plan, plan_from_spec

DIMS = "256,512,1024,2048,4096,8192,16384"


def influence(model, ckpts, train, test, where, **kw) -> tuple[np.ndarray, to.GradientStore, float]:
    t0 = time.perf_counter()
    tr = to.capture(model, ckpts, train, os.path.join(where, "train.zarr"), overwrite=True, **kw)
    te = to.capture(model, ckpts, test, os.path.join(where, "test.zarr"), overwrite=True, **kw)
    t = time.perf_counter() - t0
    return to.influence(te, tr).values, tr, t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default=DIMS)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train", type=int, default=500)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    dims = [int(d) for d in args.dims.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    kw = dict(device="cpu", batch_size=1024)

    results: dict[tuple[str, str, int], list[float]] = {}
    times: dict[tuple[str, str, int], float] = {}
    widths: dict[str, int] = {}
    tmp = tempfile.mkdtemp(prefix="projection_quality_")
    try:
        for name in args.models.split(","):
            model, ckpts, split = trained(name, 3)
            widths[name] = sum(q.numel() for q in model.parameters())
            train = torch.utils.data.Subset(split.train, range(args.train))
            test = torch.utils.data.Subset(split.test, range(args.test))
            exact, _, _ = influence(model, ckpts, train, test, tmp, **kw)
            for dim in dims:
                for kind in ("gaussian", "factored"):
                    for seed in seeds:
                        scores, store, t = influence(
                            model, ckpts, train, test, tmp, projection=kind, projection_dim=dim, seed=seed, **kw
                        )
                        results.setdefault((name, kind, dim), []).append(mean_row_spearman(scores, exact))
                        times[(name, kind, dim)] = times.get((name, kind, dim), 0.0) + t / len(seeds)
                        if kind == "factored" and dim == 8192 and seed == seeds[0]:
                            print(f"factored plan, {name} at 8192:\n{describe_plan(plan_from_spec(store.spec))}")
                    r = results[(name, kind, dim)]
                    print(
                        f"{name} {kind:8s} {dim:6d}: Spearman {np.mean(r):.4f} (seeds {np.round(r, 4).tolist()}), "
                        f"capture {times[(name, kind, dim)]:.1f} s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    names = args.models.split(",")
    header = "| dims | " + " | ".join(f"{n} dense | {n} factored" for n in names) + " |"
    print(
        "\nMean per-row Spearman vs exact (mean over seeds "
        + ", ".join(map(str, seeds))
        + "); "
        + ", ".join(f"{n}: {widths[n]:,} parameters" for n in names)
    )
    if args.markdown:
        print(header)
        print("|" + "---|" * (1 + 2 * len(names)))
    for dim in dims:
        cells = []
        for n in names:
            cells += [f"{np.mean(results[(n, 'gaussian', dim)]):.3f}", f"{np.mean(results[(n, 'factored', dim)]):.3f}"]
        print(f"| {dim} | " + " | ".join(cells) + " |" if args.markdown else f"{dim:6d}  " + "  ".join(cells))
    print("\nCapture time of train + test (s, mean over seeds): dense / factored")
    for dim in dims:
        print(
            f"{dim:6d}  "
            + "  ".join(f"{n} {times[(n, 'gaussian', dim)]:.1f} / {times[(n, 'factored', dim)]:.1f}" for n in names)
        )


if __name__ == "__main__":
    main()
