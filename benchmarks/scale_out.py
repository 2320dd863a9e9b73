"""Benchmark: capture and scoring on a LocalCluster of 1 and of 2 worker processes (1 thread each).

    .venv/bin/python benchmarks/scale_out.py [--examples 12000] [--train 200000]

Prints wall times and the speed-up of 2 workers over 1 (ratio > 1: faster) for
- capture: the digits CNN (3 checkpoints, gaussian projection to 1024 dims) over resampled digits,
  row-block ranges as Dask tasks (``capture(..., client=)``);
- scoring: ``top_k`` (k=10) of 2,000 test × ``--train`` rows × 256 features × 3 checkpoints.
On a 2-core machine the ideal ratio is 2.0; worker start-up and the model's load per task are paid
inside the timed region.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from _common import DATA, resampled_digits, trained
from _engine import random_store, warm_page_cache
from distributed import Client, LocalCluster

import trackin_ooc as to


def cluster(n_workers: int):
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit="4GiB",
    )


def timed_capture(client, model, ckpts, data, out) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    to.capture(model, ckpts, data, out, projection_dim=1024, batch_size=128, client=client, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=12_000, help="examples to capture")
    p.add_argument("--train", type=int, default=200_000, help="train rows for top_k")
    args = p.parse_args()
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")

    model, ckpts, _ = trained("cnn")
    data = resampled_digits(args.examples, seed=3)
    test = random_store("gemm_test_2000_256_3.zarr", 3, 2000, 256, seed=2)
    train = random_store(f"gemm_train_{args.train}_256_3.zarr", 3, args.train, 256, seed=1)
    warm_page_cache(train.path)
    out = os.path.join(DATA, "scale_out_capture.zarr")

    times = {}
    for n in (1, 2):
        with cluster(n) as c, Client(c) as client:
            client.wait_for_workers(n)
            times["capture", n] = timed_capture(client, model, ckpts, data, out)
            t0 = time.perf_counter()
            to.top_k(test, train, k=10, client=client, progress=False)
            times["top_k", n] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)

    for what, unit, count in (
        ("capture", "examples/s", args.examples),
        ("top_k", "test×train pairs/s", 2000 * args.train),
    ):
        one, two = times[what, 1], times[what, 2]
        print(
            f"{what:8s} 1 worker {one:7.1f} s ({count / one:,.0f} {unit}); 2 workers {two:7.1f} s "
            f"({count / two:,.0f} {unit}); speed-up 2 ÷ 1 workers: {one / two:.2f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
