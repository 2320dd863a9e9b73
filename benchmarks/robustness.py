"""Do the defaults hold on cases nobody tuned them on? Both seeded sweeps in one run, every case and
the worst one printed:

- ``sweep_projection``: the factored projection against a dense Gaussian one at the same dimension, on
  randomised BERT-, GPT-2-, RoBERTa- and ViT-style configs (Spearman against exact influence);
- ``sweep_index``: the top-k index with its default (calibrated) ``n_probe`` on randomised clustered and
  unstructured stores (recall@10, rows read, speed against streaming top-k).

Each sweep module exposes ``run_sweep(quick) -> list[dict]`` (one dict per case, its figures included)
and ``worst(rows) -> dict`` (the figures that decide whether the default holds, at their worst),
and prints its own table as it goes. ``--quick`` runs small versions of both (minutes); the full run
is the one quoted in docs/benchmarks.md.

    .venv/bin/python benchmarks/robustness.py [--quick] [--only projection|index]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

SWEEPS = {"projection": "sweep_projection", "index": "sweep_index"}


def _label() -> str:
    """Date, commit and machine load: what a quoted run must say about itself."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, {os.cpu_count()} cores, load average {load}"


def _show(title: str, rows: list[dict], worst: dict) -> None:
    print(f"\n== {title}: {len(rows)} cases; worst case ==")
    for key, value in worst.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small versions of both sweeps")
    parser.add_argument("--only", choices=sorted(SWEEPS), help="run one sweep")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(f"robustness sweeps ({'quick' if args.quick else 'full'}): {_label()}")
    summaries = []
    for name, module_name in SWEEPS.items():
        if args.only and name != args.only:
            continue
        module = importlib.import_module(module_name)
        t0 = time.perf_counter()
        rows = module.run_sweep(quick=args.quick)
        summaries.append((f"{name} ({time.perf_counter() - t0:.0f} s)", rows, module.worst(rows)))
    for title, rows, worst in summaries:
        _show(title, rows, worst)
    print(f"\nfinished: {_label()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
