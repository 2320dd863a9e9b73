"""The installed ``trackin-ooc`` executable, run in subprocesses on real stores of a CNN trained on digits.

Every command, every output format, ``--help`` for each, the global options (progress, quiet, device,
memory limit, local cluster, scheduler address and file), and that what the CLI writes equals what
the library computes in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

import trackin_ooc as to
from trackin_ooc.demo import digits_cnn, train_with_checkpoints
from trackin_ooc.demo.examples import digits_test_small, digits_train_small

EXE = Path(sys.executable).parent / "trackin-ooc"
EX = "trackin_ooc.demo.examples"
K = 4


def cli_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TRACKIN_OOC_QUIET": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the installed executable; never raises on a non-zero exit."""
    return subprocess.run(
        [str(EXE), *map(str, args)], cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


# ---- fixtures: checkpoints, user code, and stores captured by the CLI itself ---------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A working folder: SGD checkpoints of the digits CNN, plain state dicts, and a user code file."""
    root = tmp_path_factory.mktemp("cli")
    with _one_thread():
        model = digits_cnn(seed=0)
        ckpts = train_with_checkpoints(
            model, digits_train_small(), root / "ckpt", epochs=6, lr=0.1, checkpoint_every=3, seed=0
        )
    assert [p.name for p in ckpts] == ["epoch_003.pt", "epoch_006.pt"]
    for p in ckpts:  # the same weights without a learning rate: needs --lr
        torch.save(torch.load(p, weights_only=True)["model_state_dict"], root / f"plain_{p.name}")
    (root / "usercode.py").write_text(
        textwrap.dedent("""
        from trackin_ooc.demo.examples import digits_cnn_model, digits_test_small

        def model():
            return digits_cnn_model()

        def test_data():
            return digits_test_small()
    """)
    )
    return root


class _one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


CKPTS = ["--checkpoint", "ckpt/epoch_003.pt", "--checkpoint", "ckpt/epoch_006.pt"]


@pytest.fixture(scope="module")
def stores(project):
    """train.zarr (module form MOD:FN) and test.zarr (file form path.py:FN), both via `capture`."""
    train = ok(
        run_cli(
            "capture",
            "--model",
            f"{EX}:digits_cnn_model",
            "--data",
            f"{EX}:digits_train_small",
            *CKPTS,
            "--projection-dim",
            "64",
            "--seed",
            "7",
            "--out",
            "train.zarr",
            cwd=project,
        )
    )
    test = ok(
        run_cli(
            "capture",
            "--model",
            "usercode.py:model",
            "--data",
            "./usercode.py:test_data",
            *CKPTS,
            "--projection-dim",
            "64",
            "--seed",
            "7",
            "--out",
            "test.zarr",
            cwd=project,
        )
    )
    for result, n in ((train, 300), (test, 100)):
        line = result.stdout.strip()
        assert "\n" not in line, "one summary line"
        assert line.startswith(f"captured {n} examples × 2 checkpoints") and "examples/s" in line
        assert "on disk" in line and " s (" in line
    return to.open_store(project / "train.zarr"), to.open_store(project / "test.zarr")


# ---- help and version ------------------------------------------------------------------------------
HELP = {
    (): [
        "capture",
        "self-influence",
        "influence",
        "top-k",
        "info",
        "demo",
        "--scheduler-address",
        "--scheduler-file",
        "--workers",
        "--memory-limit",
        "--device",
        "--quiet",
        "--debug",
    ],
    ("capture",): [
        "--model",
        "MOD:FN",
        "--data",
        "--checkpoint",
        "--lr",
        "--out",
        "--layers",
        "--projection-dim",
        "--projection",
        "gaussian|rademacher|factored",
        "--seed",
        "--batch-size",
        "--dtype",
        "float32|float16|bfloat16",
        "--overwrite",
    ],
    ("self-influence",): ["STORE", "--out", ".csv, .parquet or .zarr"],
    ("influence",): ["--train", "--test", "--out", "OUT.zarr", "--normalize"],
    ("top-k",): ["--train", "--test", "-k", "--out", ".csv, .parquet or .zarr"],
    ("info",): ["STORE", "--json"],
    ("demo",): ["--out", "DIR", "./trackin-demo", "mislabels.png", "proponents.png"],
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "trackin-ooc")
def test_help(command, tmp_path):
    result = ok(run_cli(*command, "--help", cwd=tmp_path))
    assert result.stdout.startswith(f"Usage: trackin-ooc {' '.join(command)}".rstrip())
    for word in HELP[command]:
        assert word in result.stdout, f"{word!r} missing from the help of {command}"
    assert result.stderr == ""


def test_version(tmp_path):
    result = ok(run_cli("--version", cwd=tmp_path))
    assert result.stdout.strip() == f"trackin-ooc, version {to.__version__}"


# ---- capture and info --------------------------------------------------------------------------------
def test_capture_matches_the_library(stores, project):
    """The CLI passes every option through: the same capture in-process gives the same store."""
    train, test = stores
    assert train.complete and test.complete
    with _one_thread():
        ref = to.capture(
            digits_cnn(seed=0),
            [project / "ckpt/epoch_003.pt", project / "ckpt/epoch_006.pt"],
            digits_train_small(),
            project / "ref.zarr",
            projection_dim=64,
            seed=7,
            progress=False,
        )
    assert train.fingerprint == ref.fingerprint
    assert train.checkpoint_hashes == ref.checkpoint_hashes
    np.testing.assert_allclose(train.read_grads(), ref.read_grads(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(train.labels(), digits_train_small().dataset.tensors[1][:300].numpy())
    np.testing.assert_array_equal(test.labels(), digits_test_small().dataset.tensors[1][:100].numpy())


def test_info_json(stores, project):
    info = json.loads(ok(run_cli("info", "train.zarr", "--json", cwd=project)).stdout)
    assert info["kind"] == "gradient store"
    assert info["complete"] is True
    assert (info["n_examples"], info["n_checkpoints"], info["feature_dim"]) == (300, 2, 64)
    assert [c["name"] for c in info["checkpoints"]] == ["epoch_003.pt", "epoch_006.pt"]
    assert [c["learning_rate"] for c in info["checkpoints"]] == [0.1, 0.1]
    assert info["projection"]["kind"] == "gaussian" and info["projection"]["dim"] == 64
    assert info["projection"]["seed"] == 7
    assert info["dtype"] == "float32" and info["labels"] is True and info["n_classes"] == 10
    du = sum(f.stat().st_size for f in (project / "train.zarr").rglob("*") if f.is_file())
    assert 0.5 * du <= info["size_on_disk"] <= 2 * du
    assert info["size_on_disk"] >= info["gradient_bytes"] == 2 * 300 * 64 * 4


def test_info_text(stores, project):
    text = ok(run_cli("info", "test.zarr", cwd=project)).stdout
    lines = text.splitlines()
    assert lines[0].startswith("gradient store") and lines[0].endswith("test.zarr")
    assert any(line.split() == ["examples", "100"] for line in lines)
    assert any("epoch_003.pt" in line and "lr 0.1" in line for line in lines)
    assert any("projection" in line and "gaussian projection to 64 dims (seed 7" in line for line in lines)
    assert any(line.split()[:2] == ["dtype", "float32"] for line in lines)
    assert any(line.strip().startswith("size on disk") and "KiB" in line for line in lines)
    assert lines[-1].split() == ["state", "complete"]


@pytest.mark.parametrize("projection", ["exact", "factored"])
def test_capture_options(projection, project, stores):
    """--lr for checkpoints without one, --layers, --dtype, --batch-size, each --projection kind."""
    out = f"opt_{projection}.zarr"
    args = [
        "capture",
        "--model",
        f"{EX}:digits_cnn_model",
        "--data",
        f"{EX}:digits_test_small",
        "--checkpoint",
        "plain_epoch_003.pt",
        "--checkpoint",
        "plain_epoch_006.pt",
        "--lr",
        "0.05",
        "--lr",
        "0.02",
        "--layers",
        "conv2,fc",
        "--dtype",
        "float16",
        "--batch-size",
        "33",
        "--out",
        out,
    ]
    if projection != "exact":
        args += ["--projection", projection, "--projection-dim", "48"]
    ok(run_cli(*args, cwd=project))
    st = to.open_store(project / out)
    assert st.complete and st.n_examples == 100
    assert list(st.learning_rates) == [0.05, 0.02]
    assert st.dtype == "float16"
    assert {name for name, _ in st.spec.layers} == {"conv2.weight", "conv2.bias", "fc.weight", "fc.bias"}
    assert st.spec.kind == projection
    n_params = 8 * 8 * 9 + 8 + 128 * 10 + 10
    if projection == "exact":
        assert st.feature_dim == n_params
    else:
        assert st.spec.seed == 0 and 0 < st.feature_dim <= 48
    assert np.isfinite(st.read_grads()).all() and np.abs(st.read_grads()).sum() > 0
    assert np.isfinite(to.self_influence(st).values).all()


# ---- scores in every format ------------------------------------------------------------------------
def read_back(path: Path):
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return xr.open_zarr(path, consolidated=True).load()


@pytest.mark.parametrize("fmt", [".csv", ".parquet", ".zarr"])
def test_self_influence(fmt, stores, project):
    train, _ = stores
    out = project / f"si{fmt}"
    # Progress bars: not on a pipe unless asked; --quiet removes the summary line too.
    env = cli_env(TRACKIN_OOC_QUIET=None)
    quiet = ["--quiet"] if fmt == ".parquet" else []
    result = ok(run_cli(*quiet, "self-influence", "train.zarr", "--out", out.name, cwd=project, env=env))
    assert result.stderr == ""
    if quiet:
        assert result.stdout == ""
    else:
        assert result.stdout.count("\n") == 1 and f"to {out}" in result.stdout and "examples/s" in result.stdout
    expected = to.self_influence(train)
    got = read_back(out)
    if fmt == ".zarr":
        np.testing.assert_allclose(got.self_influence.values, expected.values, rtol=1e-6)
        np.testing.assert_array_equal(got.label.values, train.labels())
        assert got["rank"].values[int(np.argmax(expected.values))] == 1
        assert sorted(got["rank"].values) == list(range(1, 301))
        return
    assert list(got.columns) == ["rank", "example", "label", "self_influence"]
    assert list(got["rank"]) == list(range(1, 301))
    assert (np.diff(got.self_influence) <= 0).all(), "rows sorted by decreasing self-influence"
    np.testing.assert_allclose(got.self_influence, expected.values[got.example], rtol=1e-6)
    np.testing.assert_array_equal(got.label, train.labels()[got.example])


@pytest.mark.parametrize("fmt", [".csv", ".parquet", ".zarr"])
def test_top_k(fmt, stores, project):
    train, test = stores
    out = project / f"top{fmt}"
    device = ["--device", "cpu"] if fmt == ".parquet" else []  # --device reaches the engine (cpu: NumPy)
    result = ok(
        run_cli(
            *device,
            "top-k",
            "--train",
            "train.zarr",
            "--test",
            "test.zarr",
            "-k",
            K,
            "--raw",
            "--out",
            out.name,
            cwd=project,
        )
    )
    assert result.stdout.startswith(f"wrote the top {K} proponents and opponents of 100 test examples")
    expected = to.top_k(test, train, k=K)
    got = read_back(out)
    if fmt == ".zarr":
        assert got.sizes == {"test": 100, "rank": K}
        assert list(got["rank"].values) == list(range(1, K + 1))
        for side in ("proponent", "opponent"):
            np.testing.assert_array_equal(got[side].values, expected[f"{side}_index"].values)
            np.testing.assert_allclose(got[f"{side}_score"].values, expected[f"{side}_score"].values, rtol=1e-6)
            np.testing.assert_array_equal(got[f"{side}_label"].values, train.labels()[got[side].values])
        np.testing.assert_array_equal(got.test_label.values, test.labels())
        return
    assert list(got.columns) == [
        "test",
        "test_label",
        "rank",
        "proponent",
        "proponent_label",
        "proponent_score",
        "opponent",
        "opponent_label",
        "opponent_score",
    ]
    assert len(got) == 100 * K
    got = got.sort_values(["test", "rank"])
    for side in ("proponent", "opponent"):
        np.testing.assert_array_equal(got[side].values.reshape(100, K), expected[f"{side}_index"].values)
        np.testing.assert_allclose(
            got[f"{side}_score"].values.reshape(100, K), expected[f"{side}_score"].values, rtol=1e-6
        )
        np.testing.assert_array_equal(got[f"{side}_label"], train.labels()[got[side]])
    np.testing.assert_array_equal(got.test_label, test.labels()[got.test])
    assert (got.groupby("test").proponent_score.apply(lambda s: (np.diff(s) <= 0).all())).all()


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_influence(normalize, stores, project):
    train, test = stores
    out = project / f"influence_{normalize}.zarr"
    # With --normalize, also a tiny --memory-limit: the engine then writes the matrix in small blocks.
    flag = ["--normalize"] if normalize else []
    budget = ["--memory-limit", "200KB"] if normalize else []
    result = ok(
        run_cli(
            *budget, "influence", "--train", "train.zarr", "--test", "test.zarr", "--out", out.name, *flag, cwd=project
        )
    )
    assert result.stdout.startswith("wrote the 100 × 300 influence matrix") and "pairs/s" in result.stdout
    got = xr.open_zarr(out)["influence"]
    assert got.dims == ("test", "train") and got.shape == (100, 300)
    expected = to.influence(test, train, normalize=normalize).compute()
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-5, atol=1e-6)
    if normalize:
        assert np.abs(got.values).max() <= 2 * 0.1 + 1e-5  # Σ_c η_c cos ≤ Σ_c η_c
        plan = to.plan_for(test, train, memory_limit="200KB")
        assert got.encoding["chunks"] == (plan.test_rows, plan.train_rows)
        assert plan.train_rows < 300 or plan.test_rows < 100
    else:
        default = to.plan_for(test, train)
        assert got.encoding["chunks"] == (default.test_rows, default.train_rows)
    if not normalize:
        info = json.loads(ok(run_cli("info", out.name, "--json", cwd=project)).stdout)
        assert info["kind"] == "influence matrix" and info["complete"] is True
        assert (info["n_test"], info["n_train"], info["normalize"]) == (100, 300, False)


def test_overwrite(stores, project):
    (project / "replace.csv").write_text("an older table\n")
    ok(run_cli("self-influence", "train.zarr", "--out", "replace.csv", "--overwrite", cwd=project))
    assert len(pd.read_csv(project / "replace.csv")) == 300
    # A store too, replaced in place (and with a progress bar when asked for one).
    with _one_thread():
        to.capture(
            digits_cnn(),
            [project / "ckpt/epoch_003.pt"],
            digits_test_small(),
            project / "again.zarr",
            projection_dim=16,
            seed=1,
            progress=False,
        )
    result = ok(
        run_cli(
            "--progress",
            "capture",
            "--model",
            f"{EX}:digits_cnn_model",
            "--data",
            f"{EX}:digits_test_small",
            *CKPTS,
            "--projection-dim",
            "16",
            "--seed",
            "2",
            "--out",
            "again.zarr",
            "--overwrite",
            cwd=project,
            env=cli_env(TRACKIN_OOC_QUIET=None),
        )
    )
    # The bar over the 100 examples (a capture this fast may end before tqdm draws more than its start).
    assert "capture:" in result.stderr and "/100 examples [" in result.stderr, "the capture progress bar"
    # The size announced first names the store asked for, not the staging folder it is captured in.
    assert (
        "capture: about 12.5 KiB of gradients to write into again.zarr (100 examples × 2 checkpoints × 16 "
        "features, float32)" in result.stderr
    )
    again = to.open_store(project / "again.zarr")
    assert again.spec.seed == 2 and again.n_checkpoints == 2 and again.complete
    assert sorted(p.name for p in project.iterdir() if "again" in p.name) == ["again.zarr"], "no leftovers"


# ---- progress, quiet, device ----------------------------------------------------------------------
def test_progress_bar_when_asked(stores, project):
    forced = ok(
        run_cli(
            "--progress",
            "self-influence",
            "train.zarr",
            "--out",
            "p1.csv",
            cwd=project,
            env=cli_env(TRACKIN_OOC_QUIET=None),
        )
    )
    assert "self-influence:" in forced.stderr and "/2 tasks [" in forced.stderr and "%|" in forced.stderr
    assert forced.stdout.startswith("wrote self-influence of 300 examples")


# ---- Dask clusters ---------------------------------------------------------------------------------
def test_local_cluster_workers(stores, project):
    """--workers N: a LocalCluster of worker processes on 127.0.0.1 computes the same scores."""
    train, test = stores
    result = ok(
        run_cli(
            "--workers",
            "1",
            "--memory-limit",
            "2GiB",
            "top-k",
            "--train",
            "train.zarr",
            "--test",
            "test.zarr",
            "-k",
            K,
            "--raw",
            "--out",
            "cluster.zarr",
            cwd=project,
        )
    )
    assert "dask: 1 worker (a local cluster on 127.0.0.1)" in result.stderr
    got = xr.open_zarr(project / "cluster.zarr").load()
    expected = to.top_k(test, train, k=K)
    np.testing.assert_array_equal(got.proponent.values, expected.proponent_index.values)
    np.testing.assert_array_equal(got.opponent.values, expected.opponent_index.values)


def test_scheduler_address_and_file(stores, project):
    """--scheduler-address and --scheduler-file connect to a running scheduler (here, in this process)."""
    from distributed import Client, LocalCluster

    train, _ = stores
    expected = to.self_influence(train).values
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            protocol="tcp://",
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.write_scheduler_file(str(project / "scheduler.json"))
        before = sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())
        a = ok(
            run_cli(
                "--scheduler-address",
                cluster.scheduler_address,
                "self-influence",
                "train.zarr",
                "--out",
                "sched_a.csv",
                cwd=project,
            )
        )
        b = ok(
            run_cli(
                "--scheduler-file",
                "scheduler.json",
                "self-influence",
                "train.zarr",
                "--out",
                "sched_b.csv",
                cwd=project,
            )
        )
        after = sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())
    assert after - before >= 2, "the tasks ran on the cluster's worker"
    assert f"scheduler at {cluster.scheduler_address}" in a.stderr and "scheduler from scheduler.json" in b.stderr
    for name in ("sched_a.csv", "sched_b.csv"):
        table = pd.read_csv(project / name).sort_values("example")
        np.testing.assert_allclose(table.self_influence, expected, rtol=1e-6)
