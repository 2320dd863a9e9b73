"""trackin-ooc against Captum's TracInCP on the same work, every ratio measured in this one run.

    .venv/bin/python benchmarks/vs_captum.py            # 1,000 test × 20,000 train, 5 checkpoints
    .venv/bin/python benchmarks/vs_captum.py --quick    # 200 × 2,000, 3 checkpoints (smoke run)
    .venv/bin/python benchmarks/vs_captum.py --modes factors --captum-test 50,200   # Captum on test subsets

Modes: ``exact`` (flat exact gradients), ``factored`` (at each ``--dims``), ``factors`` (exact gradients
as per-layer factors, ``projection="factors"``). Captum's operations take minutes at full size; two
ways to spend less time on them, both printed with the results:

- ``--captum-test N1,N2``: Captum's ``influence`` and ``influence(k=10)`` run on the first N1 and N2
  test examples only, and their full-size times are extrapolated by the straight line through those two
  points (Captum's cost per operation is a fixed part, the train gradients at every checkpoint, plus a
  part proportional to the test examples); ``self_influence`` runs in full; the repeated query is
  the same operation as ``influence`` on another test set and gets its estimate. Quality is compared on
  the first N2 test rows.
- ``--captum-cache FILE.npz``: reuse the Captum timings and results that an earlier run of the same work
  (sizes, checkpoints, subset) saved there; a run without a matching cache saves one.

Model: digits MLP 64-256-256-10 (85k parameters) trained with SGD; data: digits resampled with
replacement plus pixel noise (train, test, and a second test set for the repeated query).
Captum: ``TracInCP`` exact (``sample_wise_grads_per_batch=True``, "sum" cross-entropy) —
``influence`` (the full matrix), ``self_influence``, ``influence(k=10)`` (top-10 proponents), and
``influence`` on the second test set. Ours, per mode (exact; factored at each ``--dims``): capture of
train and test, then ``influence(...).values``, ``self_influence(exact_norms=True)`` (exact, from the
gradient norms every capture stores), ``top_k(k=10)`` (proponents and opponents); the repeated query
captures only the new test set and scores it against the stored train set; "self-inf only" is what a
user wanting only self-influence runs: a factored capture keeping 64 features, then the exact norms.
Each of our times includes the captures that operation needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
from _common import Stopwatch, mean_row_spearman, resampled_digits, trained
from torch import nn

import trackin_ooc as to
from trackin_ooc.demo import digits_mlp

K = 10


def load_checkpoint(model: nn.Module, path: str) -> float:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model_state_dict"])
    return float(ckpt["learning_rate"])


def run_captum(
    ckpts, train, test, test2, batch_size: int, subset: tuple[int, int] | None = None
) -> tuple[dict, dict, str]:
    """Captum's timings, results and a note on how the timings were obtained."""
    from captum.influence import TracInCP

    tracin = TracInCP(
        digits_mlp((256, 256), seed=0),
        train,
        ckpts,
        checkpoints_load_func=load_checkpoint,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=batch_size,
        sample_wise_grads_per_batch=True,
    )
    sw, out = Stopwatch(), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if subset is None:
            with sw("influence"):
                out["influence"] = tracin.influence(tuple(test.tensors)).detach().numpy()
            with sw("self_influence"):
                out["self_influence"] = tracin.self_influence().detach().numpy()
            with sw("top_k"):
                idx, _ = tracin.influence(tuple(test.tensors), k=K, proponents=True)
                out["proponents"] = idx.numpy()
            with sw("repeat"):
                out["influence2"] = tracin.influence(tuple(test2.tensors)).detach().numpy()
            return sw.t, out, "measured in full"
        n1, n2 = subset
        x, y = test.tensors
        points = {}
        for op in ("influence", "top_k"):
            for n in (n1, n2):
                batch = (x[:n], y[:n])
                t0 = time.perf_counter()
                if op == "influence":
                    res = tracin.influence(batch).detach().numpy()
                else:
                    res = tracin.influence(batch, k=K, proponents=True)[0].numpy()
                points[op, n] = time.perf_counter() - t0
            out["influence" if op == "influence" else "proponents"] = res
        with sw("self_influence"):
            out["self_influence"] = tracin.self_influence().detach().numpy()
    n = len(y)
    t = {"self_influence": sw.t["self_influence"]}
    for op in ("influence", "top_k"):
        slope = (points[op, n2] - points[op, n1]) / (n2 - n1)
        t[op] = points[op, n2] + slope * (n - n2)
    t["repeat"] = t["influence"]
    note = (
        f"Captum influence and top-k measured on the first {n1} and {n2} test examples and extrapolated "
        f"linearly to {n}: "
        + ", ".join(f"{op} {points[op, m]:.1f} s at {m}" for op in ("influence", "top_k") for m in (n1, n2))
        + "; self_influence measured in full; repeat = the influence estimate (not run)"
    )
    return t, out, note


