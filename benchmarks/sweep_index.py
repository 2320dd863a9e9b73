"""Benchmark: do the top-k index's defaults hold on stores nobody tuned them on?

    nice .venv/bin/python benchmarks/sweep_index.py [--quick] [--cases N]

A seeded sweep of synthetic gradient stores of the kind an index serves: rows in clusters of uneven
sizes (cluster centres per checkpoint drawn around a shared direction, plus per-row noise), a per-row
norm spread (lognormal σ), 32–512 features, 1–5 checkpoints, float16, dot-product and cosine scoring;
and stores with no structure (isotropic Gaussian rows). Full mode: 1M–2M rows (each store ≤ 1 GiB,
removed after its case); ``--quick``: 150k rows. Every case builds the index with its defaults (no
``n_lists``, no ``n_probe``: nothing tuned) and compares it with exact streaming ``top_k``:

- recall@10 (the lower of proponents and opponents), for 256 held-out test examples from the same
  family, two ways: ``own`` — each example finds only rows of the lists it probes itself (what one
  test example per call gets; the conservative figure), and ``api`` — ``top_k(index=)`` called with
  16 test examples at a time;
- the fraction of train rows read: per test example (``own``) and per call of 16;
- latency of one call with 16 test examples and of one with a single test example, index vs exact
  streaming ``top_k`` (best of 3 vs best of 2, warm page cache), as ratios.

Prints every case, then the worst recall, worst fraction read (clustered stores) and worst speedup.
``run_sweep(quick)`` returns the cases as dicts (for benchmarks/robustness.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

import trackin_ooc as to
from trackin_ooc.engine import ivf
from trackin_ooc.store.rows import RowBlock

K = 10
TEST_ROWS, CALL_ROWS = 256, 16
STORE_BYTES = 1 << 30  # each store of the full sweep at most this big (float16)
QUICK_ROWS = 150_000


@dataclass(frozen=True)
class Case:
    """One store of the family: ``clusters=0`` means isotropic Gaussian rows (no structure)."""

    rows: int
    checkpoints: int
    features: int
    clusters: int
    noise: float
    sigma: float  # lognormal σ of the per-row norm
    cosine: bool
    seed: int

    @property
    def label(self) -> str:
        what = "isotropic" if not self.clusters else f"{self.clusters:,} clusters, noise {self.noise:.2f}"
        return (
            f"{self.rows:,}×{self.checkpoints}×{self.features} {what}, σ {self.sigma:.2f}, "
            f"{'cosine' if self.cosine else 'dot'}"
        )


def write_store(path, case: Case, n_rows: int, row_seed: int, chunk_rows: int = 16384) -> to.GradientStore:
    """A float16 store of ``n_rows`` rows of ``case``'s family; ``row_seed`` picks the rows (the cluster
    centres, sizes and learning rates come from ``case.seed`` alone, so train and test stores agree)."""
    rng = np.random.default_rng(case.seed)
    c, f = case.checkpoints, case.features
    if case.clusters:
        shared = rng.standard_normal((case.clusters, f))
        centres = (shared[None] + 0.5 * rng.standard_normal((c, case.clusters, f))) / np.sqrt(f)
        share = rng.lognormal(0.0, 1.0, case.clusters)
        share /= share.sum()  # uneven cluster sizes
    lrs = np.linspace(0.1, 0.02, c) if c > 1 else np.array([0.05])
    st = to.GradientStore.create(
        path,
        n_checkpoints=c,
        n_examples=n_rows,
        spec=to.ProjectionSpec(kind="external", dim=f),
        learning_rates=lrs,
        dtype="float16",
        label_dtype="int64",
        chunk_rows=min(n_rows, chunk_rows),
        overwrite=True,
    )
    for b, (s, e) in enumerate(st.row_blocks()):
        r = np.random.default_rng([row_seed, b])
        n = e - s
        scale = r.lognormal(0.0, case.sigma, n).astype(np.float32) if case.sigma else np.ones(n, np.float32)
        if case.clusters:
            y = r.choice(case.clusters, size=n, p=share)
            g = centres[:, y] + (case.noise / np.sqrt(f)) * r.standard_normal((c, n, f))
        else:
            y = np.zeros(n, dtype=np.int64)
            g = r.standard_normal((c, n, f)) / np.sqrt(f)
        st.write_block(s, RowBlock((scale[None, :, None] * g).astype(np.float16), labels=y))
    return st.mark_complete()


def sweep_cases(quick: bool, n_random: int = 6, seed: int = 2026) -> list[Case]:
    """The stores of the issue's table, seeded random draws over the family, and isotropic stores."""
    fixed = [  # rows, checkpoints, features, clusters, noise, sigma
        (2_000_000, 2, 96, 4000, 0.35, 0.0),
        (1_000_000, 2, 64, 300, 0.6, 0.0),
        (1_000_000, 2, 64, 6000, 0.3, 0.5),
        (1_000_000, 2, 48, 30_000, 0.2, 1.0),
        (1_000_000, 1, 512, 100, 0.4, 1.5),
        (1_000_000, 5, 32, 50_000, 0.3, 1.5),  # the family's extremes
    ]
    cases = [Case(n, c, f, k, noise, s, i == 5, 100 + i) for i, (n, c, f, k, noise, s) in enumerate(fixed)]
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        while True:
            n = int(rng.choice([1_000_000, 1_500_000, 2_000_000]))
            c = int(rng.integers(1, 6))
            f = int(2 ** rng.uniform(5, 9))  # 32–512
            if n * c * f * 2 <= STORE_BYTES:
                break
        clusters = int(round(10 ** rng.uniform(2, np.log10(50_000))))
        cases.append(
            Case(
                n,
                c,
                f,
                clusters,
                round(float(rng.uniform(0.1, 0.8)), 2),
                round(float(rng.uniform(0.0, 1.5)), 2),
                bool(i % 2),
                200 + i,
            )
        )
    cases += [Case(1_000_000, 2, 64, 0, 0.0, 0.0, False, 300), Case(1_000_000, 1, 128, 0, 0.0, 0.8, True, 301)]
    if quick:  # the same stores at fewer rows, with as many rows per cluster
        cases = [
            Case(
                QUICK_ROWS,
                c.checkpoints,
                c.features,
                c.clusters and max(10, round(c.clusters * QUICK_ROWS / c.rows)),
                c.noise,
                c.sigma,
                c.cosine,
                c.seed,
            )
            for c in cases
        ]
    return cases


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def recall(approx_index: np.ndarray, exact_index: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(approx_index, exact_index)]))


