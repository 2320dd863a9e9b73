"""Bad input to the ``trackin-ooc`` executable: exit status, one line naming the problem and the fix,
no traceback (unless --debug), and no damage to the files already there."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import trackin_ooc as to
from trackin_ooc.demo import digits_cnn, train_with_checkpoints
from trackin_ooc.demo.examples import digits_test_small, digits_train_small
from trackin_ooc.engine.array_module import cupy_usable

from .test_cli import EX, EXE, cli_env, ok, run_cli

USAGE, FAILURE = 2, 1
STATUS = ("capture: about ",)


class _Breaks(Dataset):
    """Digits that raise at one index, as a broken data pipeline would."""

    def __init__(self, at: int):
        self.data, self.at = digits_train_small(), at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.at:
            raise OSError(f"image {i} is unreadable")
        return self.data[i]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Real stores and files for the bad-input table, made in-process with the library."""
    root = tmp_path_factory.mktemp("cli_errors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = digits_cnn(seed=0)
        ckpts = train_with_checkpoints(
            model, digits_train_small(), root / "ckpt", epochs=4, lr=0.1, checkpoint_every=2, seed=0
        )
        torch.save(torch.load(ckpts[0], weights_only=True)["model_state_dict"], root / "plain.pt")
        kw = dict(projection_dim=32, progress=False)
        train = to.capture(model, ckpts, digits_train_small(), root / "train.zarr", seed=0, **kw)
        test = to.capture(model, ckpts, digits_test_small(), root / "test.zarr", seed=0, **kw)
        to.capture(model, ckpts, digits_test_small(), root / "test_seed1.zarr", seed=1, **kw)
        with pytest.raises(OSError, match="unreadable"):
            to.capture(model, ckpts, _Breaks(at=200), root / "partial.zarr", batch_size=64, **kw)
    finally:
        torch.set_num_threads(threads)
    assert not to.open_store(root / "partial.zarr").complete
    to.influence(test, train, out=root / "inf.zarr", progress=False)
    to.self_influence(train).to_dataframe().to_csv(root / "existing.csv")
    (root / "existing.parquet").write_bytes(b"not really parquet, but it exists")
    (root / "usercode.py").write_text(
        textwrap.dedent("""
        import time
        from torch.utils.data import Dataset
        from trackin_ooc.demo.examples import digits_cnn_model, digits_train_small

        not_callable = 3

        def model():
            return digits_cnn_model()

        def needs_arg(x):
            return x

        def returns_int():
            return 42

        def raises():
            raise RuntimeError("boom: the data server is down")

        class _Breaks(Dataset):
            def __init__(self):
                self.data = digits_train_small()
            def __len__(self):
                return len(self.data)
            def __getitem__(self, i):
                if i == 200:
                    raise OSError(f"image {i} is unreadable")
                return self.data[i]

        def bad_data():
            return _Breaks()

        class _Slow(Dataset):
            def __init__(self):
                self.data = digits_train_small()
            def __len__(self):
                return len(self.data)
            def __getitem__(self, i):
                if i >= 64:
                    time.sleep(0.05)
                return self.data[i]

        def slow_data():
            return _Slow()
    """)
    )
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (names and contents), to check that nothing changed."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def check_failure(result, status: int, *fragments: str) -> str:
    assert result.returncode == status, f"exit {result.returncode}, expected {status}: {result.stderr}"
    # Status lines said before the work began (a capture's size estimate) may precede the error.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(STATUS)]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("trackin-ooc") and ": error: " in line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    return line


CAPTURE = ["capture", "--model", f"{EX}:digits_cnn_model", "--data", f"{EX}:digits_train_small"]
CKPT = ["--checkpoint", "ckpt/epoch_002.pt", "--checkpoint", "ckpt/epoch_004.pt"]
TOPK = ["top-k", "--train", "train.zarr", "--test", "test.zarr"]

CASES = {
    # usage errors: click's, exit 2
    "unknown command": (["frobnicate"], USAGE, ["No such command 'frobnicate'"]),
    "unknown option": (["info", "train.zarr", "--colour"], USAGE, ["No such option '--colour'"]),
    "missing --out": (["self-influence", "train.zarr"], USAGE, ["Missing option '--out'"]),
    "k = 0": ([*TOPK, "-k", "0", "--out", "new.csv"], USAGE, ["'-k'", "x>=1", "--help"]),
    "k < 0": ([*TOPK, "-k", "-3", "--out", "new.csv"], USAGE, ["'-k'", "x>=1"]),
    "k not a number": ([*TOPK, "-k", "ten", "--out", "new.csv"], USAGE, ["'ten' is not a valid integer"]),
    "MOD:FN without a colon": (
        ["capture", "--model", "mymodel", "--data", f"{EX}:digits_train_small", *CKPT, "--out", "new.zarr"],
        USAGE,
        ["'--model'", "MOD:FN"],
    ),
    "one --lr for two checkpoints": (
        [*CAPTURE, *CKPT, "--lr", "0.1", "--out", "new.zarr"],
        USAGE,
        ["1 --lr for 2 --checkpoint"],
    ),
    "--projection without a dimension": (
        [*CAPTURE, *CKPT, "--projection", "rademacher", "--out", "new.zarr"],
        USAGE,
        ["--projection needs --projection-dim"],
    ),
    "projection dim 0": (
        [*CAPTURE, *CKPT, "--projection-dim", "0", "--out", "new.zarr"],
        USAGE,
        ["'--projection-dim'"],
    ),
    "two schedulers": (
        ["--workers", "2", "--scheduler-address", "tcp://127.0.0.1:8786", "info", "train.zarr"],
        USAGE,
        ["--scheduler-address and --workers exclude each other"],
    ),
    "bad memory size": (["--memory-limit", "lots", "info", "train.zarr"], USAGE, ["'lots' is not a size"]),
    "unknown device": (["--device", "tpu", "info", "train.zarr"], USAGE, ["'--device'", "tpu"]),
    "quiet and progress": (["--quiet", "--progress", "info", "train.zarr"], USAGE, ["exclude each other"]),
    "missing scheduler file": (
        ["--scheduler-file", "nope.json", "info", "train.zarr"],
        USAGE,
        ["'--scheduler-file'", "does not exist"],
    ),
    # failures: exit 1
    "unknown module": (
        [
            "capture",
            "--model",
            "no_such_module_xyz:model",
            "--data",
            f"{EX}:digits_train_small",
            *CKPT,
            "--out",
            "new.zarr",
        ],
        FAILURE,
        ["cannot import module 'no_such_module_xyz'"],
    ),
    "unknown function": (
        ["capture", "--model", f"{EX}:no_such_fn", "--data", f"{EX}:digits_train_small", *CKPT, "--out", "new.zarr"],
        FAILURE,
        ["has no attribute 'no_such_fn'", "digits_cnn_model"],
    ),
    "missing code file": (
        [
            "capture",
            "--model",
            "models/missing.py:model",
            "--data",
            f"{EX}:digits_train_small",
            *CKPT,
            "--out",
            "new.zarr",
        ],
        FAILURE,
        ["models/missing.py does not exist"],
    ),
    "dataset where a model is expected": (
        [
            "capture",
            "--model",
            f"{EX}:digits_train_small",
            "--data",
            f"{EX}:digits_train_small",
            *CKPT,
            "--out",
            "new.zarr",
        ],
        FAILURE,
        ["not a torch.nn.Module"],
    ),
    "data callable raises": (
        ["capture", "--model", "usercode.py:model", "--data", "usercode.py:raises", *CKPT, "--out", "new.zarr"],
        FAILURE,
        ["RuntimeError: boom"],
    ),
    "missing checkpoint": (
        [*CAPTURE, "--checkpoint", "ckpt/epoch_999.pt", "--out", "new.zarr"],
        FAILURE,
        ["checkpoint file not found", "epoch_999.pt", "check the path"],
    ),
    "checkpoint of another model": (
        [
            "capture",
            "--model",
            f"{EX}:digits_mlp_model",
            "--data",
            f"{EX}:digits_train_small",
            *CKPT,
            "--out",
            "new.zarr",
        ],
        FAILURE,
        ["does not fit the model"],
    ),
    "checkpoint without learning rate": (
        [*CAPTURE, "--checkpoint", "plain.pt", "--out", "new.zarr"],
        FAILURE,
        ["no learning rate", "--lr"],
    ),
    "existing store": ([*CAPTURE, *CKPT, "--out", "train.zarr"], FAILURE, ["already exists", "--overwrite"]),
    "existing table": (
        ["self-influence", "train.zarr", "--out", "existing.csv"],
        FAILURE,
        ["already exists", "--overwrite"],
    ),
    "existing influence output": (
        ["influence", "--train", "train.zarr", "--test", "test.zarr", "--out", "inf.zarr"],
        FAILURE,
        ["already exists"],
    ),
    "unknown output format": (
        ["self-influence", "train.zarr", "--out", "scores.txt"],
        FAILURE,
        ["cannot tell the output format", ".csv, .parquet or .zarr"],
    ),
    "influence to a csv": (
        ["influence", "--train", "train.zarr", "--test", "test.zarr", "--out", "m.csv"],
        FAILURE,
        ["end the name in .zarr"],
    ),
    "k larger than the train set": (
        [*TOPK, "-k", "301", "--out", "new.csv"],
        FAILURE,
        ["-k 301 is larger than the train store's 300 examples", "use -k 300 or less"],
    ),
    "csv where a store is expected": (
        ["self-influence", "existing.csv", "--out", "new.csv"],
        FAILURE,
        ["no gradient store at", "existing.csv"],
    ),
    "store that does not exist": (["info", "nope.zarr"], FAILURE, ["nope.zarr", "does not exist"]),
    "influence output as a store": (
        ["self-influence", "inf.zarr", "--out", "new.csv"],
        FAILURE,
        ["is an influence matrix", "not a gradient store"],
    ),
    "mismatched stores (seeds), top-k": (
        ["top-k", "--train", "train.zarr", "--test", "test_seed1.zarr", "--out", "new.csv"],
        FAILURE,
        ["cannot be combined", "seed 1 vs 0"],
    ),
    "incomplete store": (["self-influence", "partial.zarr", "--out", "new.csv"], FAILURE, ["incomplete", "rerun"]),
    "unreachable scheduler": (
        ["--scheduler-address", "tcp://127.0.0.1:9", "self-influence", "train.zarr", "--out", "new.csv"],
        FAILURE,
        ["cannot use the scheduler at tcp://127.0.0.1:9"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, project):
    args, status, fragments = CASES[case]
    before = snapshot(project)
    env = cli_env(DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="1s")
    result = run_cli(*args, cwd=project, env=env)
    check_failure(result, status, *fragments)
    assert snapshot(project) == before, "bad input changed or created files"


def test_debug_shows_the_traceback(project):
    result = run_cli("--debug", "self-influence", "existing.csv", "--out", "new.csv", cwd=project)
    assert result.returncode == FAILURE
    assert "Traceback (most recent call last)" in result.stderr and "StoreError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("trackin-ooc self-influence: error: no gradient store at")


def test_failed_capture_leaves_an_incomplete_store(project, tmp_path):
    """A capture that fails half-way leaves a store marked incomplete (which scoring refuses, see the
    table) and says how to start again."""
    (tmp_path / "ckpt").symlink_to(project / "ckpt")
    (tmp_path / "usercode.py").write_text((project / "usercode.py").read_text())
    args = [
        "capture",
        "--model",
        "usercode.py:model",
        "--data",
        "usercode.py:bad_data",
        *CKPT,
        "--batch-size",
        "64",
        "--projection-dim",
        "16",
        "--out",
        "half.zarr",
    ]
    check_failure(
        run_cli(*args, cwd=tmp_path),
        FAILURE,
        "capture failed: OSError: image 200 is unreadable",
        "partial store half.zarr is incomplete",
        "--overwrite",
    )
    half = to.open_store(tmp_path / "half.zarr")
    assert half.complete is False and half.n_examples == 300
    info = ok(run_cli("info", "half.zarr", cwd=tmp_path)).stdout
    assert info.splitlines()[-1].split()[:2] == ["state", "INCOMPLETE"] and "row blocks written" in info
    with pytest.raises(to.IncompleteStoreError):
        to.self_influence(half)


def _is_store(path: Path) -> bool:
    try:
        to.open_store(path)
        return True
    except Exception:  # not there yet, or half-written metadata
        return False


def test_interrupted_capture(project, tmp_path):
    """Ctrl-C in the middle of a capture: exit 1, one line, and a store that does not look complete."""
    (tmp_path / "ckpt").symlink_to(project / "ckpt")
    (tmp_path / "usercode.py").write_text((project / "usercode.py").read_text())
    args = [
        "capture",
        "--model",
        "usercode.py:model",
        "--data",
        "usercode.py:slow_data",
        *CKPT,
        "--batch-size",
        "64",
        "--projection-dim",
        "16",
        "--out",
        "cut.zarr",
    ]
    proc = subprocess.Popen(
        [str(EXE), *args], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not _is_store(tmp_path / "cut.zarr"):  # the store is laid out: we are mid-capture
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    check_failure(result, FAILURE, "capture failed: interrupted", "cut.zarr is incomplete")
    assert not to.open_store(tmp_path / "cut.zarr").complete


def test_failed_overwrite_keeps_the_old_store(project):
    """--overwrite replaces a store only once the new one is complete: a failure leaves the old one."""
    before = snapshot(project)
    old = to.self_influence(project / "train.zarr").values
    for data, fragment in (
        ("usercode.py:bad_data", "image 200 is unreadable"),
        (f"{EX}:digits_train_small", "checkpoint file not found"),
    ):
        ckpts = CKPT if "bad_data" in data else ["--checkpoint", "ckpt/missing.pt"]
        result = run_cli(
            "capture",
            "--model",
            "usercode.py:model",
            "--data",
            data,
            *ckpts,
            "--batch-size",
            "64",
            "--projection-dim",
            "16",
            "--out",
            "train.zarr",
            "--overwrite",
            cwd=project,
        )
        check_failure(result, FAILURE, fragment, "the existing store train.zarr was left as it was")
        assert snapshot(project) == before
    np.testing.assert_array_equal(to.self_influence(project / "train.zarr").values, old)


def test_gpu_device_where_there_is_one(project):
    """--device gpu scores with CuPy where a GPU exists, else says what is missing (see the table)."""
    result = run_cli("--device", "gpu", *TOPK, "-k", "3", "--out", "gpu.csv", cwd=project)
    if cupy_usable():
        ok(result)
        (project / "gpu.csv").unlink()
    else:
        check_failure(result, FAILURE, "--device gpu needs cupy and a CUDA device", "--device cpu")
        assert not (project / "gpu.csv").exists()
