"""Pages the documentation site makes at build time (a mkdocs-gen-files script, see mkdocs.yml).

- ``reference/``: the API reference, read from the package itself: one page for every name in
  ``trackin_ooc.__all__`` (each documented where it is defined) and one page per public module, so a
  new public name appears without editing anything here;
- ``index.md`` from README.md and ``changelog.md`` from CHANGELOG.md (links into docs/ rewritten);
- ``notebooks/``: the notebooks as committed, with their outputs (``make notebooks`` refreshes them), and
  notebooks/README.md as their index.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]

# Modules a user imports besides the top level (docs/cli.md, docs/hpc.md, docs/api.md name them).
# Their members are what each module's ``__all__`` (or, without one, its public names) says.
PUBLIC_MODULES = {
    "trackin_ooc.testing": "Reference scores and assertions for tests (xarray.testing style).",
    "trackin_ooc.cluster": "Where scoring runs: an existing scheduler, a local cluster, batch jobs, or in-process.",
    "trackin_ooc.cluster.local": "A client on an existing scheduler or a local cluster on 127.0.0.1.",
    "trackin_ooc.cluster.jobqueue": "Dask clusters on Slurm, PBS and LSF through dask-jobqueue.",
    "trackin_ooc.refs": "MOD:FN references to models and datasets, as the CLI takes them.",
    "trackin_ooc.outputs": "Where an output may go, checked before any work (the CLI's checks).",
    "trackin_ooc.tables": "Score tables and their writers (.csv, .parquet, .zarr).",
    "trackin_ooc.summary": "What `trackin-ooc info` prints, as data.",
    "trackin_ooc.demo": "Digits data, small models and SGD training with checkpoints.",
    "trackin_ooc.demo.examples": "Ready MOD:FN callables for the CLI on scikit-learn's digits.",
    "trackin_ooc.demo.architectures": "Small real architectures (ResNet, BERT, GPT-2 from configs) and their data.",
    "trackin_ooc.demo.pipeline": "The end-to-end demo (`trackin-ooc demo`) and its recall metrics.",
}


def write(path: str, text: str) -> None:
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(text)


# ---- the API reference ---------------------------------------------------------------------------
def _group(obj: object) -> str:
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return "Exceptions and warnings"
    if inspect.isclass(obj):
        return "Classes"
    return "Functions"


def top_level_page() -> str:
    import trackin_ooc

    groups: dict[str, list[tuple[str, str]]] = {"Functions": [], "Classes": [], "Exceptions and warnings": []}
    for name in trackin_ooc.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(trackin_ooc, name)
        groups[_group(obj)].append((name, f"{obj.__module__}.{obj.__qualname__}"))
    lines = [
        "# `trackin_ooc`",
        "",
        "```python",
        "import trackin_ooc as to",
        "```",
        "",
        f"Every name in `trackin_ooc.__all__` (version {trackin_ooc.__version__}), documented where it is",
        "defined. Guides: [Python API](../api.md), [checkpoints](../checkpoints.md), [models](../models.md),",
        "[queries](../queries.md).",
        "",
    ]
    for title, entries in groups.items():
        lines += [f"## {title}", ""]
        for name, path in entries:
            lines += [
                f"::: {path}",
                "    options:",
                f'      heading: "to.{name}"',
                f'      toc_label: "{name}"',
                "      heading_level: 3",
                "",
            ]
    return "\n".join(lines)


def module_page(module: str, summary: str) -> str:
    importlib.import_module(module)  # a module that moved or vanished fails the build here, by name
    return "\n".join(
        [
            f"# `{module}`",
            "",
            summary,
            "",
            f"::: {module}",
            "    options:",
            "      show_root_heading: false",
            "      show_root_toc_entry: false",
            "      show_submodules: false",
            "",
        ]
    )


def reference() -> None:
    write("reference/index.md", top_level_page())
    nav = ["* [trackin_ooc](index.md)"]
    for module, summary in PUBLIC_MODULES.items():
        page = module.removeprefix("trackin_ooc.").replace(".", "/") + ".md"
        write(f"reference/{page}", module_page(module, summary))
        nav.append(f"* [{module}]({page})")
    write("reference/SUMMARY.md", "\n".join(nav) + "\n")


# ---- pages copied from the repository root ------------------------------------------------------
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def _relink(target: str) -> str:
    if target.startswith("docs/"):
        return target.removeprefix("docs/")
    if target.rstrip("/") == "notebooks":
        return "notebooks/index.md"
    return target  # anything else must exist in the site: --strict reports it otherwise


def copied_pages() -> None:
    for source, page in (("README.md", "index.md"), ("CHANGELOG.md", "changelog.md")):
        text = (ROOT / source).read_text(encoding="utf-8")
        write(page, LINK.sub(lambda m: f"]({_relink(m.group(1))})", text))


# ---- notebooks ------------------------------------------------------------------------------------
def notebooks() -> None:
    entries = []
    for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
        with mkdocs_gen_files.open(f"notebooks/{source.name}", "wb") as f:
            f.write(source.read_bytes())
        cells = json.loads(source.read_text(encoding="utf-8"))["cells"]
        heading = next((c for c in cells if c["cell_type"] == "markdown"), None)
        title = "".join(heading["source"]).splitlines()[0].lstrip("# ").strip() if heading else source.stem
        entries.append((title, source.name))
    readme = ROOT / "notebooks" / "README.md"
    intro = readme.read_text(encoding="utf-8").rstrip() + "\n" if readme.is_file() else "# Notebooks\n"
    write("notebooks/index.md", intro + "\n" + "".join(f"- [{t}]({n})\n" for t, n in entries))
    write("notebooks/SUMMARY.md", "* [Notebooks](index.md)\n" + "".join(f"* [{t}]({n})\n" for t, n in entries))


reference()
copied_pages()
notebooks()
