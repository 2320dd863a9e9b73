"""The import surface: scoring never loads torch, and the capture rooms import one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import trackin_ooc

CAPTURING = Path(trackin_ooc.__file__).parent / "capturing"
# Each room may import only the rooms after it (docs: trackin_ooc/capturing/__init__.py).
ROOMS = ["job", "projection", "per_example", "checkpoints"]


def _imported_rooms(path: Path) -> set[str]:
    """Rooms of ``capturing`` that a module under ``capturing/<room>/`` imports (relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
            found.add(node.module.split(".")[0])
        if isinstance(node, ast.ImportFrom) and node.level == 2 and not node.module:
            found.update(alias.name for alias in node.names)
    return found & set(ROOMS)


def test_capture_rooms_import_one_way():
    for i, room in enumerate(ROOMS):
        allowed = set(ROOMS[i + 1:])
        files = sorted((CAPTURING / room).glob("*.py"))
        assert files, f"room {room} has no modules"
        for f in files:
            wrong = _imported_rooms(f) - allowed
            assert not wrong, f"{f.relative_to(CAPTURING)} imports {wrong}; {room} may import only {allowed}"


def test_capture_submodules_import_by_name():
    # trackin_ooc.capture is the function; its machinery has a package name of its own.
    import trackin_ooc.capturing.checkpoints.loading as loading

    assert callable(trackin_ooc.capture)
    assert hasattr(loading, "load_checkpoints")


def test_scoring_never_imports_torch(tmp_path):
    """A fresh process scores in-process and on a real LocalCluster worker without loading torch."""
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import trackin_ooc as to
        from distributed import Client, LocalCluster

        rng = np.random.default_rng(0)
        train = to.from_arrays({str(tmp_path / "train.zarr")!r}, rng.normal(size=(2, 40, 8)), [0.1, 0.2])
        test = to.from_arrays({str(tmp_path / "test.zarr")!r}, rng.normal(size=(2, 5, 8)), [0.1, 0.2])
        to.self_influence(train, progress=False)
        to.top_k(test, train, k=3, progress=False)
        to.influence(test, train).values
        assert "torch" not in sys.modules, "scoring in-process imported torch"
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            to.top_k(test, train, k=3, progress=False, client=client)
            loaded = client.run(lambda: "torch" in sys.modules)
        assert not any(loaded.values()), f"a scoring worker imported torch: {{loaded}}"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def _package_modules() -> list[str]:
    """Every module of the package (imported here: torch ones too)."""
    import pkgutil

    return [m.name for m in pkgutil.walk_packages(trackin_ooc.__path__, "trackin_ooc.")]


def test_every_exception_is_a_trackin_error_exported_from_the_top():
    import importlib
    import inspect

    found = {}
    modules = _package_modules()
    assert len(modules) > 80 and "trackin_ooc.capturing.projection.hooks" in modules  # the walk reached it all
    for name in modules:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                found[f"{name}.{attr}"] = obj
    for where, cls in found.items():
        assert cls.__module__ == "trackin_ooc.errors", f"{where} is defined outside trackin_ooc/errors.py"
        if not issubclass(cls, Warning):
            assert issubclass(cls, trackin_ooc.TrackinError), f"{where} is not a TrackinError"
        assert getattr(trackin_ooc, cls.__name__, None) is cls and cls.__name__ in trackin_ooc.__all__, (
            f"{where} is not exported from trackin_ooc")