def captum_cached(path: str | None, key: dict, run) -> tuple[dict, dict, str]:
    """``run()`` unless ``path`` holds Captum results of the same ``key`` (then those, marked as reused)."""
    if path and os.path.exists(path):
        saved = np.load(path, allow_pickle=False)
        meta = json.loads(str(saved["meta"]))
        if meta["key"] == key:
            out = {k: saved[k] for k in saved.files if k != "meta"}
            return meta["timings"], out, f"reused from {path} ({meta['note']}; run {meta['when']})"
    timings, out, note = run()
    if path:
        meta = {"key": key, "timings": timings, "note": note, "when": time.strftime("%Y-%m-%d %H:%M")}
        np.savez(path, meta=json.dumps(meta), **out)
    return timings, out, note


SELF_ONLY_DIM = 64  # features kept by the self-influence-only capture (its scores come from the exact norms)


def run_ours(
    model,
    ckpts,
    train,
    test,
    test2,
    where: str,
    mode: str,
    dim: int | None,
    batch_size: int,
    device: str,
    memory_limit: str | None,
):
    projection = {"exact": "gaussian", "factored": "factored", "factors": "factors"}[mode]
    kw = dict(projection_dim=dim, projection=projection, batch_size=batch_size, device=device)
    sw, out = Stopwatch(), {}
    with sw("capture_train"):
        tr = to.capture(model, ckpts, train, os.path.join(where, "train.zarr"), **kw)
    with sw("capture_test"):
        te = to.capture(model, ckpts, test, os.path.join(where, "test.zarr"), **kw)
    with sw("influence"):
        out["influence"] = to.influence(te, tr, device=device, memory_limit=memory_limit).values
    with sw("self_influence"):  # exact: from the gradient norms the capture stores next to the features
        out["self_influence"] = to.self_influence(tr, device=device, exact_norms=True).values
    with sw("top_k"):
        out["proponents"] = to.top_k(te, tr, k=K, device=device, memory_limit=memory_limit).proponent_index.values
    with sw("repeat"):
        te2 = to.capture(model, ckpts, test2, os.path.join(where, "test2.zarr"), **kw)
        out["influence2"] = to.influence(te2, tr, device=device, memory_limit=memory_limit).values
    with sw("self_only"):  # self-influence alone: a capture that keeps few features, then the exact norms
        so = to.capture(
            model,
            ckpts,
            train,
            os.path.join(where, "self_only.zarr"),
            projection="factored",
            projection_dim=SELF_ONLY_DIM,
            batch_size=batch_size,
            device=device,
        )
        out["self_only"] = to.self_influence(so, device=device, exact_norms=True).values
    out["store_gb"] = tr.nbytes / 1e9
    out["flat_gb"] = tr.n_checkpoints * tr.n_examples * tr.spec.n_parameters * 4 / 1e9  # a flat exact store
    return sw.t, out


