"""Outputs never replace inputs, and ``--overwrite`` replaces only an earlier output of the same kind.

A mistyped ``--out`` used to destroy a gradient store; each row of that table is a test here, run with
the real executable on stores captured from a digits MLP, and each checks the one-line refusal and that
every store involved still passes ``trackin-ooc info --verify`` with its example count. Then: a
legitimate overwrite for every writer, capture refusing to replace other kinds of output, an
interrupted ``influence --overwrite`` that the same command resumes, and unknown projection kinds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import trackin_ooc as to
from trackin_ooc import tables
from trackin_ooc.demo import train_with_checkpoints
from trackin_ooc.demo.examples import digits_mlp_model, digits_test_small, digits_train_small
from trackin_ooc.engine import resources
from trackin_ooc.engine.planning import worker_bytes
from trackin_ooc.store import guard, replace, store_kind
from trackin_ooc.store.guard import OutputKindError, OutputOverlapsInputError
from trackin_ooc.store.influence_store import open_influence

from .test_cli import EX, EXE, cli_env, ok, run_cli
from .test_cli_errors import FAILURE, USAGE, check_failure, snapshot

N_TRAIN, N_TEST, N_OTHER = 300, 100, 40
CAPTURE = [
    "capture",
    "--model",
    f"{EX}:digits_mlp_model",
    "--data",
    f"{EX}:digits_test_small",
    "--checkpoint",
    "ckpt/epoch_001.pt",
    "--checkpoint",
    "ckpt/epoch_002.pt",
    "--projection-dim",
    "16",
]
SCORES = ["--train", "train.zarr", "--test", "test.zarr"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Stores captured once (train, test), an unrelated store, an influence output, a .zarr table,
    a folder of someone else's files; links and a sub-folder for path variants."""
    root = tmp_path_factory.mktemp("guard").resolve()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = digits_mlp_model()
        ckpts = train_with_checkpoints(
            model, digits_train_small(), root / "ckpt", epochs=2, lr=0.1, checkpoint_every=1, seed=0
        )
        kw = dict(projection_dim=16, progress=False, device="cpu")
        train = to.capture(model, ckpts, digits_train_small(), root / "train.zarr", **kw)
        test = to.capture(model, ckpts, digits_test_small(), root / "test.zarr", **kw)
    finally:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    to.from_arrays(root / "other.zarr", rng.standard_normal((2, N_OTHER, 16)).astype(np.float32), [0.1, 0.1])
    to.influence(test, train, out=root / "inf.zarr", progress=False)
    tables.write_self_influence(to.self_influence(train, progress=False), root / "si.zarr")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep me")
    (root / "sub").mkdir()
    (root / "link.zarr").symlink_to(root / "train.zarr")
    assert (train.n_examples, test.n_examples) == (N_TRAIN, N_TEST)
    return root


