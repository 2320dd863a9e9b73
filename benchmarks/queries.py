"""Benchmark: interactive questions on a big store — index top-k vs exact top-k, net influence vs the summed matrix.

    .venv/bin/python benchmarks/queries.py [--train 2000000] [--features 128] [--checkpoints 2]

The store holds real per-example gradients of the last Linear layer (256 → 10) of the digits MLP
(64-256-256-10, SGD checkpoints from benchmarks/_common.trained), computed in closed form
((softmax − onehot(y)) ⊗ h and the bias part) on digits resampled with pixel noise, 5 % of the
labels flipped, Gaussian-projected to ``--features`` dims, stored as float16: grouped by class
and by how well the model fits each example, as captured gradients are.

Prints: store size; index build time, size and peak memory; for 16 test examples the exact top_k and
the index top_k (default n_probe, and a few others) with latency, bytes read and recall@10 at both
ends; for 2,000 test examples the net influence per class vs influence(test, train).sum("test").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time

import numpy as np
import torch
from _common import trained
from _engine import DATA, PeakMemory, gib

import trackin_ooc as to
from trackin_ooc.demo import load_digits_split
from trackin_ooc.store.rows import RowBlock

LR = 0.1


class LastLayerGradients:
    """Per-example last-layer gradients of the MLP at each checkpoint, projected; rows made on demand."""

    def __init__(self, features: int, n_checkpoints: int, seed: int = 0):
        model, paths, _ = trained("mlp", n_checkpoints)
        self.body = model[:-1]
        self.states = [torch.load(p, weights_only=True)["model_state_dict"] for p in paths]
        self.model = model
        last = model[-1]
        width = last.in_features * last.out_features + last.out_features
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(width, features, generator=g) / features**0.5
        split = load_digits_split(n_train=1500, seed=0)
        self.pool = {"train": split.train.tensors, "test": split.test.tensors}

    def block(self, kind: str, start: int, stop: int, seed: int, flip: float) -> np.ndarray:
        x0, y0 = self.pool[kind]
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        idx = torch.randint(0, len(y0), (stop - start,), generator=g)
        x = (x0[idx] + 0.15 * torch.randn(x0[idx].shape, generator=g)).clamp_(0, 1)
        y = y0[idx].clone()
        flipped = torch.rand(len(y), generator=g) < flip
        y[flipped] = (y[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=g)) % 10
        out = np.empty((len(self.states), stop - start, self.proj.shape[1]), np.float32)
        with torch.no_grad():
            for c, state in enumerate(self.states):
                self.model.load_state_dict(state)
                h = self.body(x)
                a = torch.softmax(self.model[-1](h), 1)
                a[torch.arange(len(y)), y] -= 1
                # (a ⊗ h, a) @ P without forming a ⊗ h: Σ_i a_i (h @ P_i) + a @ P_bias
                n_out, n_in = a.shape[1], h.shape[1]
                weight = self.proj[: n_out * n_in].reshape(n_out, n_in, -1)
                out[c] = (
                    torch.einsum("ni,nif->nf", a, torch.einsum("nj,ijf->nif", h, weight))
                    + a @ self.proj[n_out * n_in :]
                ).numpy()
        return out, y.numpy()


def make_store(gen: LastLayerGradients, name: str, kind: str, n: int, seed: int, flip: float) -> to.GradientStore:
    """A float16 store of ``n`` generated rows (reused when already there), written one block at a time."""
    path = os.path.join(DATA, name)
    if os.path.exists(path):
        try:
            st = to.open_store(path)
            if st.complete and st.n_examples == n and st.feature_dim == gen.proj.shape[1]:
                return st
        except to.TrackinError:
            pass
    c, f = len(gen.states), gen.proj.shape[1]
    st = to.GradientStore.create(
        path,
        n_checkpoints=c,
        n_examples=n,
        spec=to.ProjectionSpec(kind="external", dim=f),
        learning_rates=[LR] * c,
        dtype="float16",
        label_dtype="int64",
        chunk_rows=min(n, 16384),
        overwrite=True,
    )
    for s, e in st.row_blocks():
        grads, labels = gen.block(kind, s, e, seed, flip)
        st.write_block(s, RowBlock(grads, labels=labels))
    return st.mark_complete()


def recall(approx, exact, side: str) -> float:
    a, b = approx[f"{side}_index"].values, exact[f"{side}_index"].values
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--net-test", type=int, default=2000)
    p.add_argument("--recall-test", type=int, default=256, help="held-out test examples for a steadier recall")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--only", choices=["top-k", "net"], help="run one half of the benchmark")
    args = p.parse_args()
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    torch.set_num_threads(2)
    gen = LastLayerGradients(args.features, args.checkpoints)
    tag = f"{args.features}_{args.checkpoints}"
    t0 = time.perf_counter()
    train = make_store(gen, f"queries_train_{args.train}_{tag}.zarr", "train", args.train, seed=1, flip=0.05)
    test = make_store(gen, f"queries_test_{args.queries}_{tag}.zarr", "test", args.queries, seed=2, flip=0.0)
    net_test = make_store(gen, f"queries_test_{args.net_test}_{tag}.zarr", "test", args.net_test, seed=3, flip=0.0)
    held_out = make_store(
        gen, f"queries_test_{args.recall_test}_{tag}.zarr", "test", args.recall_test, seed=4, flip=0.0
    )
    torch.set_num_threads(1)
    print(
        f"train store: {train.n_examples:,} × {train.feature_dim} × {train.n_checkpoints} checkpoints float16 "
        f"({gib(train.nbytes)}), last-layer gradients of the digits MLP (ready in {time.perf_counter() - t0:.0f} s)"
    )

    if args.only != "net":
        top_k_part(args, train, test, held_out)
    if args.only != "top-k":
        net_part(train, net_test)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def top_k_part(args, train, test, held_out) -> None:
    index_path = os.path.join(train.path, "index")
    shutil.rmtree(index_path, ignore_errors=True)
    with PeakMemory() as mem:
        build_s, idx = timed(lambda: to.build_index(train))
    print(
        f"build_index: {build_s:.1f} s, {idx.n_lists} lists, default n_probe {idx.n_probe} "
        f"(per end: {', '.join(f'{r.ranking} λ={r.bound_weight} n_probe={r.n_probe}' for r in idx.rules())}; "
        f"{idx.verdict}), index {gib(idx.nbytes)}, peak resident memory {gib(mem.peak)}"
    )

    k = args.k
    with PeakMemory() as mem:
        exact_s, exact = timed(lambda: to.top_k(test, train, k=k), repeat=2)
    print(f"exact top_k, {test.n_examples} test: {exact_s:.2f} s, read {gib(train.nbytes)}, peak {gib(mem.peak)}")
    exact_many = to.top_k(held_out, train, k=k)
    for n_probe in sorted({None, max(1, idx.n_probe // 2), idx.n_probe * 2}, key=lambda x: x or idx.n_probe):
        with PeakMemory() as mem:
            s, res = timed(lambda n=n_probe: to.top_k(test, train, k=k, index=idx, n_probe=n), repeat=3)
        many = to.top_k(held_out, train, k=k, index=idx, n_probe=n_probe)
        print(
            f"index top_k n_probe={res.attrs['n_probe']}{' (default)' if n_probe is None else ''}: {s * 1e3:.0f} ms "
            f"({exact_s / s:.0f}× faster), read {res.attrs['bytes_read'] / 2**20:.1f} MiB "
            f"({100 * res.attrs['fraction_read']:.2f} % of rows), recall@{k} proponents "
            f"{recall(res, exact, 'proponent'):.3f}, opponents {recall(res, exact, 'opponent'):.3f}, "
            f"peak {gib(mem.peak)}; on {held_out.n_examples} held-out test examples at once: recall "
            f"{recall(many, exact_many, 'proponent'):.3f} / {recall(many, exact_many, 'opponent'):.3f}, "
            f"{100 * many.attrs['fraction_read']:.1f} % of rows read"
        )


def net_part(train, net_test) -> None:
    net_s, net = timed(lambda: to.net_influence(net_test, train, by="label"), repeat=2)
    summed_s, summed = timed(lambda: to.influence(net_test, train).groupby(xr_labels(net_test)).sum("test").compute())
    ref = summed.values.astype(np.float64)
    err = np.abs(net.values - ref).max() / np.abs(ref).max()
    print(
        f"net influence, {net_test.n_examples} test by label: {net_s:.1f} s; influence(...) summed per label "
        f"{summed_s:.1f} s ({summed_s / net_s:.0f}× slower); max difference {err:.1e} of the largest value"
    )


def xr_labels(store: to.GradientStore):
    import xarray as xr

    return xr.DataArray(store.labels(), dims="test", name="test_label")


if __name__ == "__main__":
    main()
