"""``trackin-ooc demo`` (what ``make demo`` runs): real training on digits with flipped labels, end to end."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from trackin_ooc.demo.pipeline import DemoOutputError, recall_at, recall_curve, run_demo

from .test_cli import ok, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "trackin-demo"
    result = ok(run_cli("demo", "--out", out, cwd=tmp_path, timeout=600))

    for name in ("mislabels.png", "proponents.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000, name
    si = pd.read_csv(out / "self_influence.csv")
    assert len(si) == 1500 and si.flipped.sum() == 150
    assert list(si.columns[:4]) == ["rank", "example", "label", "self_influence"]
    assert list(si["rank"]) == list(range(1, 1501)) and (np.diff(si.self_influence) <= 0).all()
    assert (si.label != si.true_label).sum() == 150, "flipped rows carry their wrong label and the true one"
    recall_20 = si.flipped.head(300).sum() / 150
    assert recall_20 >= 0.8, f"TracIn found only {recall_20:.0%} of the flipped labels in the top 20 %"

    top = pd.read_csv(out / "top_k.csv")
    assert len(top) == 297 * 5 and set(top["rank"]) == {1, 2, 3, 4, 5}
    assert (top.proponent_label == top.test_label).mean() > 0.8, "proponents mostly share the test label"

    # The printed summary: recall at 10 % and 20 % per method, agreeing with the table.
    text = result.stdout
    row = re.search(r"TracIn self-influence\s+([\d.]+)%\s+([\d.]+)%", text)
    assert row, text
    assert float(row.group(2)) == pytest.approx(100 * recall_20, abs=0.06)
    assert float(row.group(1)) == pytest.approx(100 * si.flipped.head(150).sum() / 150, abs=0.06)
    for method in ("last-checkpoint loss", "random"):
        assert re.search(rf"{method}\s+[\d.]+%\s+[\d.]+%", text), method
    assert re.search(r"random\s+([\d.]+)%\s+([\d.]+)%", text).group(2) != row.group(2)
    assert "wrote mislabels.png, proponents.png, self_influence.csv, top_k.csv" in text

    # The memorising run: an AdamW MLP that fits most flipped labels. Its loss misses them; self-influence
    # does not, and the summary says why.
    memo = re.search(r"until it fits (\d+)% of the flipped labels(.*?)why:", text, re.S)
    assert memo, text
    assert int(memo.group(1)) >= 50, "the second model must have memorised most flipped labels"
    si_10 = float(re.search(r"TracIn self-influence\s+([\d.]+)%", memo.group(2)).group(1))
    loss_10 = float(re.search(r"last-checkpoint loss\s+([\d.]+)%", memo.group(2)).group(1))
    assert si_10 >= loss_10 + 15, f"self-influence {si_10} % vs loss {loss_10} % at 10 % checked"
    assert "no longer singles it out" in text and "(the CNN fits" in text
    assert "train:" in result.stderr and "capture:" in result.stderr, "one status line per step"


def test_demo_output_folder_rules(tmp_path):
    # A folder with someone else's files is refused, and left alone.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = run_cli("demo", "--out", foreign, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not empty and was not written by the demo" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    # A previous demo's folder is reused (make demo twice), here with a tiny configuration.
    small = dict(
        n_train=150, epochs=2, checkpoint_every=2, projection_dim=16, k=2, n_show=2, progress=False, memorised_epochs=2
    )
    first = run_demo(tmp_path / "d", **small)
    stamp = (tmp_path / "d" / "top_k.csv").stat().st_mtime_ns
    second = run_demo(tmp_path / "d", **small)
    assert (tmp_path / "d" / "top_k.csv").stat().st_mtime_ns > stamp
    assert second.recall == first.recall and second.n_flipped == 15
    assert "TracIn self-influence" in second.summary() and second.memorised is not None
    with pytest.raises(DemoOutputError):
        run_demo(foreign, **small)
    run_demo(foreign, overwrite=True, **small)
    assert (foreign / "notes.txt").read_text() == "keep me" and (foreign / "mislabels.png").exists()


def test_recall_metrics():
    flipped = np.array([True, False, True, False, False])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert recall_at(scores, flipped, 0.2) == 0.5 and recall_at(scores, flipped, 0.6) == 1.0
    checked, found = recall_curve(scores, flipped)
    np.testing.assert_allclose(checked, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(found, [0, 0.5, 0.5, 1.0, 1.0, 1.0])