def verified(root: Path, **expected: int) -> None:
    """``trackin-ooc info STORE --verify --json`` for each store (run side by side): exit 0, every chunk
    intact, complete, and the expected example count."""
    procs = {
        name: subprocess.Popen(
            [str(EXE), "info", name, "--verify", "--json"],
            cwd=root,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in expected
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"info --verify {name}: {err}"
        info = json.loads(out)
        assert info["verified"] == {"bad_chunks": []} and info["complete"] is True
        assert info["n_examples"] == expected[name], name


def stores(**names: int) -> dict[str, int]:
    return {f"{name}.zarr": n for name, n in names.items()}


def leftovers(root: Path) -> list[str]:
    """Hidden siblings a writer would leave if it swapped badly (temporary or staging names)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and ".lock" not in p.name)


# ---- the table, one test per row (and path variants) ------------------------------------
def _in(root: Path, name: str) -> str:
    return str(root / name)


ROWS = {
    "self-influence onto its own store": (
        ["self-influence", "train.zarr", "--out", "train.zarr", "--overwrite"],
        ["output {train.zarr} is the input store {train.zarr}"],
        stores(train=N_TRAIN),
    ),
    "top-k onto the test store": (
        ["top-k", *SCORES, "--out", "test.zarr", "--overwrite"],
        ["output {test.zarr} is the input store {test.zarr}"],
        stores(train=N_TRAIN, test=N_TEST),
    ),
    "influence onto the train store": (
        ["influence", *SCORES, "--out", "train.zarr", "--overwrite"],
        ["output {train.zarr} is the input store {train.zarr}"],
        stores(train=N_TRAIN, test=N_TEST),
    ),
    "self-influence onto an unrelated store": (
        ["self-influence", "train.zarr", "--out", "other.zarr", "--overwrite"],
        [
            "{other.zarr} already exists and is a trackin-ooc gradient store",
            "replaces only an earlier table",
            "rm -r {other.zarr}",
        ],
        stores(train=N_TRAIN, other=N_OTHER),
    ),
    # the same mistake through a link (more variants in-process below)
    "through a symlink": (
        ["self-influence", "train.zarr", "--out", "link.zarr", "--overwrite"],
        ["output {link.zarr} is the input store {train.zarr}", "both resolve to {train.zarr}"],
        {},
    ),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_cli_refuses(row, project):
    args, fragments, involved = ROWS[row]
    names = ("train.zarr", "test.zarr", "other.zarr", "link.zarr")
    for name in names:
        fragments = [f.replace("{" + name + "}", _in(project, name)) for f in fragments]
    before = snapshot(project)
    check_failure(run_cli(*args, cwd=project), FAILURE, *fragments)
    assert snapshot(project) == before, "a refused command changed or created files"
    if involved:
        verified(project, **involved)


VARIANTS = {  # output (relative to the project; "alias" links to it), inputs, message fragment
    "through ..": ("sub/../train.zarr", ["train.zarr", "test.zarr"], "output {train.zarr} is the input store"),
    "inside an input store": (
        "train.zarr/si.csv",
        ["train.zarr"],
        "output {train.zarr}/si.csv is inside the input store {train.zarr}",
    ),
    "through a linked folder": ("alias/train.zarr", ["train.zarr"], "is the input store {train.zarr}"),
    "around an input store": (".", ["train.zarr", "test.zarr"], "output {.} contains the input store"),
}


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_paths_are_resolved(variant, overwrite, project, tmp_path, monkeypatch):
    """What the CLI's table and influence commands check first (``tables.check_output``), in-process."""
    out, inputs, fragment = VARIANTS[variant]
    (tmp_path / "alias").symlink_to(project)
    monkeypatch.chdir(project)
    out = tmp_path / out if out.startswith("alias") else out
    for name in ("train.zarr", "test.zarr", "."):
        fragment = fragment.replace("{" + name + "}", _in(project, name))
    with pytest.raises(OutputOverlapsInputError) as err:
        tables.check_output(out, overwrite=overwrite, allowed=None, kind="table", inputs=inputs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_python_influence_onto_the_train_store(project):
    before = snapshot(project)
    train, test = to.open_store(project / "train.zarr"), to.open_store(project / "test.zarr")
    with pytest.raises(OutputOverlapsInputError) as err:
        to.influence(test, train, out=train.path, overwrite=True)
    message = str(err.value)
    assert "\n" not in message and f"output {train.path} is the input store {train.path}" in message
    assert isinstance(err.value, to.StoreError)
    assert snapshot(project) == before
    verified(project, **stores(train=N_TRAIN, test=N_TEST))


def test_python_outputs_around_inputs(project, tmp_path):
    """An output folder that contains an input store, and fsspec URLs compared after normalisation."""
    train = to.open_store(project / "train.zarr")
    test = to.open_store(project / "test.zarr")
    with pytest.raises(OutputOverlapsInputError, match=f"output {project} contains the input store"):
        to.influence(test, train, out=project, overwrite=True)
    with pytest.raises(OutputOverlapsInputError, match="is the input store memory://b/train.zarr"):
        guard.check_output_location(
            "memory://b/x/../train.zarr/", ["memory://b/train.zarr"], kind="table", overwrite=True
        )
    with pytest.raises(OutputOverlapsInputError, match="is inside the input store"):
        guard.check_output_location("s3://b/train.zarr/t.csv", ["s3://b//train.zarr"], kind="table", overwrite=True)
    guard.check_not_an_input("s3://b/train.zarr", ["gs://b/train.zarr", "memory://b/train.zarr2"])
    guard.check_not_an_input(project / "ckpt" / "store.zarr", [project / "ckpt"], inside_ok=True)
    assert (project / "train.zarr").is_dir()


# ---- capture never replaces another kind of output ----------------------------------------------
@pytest.mark.parametrize(
    "target, fragment",
    [
        ("inf.zarr", "is a trackin-ooc influence output"),
        ("mine", "is a folder that no trackin-ooc writer made"),
    ],
)
def test_capture_overwrite_refuses_other_kinds(project, target, fragment):
    before = snapshot(project)
    result = run_cli(*CAPTURE, "--out", target, "--overwrite", cwd=project)
    check_failure(
        result,
        FAILURE,
        f"{project / target} already exists and {fragment}",
        "replaces only an earlier gradient store",
        f"rm -r {project / target}",
    )
    assert snapshot(project) == before
    assert (project / "mine" / "notes.txt").read_text() == "keep me"
    assert store_kind(project / "inf.zarr") == "influence"


def test_python_capture_refuses_before_any_work(project):
    model = digits_mlp_model()
    ckpts = [project / "ckpt" / "epoch_001.pt", project / "ckpt" / "epoch_002.pt"]
    before = snapshot(project)
    for target, kind in (("inf.zarr", "influence output"), ("si.zarr", "table"), ("mine", "")):
        with pytest.raises(OutputKindError, match=f"already exists and is a (trackin-ooc {kind}|folder)"):
            to.capture(model, ckpts, digits_test_small(), project / target, overwrite=True, device="cpu")
        with pytest.raises(OutputKindError, match="replaces only an earlier gradient store"):  # nor without
            to.capture(model, ckpts, digits_test_small(), project / target, device="cpu")
    with pytest.raises(OutputOverlapsInputError, match=f"output {ckpts[0]} is the checkpoint {ckpts[0]}"):
        to.capture(model, ckpts, digits_test_small(), ckpts[0], overwrite=True, device="cpu")
    with pytest.raises(OutputOverlapsInputError, match=f"output {project / 'ckpt'} contains the checkpoint"):
        to.capture(model, ckpts, digits_test_small(), project / "ckpt", overwrite=True, device="cpu")
    assert snapshot(project) == before


# ---- a legitimate overwrite still works, for every writer ---------------------------------------
# The earlier output is written in-process (quicker), the replacement by the executable.
def test_self_influence_replaces_its_earlier_table(project):
    train = to.open_store(project / "train.zarr")
    tables.write_self_influence(to.self_influence(train, progress=False), project / "si_again.zarr")
    ok(run_cli("self-influence", "train.zarr", "--out", "si_again.zarr", "--exact-norms", "--overwrite", cwd=project))
    got = tables.read(project / "si_again.zarr")
    assert store_kind(project / "si_again.zarr") == "table" and got.attrs["exact_norms"] == 1
    exact = to.self_influence(train, exact_norms=True, progress=False)
    np.testing.assert_allclose(got["self_influence"].values, exact.values, rtol=1e-5)
    assert leftovers(project) == []


def test_top_k_replaces_its_earlier_table(project):
    test, train = to.open_store(project / "test.zarr"), to.open_store(project / "train.zarr")
    tables.write_top_k(to.top_k(test, train, k=2, progress=False), project / "tk_again.csv", test=test, train=train)
    ok(run_cli("top-k", *SCORES, "-k", "3", "--out", "tk_again.csv", "--overwrite", cwd=project))
    got = tables.read(project / "tk_again.csv")
    assert got["rank"].max() == 3 and len(got) == 3 * N_TEST and leftovers(project) == []


def test_influence_replaces_its_earlier_output(project):
    test, train = to.open_store(project / "test.zarr"), to.open_store(project / "train.zarr")
    to.influence(test, train, out=project / "inf_again.zarr", progress=False)
    ok(run_cli("influence", *SCORES, "--out", "inf_again.zarr", "--normalize", "--overwrite", cwd=project))
    got = open_influence(project / "inf_again.zarr")
    assert got.attrs["normalize"] is True and got.attrs["complete"] is True
    np.testing.assert_allclose(got.values, to.influence(test, train, normalize=True).values, rtol=1e-5, atol=1e-6)
    assert leftovers(project) == []
    # an empty folder holds nothing to lose: any writer may use it
    (project / "empty.zarr").mkdir()
    to.influence(test, train, out=project / "empty.zarr", overwrite=True, progress=False)
    assert store_kind(project / "empty.zarr") == "influence"


def test_capture_replaces_its_earlier_store(project):
    ckpts = [project / "ckpt" / "epoch_001.pt", project / "ckpt" / "epoch_002.pt"]
    to.capture(
        digits_mlp_model(),
        ckpts,
        digits_test_small(),
        project / "cap_again.zarr",
        projection_dim=16,
        progress=False,
        device="cpu",
    )
    ok(run_cli(*CAPTURE, "--seed", "3", "--out", "cap_again.zarr", "--overwrite", cwd=project))
    again = to.open_store(project / "cap_again.zarr")
    assert again.spec.seed == 3 and again.complete and again.n_examples == N_TEST
    assert leftovers(project) == []


def test_swap_into_place_keeps_one_of_them(tmp_path, monkeypatch):
    """Folders are exchanged in one rename where the kernel can, else moved aside; files replaced."""
    for can_exchange in (True, False):
        if not can_exchange:
            monkeypatch.setattr(replace, "exchange", lambda a, b: False)
        final, new = tmp_path / f"t{can_exchange}.zarr", tmp_path / f".new{can_exchange}"
        final.mkdir()
        (final / "old").write_text("old")
        new.mkdir()
        (new / "new").write_text("new")
        replace.swap_into_place(str(new), str(final))
        assert [p.name for p in final.iterdir()] == ["new"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tFalse.zarr", "tTrue.zarr"], "nothing left aside"
    file, tmp = tmp_path / "t.csv", tmp_path / ".t.csv.tmp"
    file.write_text("old")
    tmp.write_text("new")
    replace.swap_into_place(str(tmp), str(file))
    assert file.read_text() == "new" and not tmp.exists()


# ---- an interrupted overwrite leaves a resumable output ------------------------------------------
def test_killed_influence_overwrite_is_resumed_by_the_same_command(tmp_path):
    rng = np.random.default_rng(1)
    c, f, n_test, n_train = 2, 16, 60, 4000
    test = to.from_arrays(
        tmp_path / "test.zarr", rng.standard_normal((c, n_test, f)).astype(np.float32), [0.3, 0.1], chunk_rows=16
    )
    train = to.from_arrays(
        tmp_path / "train.zarr", rng.standard_normal((c, n_train, f)).astype(np.float32), [0.3, 0.1], chunk_rows=16
    )
    limit = worker_bytes(16, 16, c * f, 4, resources.detect().threads)  # 16 × 16 blocks: 4 × 250 tasks
    plan = to.plan_for(test, train, memory_limit=limit)
    n_tasks = len(plan.test_blocks(n_test)) * len(plan.train_blocks(n_train))
    assert n_tasks >= 200
    out = tmp_path / "inf.zarr"
    to.influence(test, train, out=out, normalize=True, progress=False)  # the earlier output

    args = [
        str(EXE),
        "--memory-limit",
        str(limit),
        "influence",
        "--train",
        "train.zarr",
        "--test",
        "test.zarr",
        "--out",
        "inf.zarr",
        "--overwrite",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stderr=subprocess.PIPE, text=True)
    done, deadline = 0, time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            group = zarr.open_group(str(out), mode="r")
            if group.attrs["trackin_ooc"]["normalize"] is False:  # the new output is in place
                done = int(group["task_complete"][:].sum())
        except Exception:  # being swapped in, or a flag chunk read mid-write: poll again
            pass
        if done >= n_tasks // 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # Neither lost nor mistaken for finished: the new output, unfinished, of this very job.
    meta = zarr.open_group(str(out), mode="r").attrs["trackin_ooc"]
    assert meta["kind"] == "influence" and meta["normalize"] is False and meta["complete"] is False
    flags = zarr.open_group(str(out), mode="r")["task_complete"][:].astype(bool)
    assert 0 < flags.sum() < flags.size
    # one chunk per task: the chunks of flagged tasks must not be written again
    finished = [out / "influence" / "c" / str(i) / str(j) for i, j in np.argwhere(flags)]
    written = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    result = ok(run_cli(*args[1:], cwd=tmp_path))  # the same command, --overwrite and all
    assert "wrote the 60 × 4,000 influence matrix" in result.stdout
    got = open_influence(out)
    assert got.attrs["complete"] is True and got.attrs["normalize"] is False
    np.testing.assert_allclose(got.values, to.influence(test, train).values, rtol=1e-5, atol=1e-5)
    unchanged = sum(written[p] == (p.stat().st_ino, p.stat().st_mtime_ns) for p in written)
    assert unchanged == len(written), "blocks finished before the kill were computed again"
    assert leftovers(tmp_path) == []


# ---- unknown projection kinds --------------------------------------------------------------------
@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("kind", ["nonsense", "gausian"])
def test_unknown_projection_is_refused(project, tmp_path, kind, dim):
    ckpts = [project / "ckpt" / "epoch_001.pt"]
    with pytest.raises(to.CaptureError) as err:
        to.capture(
            digits_mlp_model(),
            ckpts,
            digits_test_small(),
            tmp_path / "p.zarr",
            projection=kind,
            projection_dim=dim,
            device="cpu",
        )
    message = str(err.value)
    assert "\n" not in message and f"unknown projection {kind!r}" in message
    assert "gaussian, rademacher, factored, factors" in message
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.parametrize("dim", [[], ["--projection-dim", "8"]])
def test_cli_unknown_projection_is_refused(project, dim):
    before = snapshot(project)
    args = [a for a in CAPTURE if a not in ("--projection-dim", "16")]
    line = check_failure(
        run_cli(*args, *dim, "--projection", "nonsense", "--out", "p.zarr", cwd=project),
        USAGE,
        "Invalid value for '--projection'",
        "'nonsense'",
    )
    for known in ("gaussian", "rademacher", "factored"):
        assert known in line
    assert snapshot(project) == before
