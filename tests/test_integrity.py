"""Checksums: a damaged chunk raises an error naming the array and chunk, never numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import trackin_ooc as to


def _flip_byte(path: Path, offset: int = 17) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(0)
    train = to.from_arrays(
        tmp_path / "train.zarr",
        rng.standard_normal((2, 96, 8)).astype(np.float32),
        [0.5, 0.25],
        chunk_rows=32,
        losses=rng.random((2, 96)).astype(np.float32),
    )
    test = to.from_arrays(
        tmp_path / "test.zarr", rng.standard_normal((2, 10, 8)).astype(np.float32), [0.5, 0.25], chunk_rows=32
    )
    return test, train


def test_intact_store_verifies_clean(stores):
    _, train = stores
    assert train.verify() == []


@pytest.mark.parametrize("chunk", [(0, 0, 0), (1, 2, 0)])
def test_flipped_byte_is_caught_by_every_reader(stores, chunk):
    test, train = stores
    before = to.self_influence(train).values
    _flip_byte(Path(train.path, "grads", "c", *map(str, chunk)))
    name = "/".join(map(str, chunk))
    bad = to.open_store(train.path).verify()
    assert [str(b) for b in bad] == [f"array 'grads' chunk {name}"]
    for run in (
        lambda: to.self_influence(train.path),
        lambda: to.top_k(test, train.path, k=3),
        lambda: to.influence(test, train.path).values,
    ):
        with pytest.raises(to.CorruptChunkError, match=f"'grads' chunk {name}") as e:
            run()
        assert "\n" not in str(e.value)
    # Rows outside the damaged chunk still read, and equal what they were.
    other = (32, 64) if chunk[1] == 0 else (0, 32)
    intact = to.open_store(train.path).read_grads(*other)
    weights = train.learning_rates[:, None]
    np.testing.assert_allclose((weights * (intact**2).sum(axis=2)).sum(axis=0), before[other[0] : other[1]], rtol=1e-5)


def test_damaged_loss_chunk_names_the_loss_array(stores):
    _, train = stores
    _flip_byte(Path(train.path, "loss", "c", "1", "1"))
    with pytest.raises(to.CorruptChunkError, match="'loss' chunk 1/1"):
        to.open_store(train.path).read_losses()
    assert [str(b) for b in to.open_store(train.path).verify()] == ["array 'loss' chunk 1/1"]


def test_info_verify_reports_bad_chunks(stores):
    import json
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("trackin-ooc")
    _, train = stores
    ok = subprocess.run([str(exe), "info", "--verify", train.path], capture_output=True, text=True)
    assert ok.returncode == 0 and "verify: all chunks intact" in ok.stdout, ok.stderr
    _flip_byte(Path(train.path, "grads", "c", "1", "1", "0"))
    bad = subprocess.run([str(exe), "info", "--verify", train.path], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "array 'grads' chunk 1/1/0" in bad.stdout
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    as_json = subprocess.run([str(exe), "info", "--verify", "--json", train.path], capture_output=True, text=True)
    assert json.loads(as_json.stdout)["verified"]["bad_chunks"] == ["array 'grads' chunk 1/1/0"]
