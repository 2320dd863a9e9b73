#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine lacks, into .whl/ (git-ignored),
# for Python 3.12 on x86-64. benchmarks/gpu_check.sh installs them there with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=${PYTHON:-.venv/bin/python}
plats=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in "dask==$($py -c 'import dask;print(dask.__version__)')" \
            "distributed==$($py -c 'import distributed;print(distributed.__version__)')" \
            "zarr==$($py -c 'import zarr;print(zarr.__version__)')" \
            "numcodecs==$($py -c 'import numcodecs;print(numcodecs.__version__)')" \
            google-crc32c donfig partd locket tblib zict cloudpickle toolz sortedcontainers \
            typing_extensions numba llvmlite dask-cuda pynvml nvidia-ml-py click psutil pyyaml; do
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plats[@]}" -d .whl "$spec"
done
ls .whl
