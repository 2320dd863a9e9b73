"""GPU cluster check (run by benchmarks/gpu_check.sh on a machine with CUDA and dask-cuda).

Starts dask-cuda's LocalCUDACluster (one worker per GPU, on 127.0.0.1), captures the digits CNN
with ``capture(..., client=, device="gpu")`` and scores top-k and self-influence on the workers'
GPUs, and compares every number with the same work done in this process on the GPU. Prints PASS or
FAIL lines and the wall times; exits 1 on any FAIL.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np

import trackin_ooc as to


def main() -> int:
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        print(f"SKIP LocalCUDACluster check: dask-cuda is not importable ({e})")
        return 0
    from distributed import Client

    from trackin_ooc.demo.examples import digits_cnn_model, digits_test_small, digits_train_small
    from trackin_ooc.demo.training import train_with_checkpoints

    root = tempfile.mkdtemp(prefix="trackin-gpu-cluster-")
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")

    try:
        ckpts = train_with_checkpoints(
            digits_cnn_model(), digits_train_small(), os.path.join(root, "ckpt"), epochs=3, checkpoint_every=1, seed=0
        )
        kw = dict(projection_dim=256, device="gpu", chunk_rows=64, progress=False)
        t0 = time.perf_counter()
        local_tr = to.capture(digits_cnn_model(), ckpts, digits_train_small(), os.path.join(root, "l_tr.zarr"), **kw)
        local_te = to.capture(digits_cnn_model(), ckpts, digits_test_small(), os.path.join(root, "l_te.zarr"), **kw)
        local_top = to.top_k(local_te, local_tr, k=5, device="gpu")
        local_si = to.self_influence(local_tr, device="gpu")
        print(f"in-process GPU: {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        with LocalCUDACluster(ip="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            n = len(client.scheduler_info()["workers"])
            print(f"LocalCUDACluster: {n} worker(s), started in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            tr = to.capture(
                digits_cnn_model(), ckpts, digits_train_small(), os.path.join(root, "c_tr.zarr"), client=client, **kw
            )
            te = to.capture(
                digits_cnn_model(), ckpts, digits_test_small(), os.path.join(root, "c_te.zarr"), client=client, **kw
            )
            top = to.top_k(te, tr, k=5, device="gpu", client=client)
            si = to.self_influence(tr, device="gpu", client=client)
            on_gpu = client.run(lambda: __import__("torch").cuda.is_available())
            print(f"LocalCUDACluster capture + top_k + self_influence: {time.perf_counter() - t0:.1f} s")
        check("every worker sees a GPU", all(on_gpu.values()), str(on_gpu))
        for a, b, name in ((tr, local_tr, "train"), (te, local_te, "test")):
            diff = float(np.max(np.abs(a.read_grads() - b.read_grads())))
            check(
                f"cluster capture == in-process GPU capture ({name})",
                diff <= 1e-4 * float(np.max(np.abs(b.read_grads()))),
                f"max abs diff {diff:.3g}",
            )
        check("top_k proponents equal", np.array_equal(top.proponent_index.values, local_top.proponent_index.values))
        check("top_k opponents equal", np.array_equal(top.opponent_index.values, local_top.opponent_index.values))
        check("self_influence equal", np.allclose(si.values, local_si.values, rtol=1e-4))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