def topk_overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=20_000)
    p.add_argument("--test", type=int, default=1_000)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--dims", default="4096", help="factored projection dims, comma separated")
    p.add_argument("--modes", default="exact,factored", help="exact, factored, factors (comma separated)")
    p.add_argument(
        "--captum-test",
        default=None,
        metavar="N1,N2",
        help="run Captum's influence and top-k on N1 and N2 test examples and extrapolate (see above)",
    )
    p.add_argument(
        "--captum-cache",
        default=None,
        metavar="FILE.npz",
        help="reuse (or save) Captum's timings and results of the same work",
    )
    p.add_argument("--quick", action="store_true", help="200 test × 2,000 train, 3 checkpoints")
    p.add_argument("--captum-batch", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1024, help="our capture batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-limit", default=None, help="the engine's memory budget, e.g. 6GB (default: its own)")
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    args = p.parse_args()
    if args.quick:
        args.train, args.test, args.checkpoints = 2000, 200, 3
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")

    model, ckpts, _ = trained("mlp", args.checkpoints)
    train = resampled_digits(args.train, seed=1)
    test = resampled_digits(args.test, seed=2)
    test2 = resampled_digits(args.test, seed=3)
    print(
        f"{args.test} test × {args.train} train, {args.checkpoints} checkpoints, MLP 64-256-256-10 "
        f"({sum(q.numel() for q in model.parameters()):,} params), torch {torch.get_num_threads()} threads"
    )

    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    subset = tuple(int(v) for v in args.captum_test.split(",")) if args.captum_test else None
    key = {
        "train": args.train,
        "test": args.test,
        "checkpoints": args.checkpoints,
        "subset": subset,
        "batch": args.captum_batch,
    }
    t0 = time.perf_counter()
    captum_t, ref, captum_note = captum_cached(
        args.captum_cache, key, lambda: run_captum(ckpts, train, test, test2, args.captum_batch, subset)
    )
    print(
        "captum: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in captum_t.items())
        + f" (this step {time.perf_counter() - t0:.1f} s; {captum_note})",
        flush=True,
    )
    rows_compared = ref["influence"].shape[0]

    modes = []
    for m in args.modes.split(","):
        modes += [(m, None)] if m in ("exact", "factors") else [(m, int(d)) for d in args.dims.split(",")]
    rows = []
    for mode, dim in modes:
        where = tempfile.mkdtemp(prefix="vs_captum_", dir=args.workdir)
        try:
            t, out = run_ours(
                model, ckpts, train, test, test2, where, mode, dim, args.batch_size, args.device, args.memory_limit
            )
        finally:
            shutil.rmtree(where, ignore_errors=True)
        label = mode if dim is None else f"{mode} {dim}"
        ours = {
            "influence": t["capture_train"] + t["capture_test"] + t["influence"],
            "self_influence": t["capture_train"] + t["self_influence"],
            "top_k": t["capture_train"] + t["capture_test"] + t["top_k"],
            "all three": t["capture_train"] + t["capture_test"] + t["influence"] + t["self_influence"] + t["top_k"],
            "repeat": t["repeat"],
            "self-inf only": t["self_only"],
        }
        captum = dict(
            captum_t,
            **{
                "all three": captum_t["influence"] + captum_t["self_influence"] + captum_t["top_k"],
                "self-inf only": captum_t["self_influence"],
            },
        )
        inf = out["influence"][:rows_compared]
        quality = {
            "spearman": mean_row_spearman(inf, ref["influence"]),
            "spearman2": (
                mean_row_spearman(out["influence2"], ref["influence2"]) if "influence2" in ref else float("nan")
            ),
            "self_spearman": mean_row_spearman(out["self_influence"][None], ref["self_influence"][None]),
            "top10_overlap": topk_overlap(out["proponents"][:rows_compared], ref["proponents"]),
            "max_rel_err": float(np.abs(inf - ref["influence"]).max() / np.abs(ref["influence"]).max()),
            "self_rel_err": float(np.max(np.abs(out["self_only"] - ref["self_influence"]) / ref["self_influence"])),
        }
        rows.append((label, t, ours, captum, quality, out["store_gb"]))
        print(
            f"{label}: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
            + f"; train store {out['store_gb']:.2f} GB (a flat exact store: {out['flat_gb']:.2f} GB, "
            f"{out['flat_gb'] / out['store_gb']:.0f}x larger)",
            flush=True,
        )

    print(f"\n{'mode':14s} {'operation':15s} {'captum s':>9s} {'ours s':>8s} {'ratio':>7s}")
    for label, _, ours, captum, _, _ in rows:
        for op in ("influence", "self_influence", "top_k", "all three", "repeat", "self-inf only"):
            print(f"{label:14s} {op:15s} {captum[op]:9.1f} {ours[op]:8.1f} {captum[op] / ours[op]:6.1f}×")
    print(
        f"\n{'mode':14s} {'Spearman':>9s} {'(repeat)':>9s} {'self-inf':>9s} {'top-10 overlap':>15s} "
        f"{'max rel err':>12s} {'self-only rel err':>18s}"
    )
    for label, _, _, _, q, _ in rows:
        print(
            f"{label:14s} {q['spearman']:9.4f} {q['spearman2']:9.4f} {q['self_spearman']:9.4f} "
            f"{q['top10_overlap']:15.3f} {q['max_rel_err']:12.2e} {q['self_rel_err']:18.2e}"
        )
    print(f"\nquality compared on {rows_compared} test rows; machine load average at the end {os.getloadavg()[0]:.2f}")
    print(
        "ours: capture train/test are included in every operation that needs them (see the docstring); "
        "'repeat' = capture of the new test set + its influence against the stored train set; "
        f"'self-inf only' = a factored {SELF_ONLY_DIM}-dim capture of the train set + "
        "self_influence(exact_norms=True); "
        "self_influence uses exact_norms=True on the shared train capture."
    )


if __name__ == "__main__":
    main()
