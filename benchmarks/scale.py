"""Benchmark 3: scale. top_k for 10k test × 1M train × 256 features × 3 checkpoints.

    .venv/bin/python benchmarks/scale.py [--train 1000000] [--test 10000] [--device cpu|gpu]

Prints wall time, useful FLOP/s and the ratio to the in-memory GEMM rate on the planned blocks.
"""

from __future__ import annotations

import argparse
import os
import time

from _engine import PeakMemory, gemm_rate, gib, random_store

import trackin_ooc as to


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1_000_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--memory-limit", default=None)
    args = p.parse_args()
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    c, f = args.checkpoints, args.features
    train = random_store(
        f"scale_train_{args.train}_{f}_{c}_{args.dtype}.zarr", c, args.train, f, dtype=args.dtype, seed=5
    )
    test = random_store(f"scale_test_{args.test}_{f}_{c}_{args.dtype}.zarr", c, args.test, f, dtype=args.dtype, seed=6)
    plan = to.plan_for(test, train, k=args.k, memory_limit=args.memory_limit)
    flops = 2.0 * args.test * args.train * c * f
    print(
        f"train {args.train} × {f} × {c} {args.dtype} ({gib(train.nbytes)}), test {args.test}; plan: test rows "
        f"{plan.test_rows}, train rows {plan.train_rows}, threads {plan.threads}, device {args.device}"
    )
    with PeakMemory() as m:
        t0 = time.perf_counter()
        to.top_k(test, train, k=args.k, device=args.device, memory_limit=args.memory_limit)
        dt = time.perf_counter() - t0
    rate = flops / dt
    print(f"top_k k={args.k}: {dt:.1f} s, {rate / 1e9:.1f} GFLOP/s useful, peak resident memory {gib(m.peak)}")
    ref = gemm_rate(plan.test_rows, plan.train_rows, c * f, device=args.device, seconds=3)
    lib = "cupy matmul" if args.device == "gpu" else "numpy in-memory GEMM"
    print(f"{lib} on the same blocks: {ref / 1e9:.1f} GFLOP/s; ratio {rate / ref:.2f}")


if __name__ == "__main__":
    main()
