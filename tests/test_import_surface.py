"""The import surface: scoring never loads torch, and the capture rooms import one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import trackin_ooc

PACKAGE = Path(trackin_ooc.__file__).parent
CAPTURING = PACKAGE / "capturing"
# Each room may import only the rooms after it (docs: trackin_ooc/capturing/__init__.py).
ROOMS = ["job", "projection", "per_example", "checkpoints"]
# The three tiers, top to bottom: capture (torch) → engine (Dask, arrays) → store (the on-disk layout). A tier
# imports only the tiers below it; the leaf rooms below import no tier at all.
TIERS = ["trackin_ooc.capturing", "trackin_ooc.engine", "trackin_ooc.store"]
LEAVES = {"trackin_ooc.errors": (), "trackin_ooc.refs": (), "trackin_ooc.spec": (), "trackin_ooc.cluster": ()}
CLI = PACKAGE.parent / "cli"


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
        allowed = set(ROOMS[i + 1 :])
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
            f"{where} is not exported from trackin_ooc"
        )


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved; function-level ones too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` names a module
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _package_files(package: str) -> list[Path]:
    folder = PACKAGE.parent.joinpath(*package.split("."))
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]


def test_no_import_runs_back_up_a_tier():
    for i, tier in enumerate(TIERS):
        above = TIERS[:i]
        files = _package_files(tier)
        assert files, tier
        for f in files:
            wrong = {m for m in _imports(f) for t in above if _within(m, t)}
            assert not wrong, f"{_module_name(f)} ({tier}) imports {sorted(wrong)}, a tier above it"
    for leaf in LEAVES:
        for f in _package_files(leaf):
            wrong = {m for m in _imports(f) for t in TIERS if _within(m, t)}
            assert not wrong, f"{_module_name(f)} imports {sorted(wrong)}; it must stay below every tier"


def _public_modules() -> set[str]:
    tree = ast.parse((PACKAGE.parent / "docs" / "hooks" / "gen_pages.py").read_text())
    for node in tree.body:  # PUBLIC_MODULES = {...}: read without importing mkdocs
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PUBLIC_MODULES" for t in node.targets):
            return set(ast.literal_eval(node.value)) | {"trackin_ooc", "trackin_ooc.errors"}
    raise AssertionError("docs/hooks/gen_pages.py has no PUBLIC_MODULES")


def test_the_cli_uses_the_public_api_only():
    public = _public_modules()
    files = sorted(CLI.glob("*.py"))
    assert files
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if _within(a.name, "trackin_ooc")]
                for name in names:
                    assert name in public, f"cli/{f.name} imports {name}, not a public module"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and _within(node.module or "", "trackin_ooc"):
                assert node.module in public, f"cli/{f.name} imports from {node.module}, not a public module"
                if node.module == "trackin_ooc":
                    for alias in node.names:
                        ok = alias.name in trackin_ooc.__all__ or f"trackin_ooc.{alias.name}" in public
                        assert ok, f"cli/{f.name} imports trackin_ooc.{alias.name}, not a public name"


def _parameters(fn) -> list[tuple[str, object]]:
    import inspect

    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind) for p in params]


def test_both_block_task_modules_satisfy_the_protocol():
    from trackin_ooc.engine import block_tasks, factor_tasks, tasks

    for module in (tasks, factor_tasks):
        assert isinstance(module, block_tasks.BlockTasks), module.__name__
        for name in block_tasks.TASK_NAMES:
            want = _parameters(getattr(block_tasks.BlockTasks, name))
            have = _parameters(getattr(module, name))
            assert have == want, f"{module.__name__}.{name}{have} differs from the protocol's {want}"
    members = {n for n in vars(block_tasks.BlockTasks) if not n.startswith("_")}
    assert members == set(block_tasks.TASK_NAMES)


def test_every_featurizer_kind_is_a_featurizer():
    """The three kinds, made for a real model as a capture makes them, satisfy the one interface and make
    RowBlocks whose rows match the batch."""
    import torch
    from torch import nn

    from trackin_ooc.capturing.projection.dense import make_spec
    from trackin_ooc.capturing.projection.factored import factored_spec
    from trackin_ooc.capturing.projection.factors import factors_spec
    from trackin_ooc.capturing.projection.features import make_featurizer
    from trackin_ooc.capturing.projection.featurizer import Featurizer, FeaturizerBase, HookedFeaturizer
    from trackin_ooc.store.rows import RowBlock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    specs = {
        "dense": make_spec("gaussian", 8, 0, shapes),
        "factored": factored_spec(model, names, 16, 0, example=x[:1]),
        "factors": factors_spec(model, names, {"0": 1, "2": 1}),
    }
    for kind, spec in specs.items():
        featurize = make_featurizer(model, spec, None, torch.device("cpu"))
        try:
            assert isinstance(featurize, Featurizer) and isinstance(featurize, FeaturizerBase), kind
            assert isinstance(featurize, HookedFeaturizer) == (kind != "dense"), kind
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            states = [featurize.prepare(state), featurize.prepare(state)]
            rows = featurize.rows(states, x, y)
            assert isinstance(rows, RowBlock) and rows.n_rows == 4 and rows.grads.shape[0] == 2, kind
            assert rows.losses is not None and rows.losses.shape == (2, 4) and np.isfinite(rows.losses).all()
            assert (rows.factors is not None) == (kind == "factors"), kind
        finally:
            featurize.close()
        if kind != "dense":
            assert featurize.taps == [], f"{kind}: close() left hooks on the model"
