"""docs/models.md, "Bringing a Hugging Face model": its code blocks run as written, in a fresh process, and
leave the stores they say they write."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import trackin_ooc as to
from trackin_ooc.capturing.projection.factored import plan_from_spec

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
SECTION = "## Bringing a Hugging Face model"


def section_code(heading: str) -> str:
    """The ```python blocks of one ``## `` section of docs/models.md, joined in order."""
    text = DOC.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    body = text[start:] if end < 0 else text[start:end]
    blocks = re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)
    assert blocks, f"{heading!r} in docs/models.md has no python block"
    return "\n".join(blocks)


def test_hugging_face_example_runs(tmp_path):
    code = section_code(SECTION)
    assert "import trackin_ooc" in code and "model(**batch)" in code
    env = {**os.environ, "TRACKIN_OOC_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"docs/models.md example failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "proponents of the first test example" in proc.stdout and "GPT-2 store: 64 examples" in proc.stdout

    train, test = to.open_store(tmp_path / "bert_train.zarr"), to.open_store(tmp_path / "bert_test.zarr")
    assert train.complete and test.complete and train.n_checkpoints == 2
    assert (train.n_examples, test.n_examples) == (200, 40)
    assert train.fingerprint == test.fingerprint and train.feature_dim == 2048
    assert set(train.attrs["per_example_methods"].values()) <= {"factored", "hooks"}

    gpt2 = to.open_store(tmp_path / "gpt2.zarr")
    assert gpt2.complete and gpt2.feature_dim == 1024
    kinds = {x.kind for x in plan_from_spec(gpt2.spec)}
    assert {"hf_conv1d", "embedding", "dense"} <= kinds  # Conv1D factored; the tied wte in the dense group
