"""The ``trackin-ooc`` executable as a user meets it: ``capture --like``, the size line, --debug and global
options in the right place, "did you mean", messages in the CLI's words, the swapped --train/--test warning,
and docs/cli.md's walkthrough run as written on the default install (no pyarrow)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.demo import digits_cnn, train_with_checkpoints
from trackin_ooc.demo.examples import digits_test_small, digits_train_small

from .test_cli import EX, cli_env, ok, run_cli

USAGE, FAILURE = 2, 1
DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
MODEL, TRAIN, TEST = f"{EX}:digits_cnn_model", f"{EX}:digits_train_small", f"{EX}:digits_test_small"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Checkpoints of the digits CNN and a train store captured from them by the library."""
    root = tmp_path_factory.mktemp("polish")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = digits_cnn(seed=0)
        ckpts = train_with_checkpoints(
            model, digits_train_small(), root / "ckpt", epochs=4, lr=0.1, checkpoint_every=2, seed=0
        )
        to.capture(
            model,
            ckpts,
            digits_train_small(),
            root / "train.zarr",
            projection_dim=24,
            seed=5,
            layers=["conv2", "fc"],
            progress=False,
        )
        to.capture(
            model,
            ckpts,
            digits_test_small(),
            root / "test.zarr",
            projection_dim=24,
            seed=5,
            layers=["conv2", "fc"],
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return root


def one_error(result, status: int) -> str:
    """The one error line of a failed run (status lines said before the work began are allowed)."""
    assert result.returncode == status, f"exit {result.returncode}, expected {status}: {result.stderr}"
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("capture: about ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and ": error: " in lines[0]
    return lines[0]


def test_capture_like_equals_the_options_spelled_out(project):
    result = ok(
        run_cli("capture", "--like", "train.zarr", "--model", MODEL, "--data", TEST, "--out", "like.zarr", cwd=project)
    )
    assert re.search(
        r"capture: about [\d.]+ KiB of gradients to write into like.zarr \(100 examples × 2 "
        r"checkpoints × 24 features, float32\)",
        result.stderr,
    ), result.stderr
    tt.assert_stores_identical(project / "like.zarr", project / "test.zarr")
    ok(
        run_cli(
            "top-k", "--train", "train.zarr", "--test", "like.zarr", "-k", "3", "--out", "like_top.csv", cwd=project
        )
    )
    shutil.rmtree(project / "like.zarr")
    (project / "like_top.csv").unlink()


def test_capture_like_refuses_options_it_takes_from_the_store(project):
    result = run_cli(
        "capture",
        "--like",
        "train.zarr",
        "--model",
        MODEL,
        "--data",
        TEST,
        "--seed",
        "1",
        "--layers",
        "fc",
        "--out",
        "x.zarr",
        cwd=project,
    )
    line = one_error(result, USAGE)
    assert "--like takes --seed, --layers from the train store" in line
    assert not (project / "x.zarr").exists()
    line = one_error(run_cli("capture", "--model", MODEL, "--data", TEST, "--out", "x.zarr", cwd=project), USAGE)
    assert "Missing option '--checkpoint'" in line and "--like" in line


def test_capture_like_with_a_moved_checkpoint(project, tmp_path):
    shutil.copytree(project / "ckpt", tmp_path / "ckpt")
    ckpts = sorted((tmp_path / "ckpt").glob("*.pt"))
    args = [f"--checkpoint={p}" for p in ckpts]
    ok(
        run_cli(
            "capture",
            "--model",
            MODEL,
            "--data",
            TRAIN,
            *args,
            "--projection-dim",
            "8",
            "--out",
            "train.zarr",
            cwd=tmp_path,
        )
    )
    ckpts[0].rename(tmp_path / "elsewhere.pt")
    line = one_error(
        run_cli("capture", "--like", "train.zarr", "--model", MODEL, "--data", TEST, "--out", "t.zarr", cwd=tmp_path),
        FAILURE,
    )
    assert line.startswith("trackin-ooc capture: error:") and ckpts[0].name in line and "--checkpoint" in line
    assert "checkpoints=[...]" not in line and not (tmp_path / "t.zarr").exists()
    torch.save(torch.load(ckpts[1], weights_only=True), ckpts[0])  # other weights under the old name
    line = one_error(
        run_cli("capture", "--like", "train.zarr", "--model", MODEL, "--data", TEST, "--out", "t.zarr", cwd=tmp_path),
        FAILURE,
    )
    assert "hash" in line and ckpts[0].name in line


def test_debug_counts_only_before_the_command(project):
    after = run_cli("info", "nope.zarr", "--debug", cwd=project)
    line = one_error(after, USAGE)
    assert "--debug is a global option: give it before the command" in line and "trackin-ooc --debug" in line
    before = run_cli("--debug", "info", "nope.zarr", cwd=project)
    assert before.returncode == FAILURE and "Traceback (most recent call last)" in before.stderr
    # A usage error with --debug where click parsed it: the one line, and click's traceback only then.
    usage = run_cli("--debug", "top-k", "--train", "train.zarr", cwd=project)
    assert usage.returncode == USAGE and "Missing option" in usage.stderr.splitlines()[-1]


@pytest.mark.parametrize("option", [["--workers", "2"], ["--device", "cpu"], ["--quiet"]])
def test_global_options_after_the_command_say_where_they_go(project, option):
    line = one_error(run_cli("self-influence", "train.zarr", "--out", "si.csv", *option, cwd=project), USAGE)
    assert f"{option[0]} is a global option: give it before the command" in line
    assert "self-influence" in line and not (project / "si.csv").exists()


def test_mistyped_layer_gets_the_nearest_names(project):
    result = run_cli(
        "capture",
        "--model",
        MODEL,
        "--data",
        TEST,
        "--checkpoint",
        "ckpt/epoch_002.pt",
        "--layers",
        "conv3,fc",
        "--out",
        "x.zarr",
        cwd=project,
    )
    line = one_error(result, FAILURE)
    assert "no module or parameter named 'conv3'" in line and "did you mean 'conv2', 'conv1'?" in line
    assert "fc.weight" not in line  # a few suggestions, not every name
    line = one_error(
        run_cli(
            "capture",
            "--model",
            MODEL,
            "--data",
            TEST,
            "--checkpoint",
            "ckpt/epoch_002.pt",
            "--layers",
            "fc.wieght",
            "--out",
            "x.zarr",
            cwd=project,
        ),
        FAILURE,
    )
    assert "did you mean 'fc.weight'" in line
    line = one_error(
        run_cli(
            "capture",
            "--model",
            MODEL,
            "--data",
            TEST,
            "--checkpoint",
            "ckpt/epoch_002.pt",
            "--projection-dims",
            "8",
            "--out",
            "x.zarr",
            cwd=project,
        ),
        USAGE,
    )
    assert "Did you mean" in line and "--projection-dim" in line


def test_messages_speak_in_options_and_name_the_command(project, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(project / "ckpt" / "epoch_002.pt", weights_only=True)["model_state_dict"], plain)
    line = one_error(
        run_cli(
            "capture",
            "--model",
            MODEL,
            "--data",
            TEST,
            "--checkpoint",
            plain,
            "--out",
            tmp_path / "x.zarr",
            cwd=project,
        ),
        FAILURE,
    )
    assert line.startswith("trackin-ooc capture: error: no learning rate") and "--lr" in line
    assert "learning_rates" not in line
    line = one_error(
        run_cli(
            "capture",
            "--model",
            MODEL,
            "--data",
            TEST,
            "--checkpoint",
            "ckpt/epoch_002.pt",
            "--out",
            "train.zarr",
            cwd=project,
        ),
        FAILURE,
    )
    assert "--overwrite" in line and "overwrite=True" not in line
    line = one_error(
        run_cli("top-k", "--train", "train.zarr", "--test", "test.zarr", "-k", "301", "--out", "x.csv", cwd=project),
        FAILURE,
    )
    assert line.startswith("trackin-ooc top-k: error: -k 301 is larger") and "k=" not in line
    (tmp_path / "folder").mkdir()
    line = one_error(run_cli("info", tmp_path / "folder", cwd=project), FAILURE)
    assert "LocalStore" not in line and "file://" not in line and str(tmp_path / "folder") in line


def test_swapped_train_and_test_are_warned_about(project):
    result = ok(
        run_cli("top-k", "--train", "test.zarr", "--test", "train.zarr", "-k", "2", "--out", "sw.csv", cwd=project)
    )
    assert "warning: --train test.zarr holds 100 examples, fewer than --test train.zarr (300)" in result.stderr
    assert "swapped" in result.stderr
    (project / "sw.csv").unlink()
    quiet = ok(
        run_cli(
            "--quiet",
            "top-k",
            "--train",
            "test.zarr",
            "--test",
            "train.zarr",
            "-k",
            "2",
            "--out",
            "sw.csv",
            cwd=project,
        )
    )
    assert quiet.stderr == ""
    (project / "sw.csv").unlink()
    right = ok(
        run_cli("top-k", "--train", "train.zarr", "--test", "test.zarr", "-k", "2", "--out", "sw.csv", cwd=project)
    )
    assert "swapped" not in right.stderr
    (project / "sw.csv").unlink()


# ---- docs/cli.md's walkthrough on the default install ---------------------------------------------------------
def walkthrough() -> list[str]:
    """The commands of the "A session" block of docs/cli.md, continuation lines joined."""
    text = DOCS.read_text()
    block = text.split("## A session", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


@pytest.fixture()
def without_pyarrow(tmp_path) -> dict[str, str]:
    """An environment whose Python cannot import pyarrow, as after `pip install trackin-ooc` (no extras)."""
    stub = tmp_path / "no_pyarrow" / "pyarrow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    return cli_env(PYTHONPATH=str(stub.parent), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.timeout(400)
def test_the_walkthrough_runs_as_written(tmp_path, without_pyarrow):
    commands = walkthrough()
    assert commands[0].startswith("trackin-ooc demo") and any("capture --like" in c for c in commands)
    script = "set -e\n" + "\n".join(commands) + "\n"
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=without_pyarrow, capture_output=True, text=True, timeout=380
    )
    assert result.returncode == 0, f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    for name in ("train.zarr", "test.zarr", "suspects.csv", "top.csv", "influence.zarr", "top.zarr"):
        assert (tmp_path / name).exists(), name
    # The test store from --like combines with the train store: top-k's table has every test digit.
    import pandas as pd

    top = pd.read_csv(tmp_path / "top.csv")
    assert top["test"].nunique() == to.open_store(tmp_path / "test.zarr").n_examples and top["rank"].min() == 1
    np.testing.assert_array_equal(
        to.open_store(tmp_path / "test.zarr").learning_rates, to.open_store(tmp_path / "train.zarr").learning_rates
    )
    # .parquet without pyarrow: one line naming the extra.
    failed = run_cli(
        "top-k",
        "--train",
        "train.zarr",
        "--test",
        "test.zarr",
        "--out",
        "top.parquet",
        cwd=tmp_path,
        env=without_pyarrow,
    )
    line = one_error(failed, FAILURE)
    assert "pyarrow" in line and "trackin-ooc[io]" in line
    shutil.rmtree(tmp_path, ignore_errors=True)
