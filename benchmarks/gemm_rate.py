"""Benchmark 1: top_k and influence throughput ÷ NumPy's in-memory GEMM rate on the same shapes.

    .venv/bin/python benchmarks/gemm_rate.py [--train 200000] [--test 2000] [--features 256] [--repeat 3]

Useful FLOPs are 2 · n_test · n_train · (checkpoints · features). The page cache is warmed first,
so this measures the engine (reads, decode, fold, GEMM, selection), not the disk. The yardstick is
NumPy's ``A @ B.T`` (a fresh output each time, as in the issue); a second, stricter one writes into a
preallocated output (``np.matmul(..., out=)``), as top_k does on the CPU. With ``--repeat N`` each
engine figure is the best of N runs (for a shared machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
from _engine import DATA, gemm_rate, gib, random_store, warm_page_cache

import trackin_ooc as to


def gemm_rate_out(test_rows: int, train_rows: int, width: int, seconds: float = 5.0) -> float:
    """FLOP/s of in-memory float32 ``np.matmul(A, B.T, out=C)`` into one preallocated C (all cores)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((test_rows, width), dtype=np.float32)
    b = rng.standard_normal((train_rows, width), dtype=np.float32)
    c = np.matmul(a, b.T)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        np.matmul(a, b.T, out=c)
        n += 1
    return 2.0 * test_rows * train_rows * width * n / (time.perf_counter() - t0)


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=200_000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs for each engine figure")
    args = p.parse_args()
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")

    c, f = args.checkpoints, args.features
    train = random_store(f"gemm_train_{args.train}_{f}_{c}.zarr", c, args.train, f, seed=1)
    test = random_store(f"gemm_test_{args.test}_{f}_{c}.zarr", c, args.test, f, seed=2)
    warm_page_cache(train.path)
    plan = to.plan_for(test, train, k=args.k)
    width = c * f
    flops = 2.0 * args.test * args.train * width
    print(
        f"train {args.train} × {f} × {c} ({gib(train.nbytes)}), test {args.test}; "
        f"plan: test rows {plan.test_rows}, train rows {plan.train_rows}, threads {plan.threads}"
    )

    ref = gemm_rate(plan.test_rows, plan.train_rows, width, device=args.device)
    lib = "cupy" if args.device == "gpu" else "numpy"
    print(f"{lib} in-memory A @ B.T ({plan.test_rows}×{width} · {width}×{plan.train_rows}): {ref / 1e9:.1f} GFLOP/s")
    ref_out = None
    if args.device != "gpu":
        ref_out = gemm_rate_out(plan.test_rows, plan.train_rows, width)
        print(f"numpy in-memory matmul(A, B.T, out=C), C reused: {ref_out / 1e9:.1f} GFLOP/s")

    t_topk = best_time(lambda: to.top_k(test, train, k=args.k, device=args.device), args.repeat)
    strict = f", to matmul(out=) {flops / t_topk / ref_out:.2f}" if ref_out else ""
    print(
        f"top_k k={args.k}: {t_topk:.2f} s, {flops / t_topk / 1e9:.1f} GFLOP/s, "
        f"ratio to in-memory GEMM {flops / t_topk / ref:.2f}{strict}"
    )

    t_inf = best_time(lambda: to.influence(test, train, device=args.device).data.sum().compute(), args.repeat)
    print(
        f"influence (lazy, reduced in memory): {t_inf:.2f} s, {flops / t_inf / 1e9:.1f} GFLOP/s, "
        f"ratio {flops / t_inf / ref:.2f}"
    )

    out = os.path.join(DATA, "gemm_influence_out.zarr")
    t0 = time.perf_counter()
    to.influence(test, train, out=out, overwrite=True, device=args.device)
    t_out = time.perf_counter() - t0
    out_bytes = args.test * args.train * 4
    print(
        f"influence(out=...) writing {gib(out_bytes)}: {t_out:.2f} s, {flops / t_out / 1e9:.1f} GFLOP/s, "
        f"ratio {flops / t_out / ref:.2f}"
    )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
