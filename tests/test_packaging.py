"""Packaging: environment.yml matches pyproject.toml, the README example runs, the API is exposed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import trackin_ooc as to

ROOT = Path(__file__).resolve().parent.parent
CONDA_TO_PIP = {"pytorch": "torch"}  # conda-forge names that differ from the PyPI ones
EXTRAS_IN_ENV = ("demo", "io")  # installed in the conda environment; gpu/test are not
NOT_PACKAGES = {"python", "pip"}


def normalize(name: str) -> str:
    """PEP 503 normalized name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(req: str) -> tuple[str, str]:
    """'dask[array]>=2024.8' -> ('dask', '>=2024.8'); also conda's 'pytorch>=2.2'."""
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*?)\s*(;.*)?", req)
    assert m, f"cannot parse requirement {req!r}"
    name = normalize(m.group(1))
    return CONDA_TO_PIP.get(name, name), m.group(3).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS_IN_ENV:
        reqs += project["optional-dependencies"][extra]
    return dict(split_requirement(r) for r in reqs)


def environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    found = dict(split_requirement(d) for d in conda)
    return {name: spec for name, spec in found.items() if name not in NOT_PACKAGES}


def test_environment_yml_matches_pyproject():
    pip, conda = pyproject_requirements(), environment_requirements()
    assert "torch" in pip and "zarr" in pip and "scikit-learn" in pip
    assert set(conda) == set(pip), (
        f"only in environment.yml: {sorted(set(conda) - set(pip))}; "
        f"only in pyproject.toml: {sorted(set(pip) - set(conda))}"
    )
    # Same version bounds, so conda users get what pip users get.
    differ = {n: (conda[n], pip[n]) for n in pip if conda[n] != pip[n]}
    assert not differ, f"version bounds differ (environment.yml, pyproject.toml): {differ}"


def test_environment_yml_installs_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert any(any(line.replace(" ", "") in ("-e.", ".") for line in sec) for sec in pip_sections)
    assert any(isinstance(d, str) and d.startswith("python") for d in env["dependencies"])


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert m, "README.md has no ```python block"
    return m.group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    code = readme_python_example()
    assert "import trackin_ooc" in code
    env = {**os.environ, "TRACKIN_OOC_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"README example failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    # It wrote where it said, relative to the working directory.
    for name in ("train.zarr", "test.zarr"):
        assert to.open_store(tmp_path / name).complete
    assert proc.stdout.strip(), "the example printed nothing"


@pytest.mark.parametrize("name", ["capture", "from_arrays", "open_store", "self_influence", "influence", "top_k"])
def test_public_api(name):
    obj = getattr(to, name)
    assert callable(obj)
    assert name in to.__all__
    assert obj.__doc__, f"trackin_ooc.{name} has no docstring"


def test_errors_are_exposed():
    for name in (
        "TrackinError",
        "StoreExistsError",
        "IncompleteStoreError",
        "IncompatibleStoresError",
        "CheckpointError",
        "CheckpointNotFoundError",
        "CaptureError",
        "EmptyDatasetError",
    ):
        err = getattr(to, name)
        assert issubclass(err, to.TrackinError), name
    assert isinstance(to.__version__, str) and to.__version__