def own_lists(idx: to.TopKIndex, test: to.GradientStore, exact) -> tuple[float, float]:
    """Recall@k and fraction of rows read when each test example finds rows only through the lists it
    probes itself (the index's defaults; what a call with one test example reads)."""
    queries = ivf.to_index_space(test.read_grads(), test.learning_rates, idx.normalize)
    sizes = idx.list_sizes()
    found, read = [], 0.0
    for i, q in enumerate(queries):
        lists = ivf.probe(q[None], idx.quantizer(), idx.rules(), K)
        probed = np.zeros(idx.n_lists, dtype=bool)
        probed[lists] = True
        read += sizes[lists].sum() / idx.n_examples
        per_end = []
        for side in ("proponent", "opponent"):
            rows = exact[f"{side}_index"].values[i]
            per_end.append(probed[idx.assignment(np.sort(rows))].mean())
        found.append(per_end)
    found = np.asarray(found)
    return float(found.mean(axis=0).min()), read / len(queries)


def run_case(case: Case, root: str) -> dict:
    folder = tempfile.mkdtemp(dir=root)
    try:
        t0 = time.perf_counter()
        train = write_store(os.path.join(folder, "train.zarr"), case, case.rows, row_seed=case.seed * 7 + 1)
        test = write_store(os.path.join(folder, "test.zarr"), case, TEST_ROWS, row_seed=case.seed * 7 + 2)
        calls = [
            to.from_arrays(
                os.path.join(folder, f"call{j}.zarr"),
                test.read_grads(j, j + CALL_ROWS),
                test.learning_rates,
                dtype="float16",
            )
            for j in range(0, TEST_ROWS, CALL_ROWS)
        ]
        made_s = time.perf_counter() - t0
        build_s, idx = timed(lambda: to.build_index(train, normalize=case.cosine), 1)
        kw = {"k": K, "normalize": case.cosine}
        exact_s, exact16 = timed(lambda: to.top_k(calls[0], train, **kw), 2)
        index_s, got16 = timed(lambda: to.top_k(calls[0], train, index=idx, **kw), 3)
        one = to.from_arrays(
            os.path.join(folder, "one.zarr"), test.read_grads(0, 1), test.learning_rates, dtype="float16"
        )
        exact1_s, _ = timed(lambda: to.top_k(one, train, **kw), 2)
        index1_s, _ = timed(lambda: to.top_k(one, train, index=idx, **kw), 3)
        exact = to.top_k(test, train, **kw)
        got = [to.top_k(call, train, index=idx, **kw) for call in calls]
        api = min(
            recall(np.concatenate([g[f"{s}_index"].values for g in got]), exact[f"{s}_index"].values)
            for s in ("proponent", "opponent")
        )
        structured = bool(idx.structured)
        own_recall, own_read = own_lists(idx, test, exact) if structured else (1.0, 1.0)
        return {
            **asdict(case),
            "label": case.label,
            "lists": idx.n_lists,
            "n_probe": idx.n_probe,
            "structured": structured,
            "verdict": idx.verdict,
            "made_s": made_s,
            "build_s": build_s,
            "recall_own": own_recall,
            "recall_api": api,
            "recall": min(own_recall, api),
            "fraction_own": own_read,
            "fraction_call": float(np.mean([g.attrs["fraction_read"] for g in got])),
            "exact_ms": 1e3 * exact_s,
            "index_ms": 1e3 * index_s,
            "speedup": exact_s / index_s,
            "speedup_one": exact1_s / index1_s,
            "index_one_ms": 1e3 * index1_s,
            "max_list": int(idx.list_sizes().max()),
            "mean_list": float(idx.list_sizes().mean()),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def line(r: dict) -> str:
    return (
        f"{r['label']}: {r['lists']} lists (largest {r['max_list']:,}, mean {r['mean_list']:,.0f}), "
        + (
            f"n_probe {r['n_probe']}, recall@10 own {r['recall_own']:.3f} / api {r['recall_api']:.3f}, "
            f"read {100 * r['fraction_own']:.2f} % per example / {100 * r['fraction_call']:.2f} % per call of 16"
            if r["structured"]
            else f"no structure ({r['verdict']}); streams, recall {r['recall_api']:.3f}"
        )
        + f"; 16 test examples {r['index_ms']:.0f} ms vs exact {r['exact_ms']:.0f} ms ({r['speedup']:.1f}×), "
        f"one {r['index_one_ms']:.0f} ms ({r['speedup_one']:.1f}×); build {r['build_s']:.0f} s"
    )


def run_sweep(quick: bool, n_random: int = 6, root: str | None = None, verbose: bool = True) -> list[dict]:
    """Every case of the sweep (see the module docstring), one dict each; stores removed after each case."""
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    root = root or os.path.join(os.environ.get("TRACKIN_BENCH_DATA") or tempfile.gettempdir(), "trackin-index-sweep")
    os.makedirs(root, exist_ok=True)
    out = []
    for case in sweep_cases(quick, n_random):
        r = run_case(case, root)
        out.append(r)
        if verbose:
            print(line(r), flush=True)
    return out


def worst(results: list[dict]) -> dict:
    clustered = [r for r in results if r["clusters"]]
    return {
        "recall": min(r["recall"] for r in results),
        "fraction_own": max(r["fraction_own"] for r in clustered) if clustered else float("nan"),
        "fraction_call": max(r["fraction_call"] for r in clustered) if clustered else float("nan"),
        "speedup": min(r["speedup"] for r in results),
        "speedup_one": min(r["speedup_one"] for r in results),
        "speedup_2m_clustered": min((r["speedup"] for r in clustered if r["rows"] >= 2_000_000), default=float("nan")),
        "all_clustered_structured": all(r["structured"] for r in clustered),
        "unstructured_flagged": all(not r["structured"] for r in results if not r["clusters"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ROWS:,}-row stores (development; clusters scaled to keep the rows per cluster)",
    )
    p.add_argument("--cases", type=int, default=6, help="random draws besides the fixed and isotropic stores")
    args = p.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {'quick' if args.quick else 'full'} sweep",
        flush=True,
    )
    results = run_sweep(args.quick, args.cases)
    w = worst(results)
    print(
        f"worst recall@10 {w['recall']:.3f}; worst fraction read on clustered stores "
        f"{100 * w['fraction_own']:.2f} % per example, {100 * w['fraction_call']:.2f} % per call of 16; worst "
        f"speedup vs streaming top-k {w['speedup']:.1f}× with 16 test examples, {w['speedup_one']:.1f}× with one "
        f"(2M-row clustered stores: {w['speedup_2m_clustered']:.1f}× with 16); every clustered store indexed: "
        f"{w['all_clustered_structured']}; every isotropic store flagged: {w['unstructured_flagged']}"
    )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
