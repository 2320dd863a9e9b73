"""Benchmark 2: bounded memory. A train store many times larger than the budget, default settings.

    .venv/bin/python benchmarks/bounded_memory.py [--train 600000] [--test 2000]

Prints the store size, the planned blocks and the peak resident memory of this process and all
its children during influence(out=...) and top_k (target: under 2 GiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from _engine import DATA, PeakMemory, gib, random_store

import trackin_ooc as to


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=600_000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--checkpoints", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    c, f = args.checkpoints, args.features
    with PeakMemory() as build:
        train = random_store(f"mem_train_{args.train}_{f}_{c}.zarr", c, args.train, f, seed=3)
        test = random_store(f"mem_test_{args.test}_{f}_{c}.zarr", c, args.test, f, seed=4)
    plan = to.plan_for(test, train, k=10)
    print(
        f"train store {gib(train.nbytes)} ({args.train} × {f} × {c} float32), test {args.test} examples; "
        f"peak while building the stores {gib(build.peak)}"
    )
    print(
        f"plan: budget {gib(plan.memory_limit)} per worker, test rows {plan.test_rows}, train rows "
        f"{plan.train_rows}, {plan.threads} threads, estimated {gib(plan.estimated_bytes)}"
    )
    out = os.path.join(DATA, "mem_influence.zarr")
    with PeakMemory() as m:
        t0 = time.perf_counter()
        res = to.influence(test, train, out=out, overwrite=True)
        dt = time.perf_counter() - t0
    print(f"influence(out=...): wrote {gib(res.size * 4)} in {dt:.1f} s; peak resident memory {gib(m.peak)}")
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory() as m:
        t0 = time.perf_counter()
        to.top_k(test, train, k=10)
        dt = time.perf_counter() - t0
    print(f"top_k(k=10): {dt:.1f} s; peak resident memory {gib(m.peak)}")
    with PeakMemory() as m:
        t0 = time.perf_counter()
        to.self_influence(train)
        dt = time.perf_counter() - t0
    print(f"self_influence: {dt:.1f} s ({gib(train.nbytes / dt)}/s); peak resident memory {gib(m.peak)}")


if __name__ == "__main__":
    main()
