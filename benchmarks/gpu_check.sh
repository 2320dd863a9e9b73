#!/usr/bin/env bash
# GPU checks, as one prepared script for the device machine (run from the repo root):
#   1. the GPU tests (tests/test_gpu.py; they skip only without a CUDA device),
#   2. LocalCUDACluster capture and scoring (benchmarks/gpu_cluster_check.py) against in-process GPU runs,
#   3. benchmark 1 (gemm_rate) and benchmark 3 (scale) with --device gpu, printing throughput ÷ CuPy matmul.
# The machine has torch, cupy, xarray, numpy; dask, distributed and zarr travel as wheels in .whl/
# (make them with benchmarks/fetch_gpu_wheels.sh and pass carry: [".whl"]). Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRACKIN_OOC_QUIET=1 TRACKIN_BENCH_DATA=/tmp/trackin-bench
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
OUTDIR=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import cupy, dask, zarr, torch; print('cupy', cupy.__version__, 'dask', dask.__version__, 'zarr', zarr.__version__, 'torch', torch.__version__)"
echo "== GPU tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -15
echo "== LocalCUDACluster capture and scoring"
timeout 150 python3 benchmarks/gpu_cluster_check.py 2>&1 | tee "$OUTDIR/gpu_cluster.log"
echo "== benchmark 1: GEMM rate (GPU)"
timeout 150 python3 benchmarks/gemm_rate.py --device gpu --train 400000 --test 20000 2>&1 | tee "$OUTDIR/gemm_rate_gpu.log"
echo "== benchmark 3: scale (GPU, float16 store so reads keep up)"
timeout 200 python3 benchmarks/scale.py --device gpu --dtype float16 --memory-limit 16GiB 2>&1 | tee "$OUTDIR/scale_gpu.log"
