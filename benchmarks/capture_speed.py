"""Capture time, dense Gaussian ÷ factored, at the same projection_dim, measured in one run.

    .venv/bin/python benchmarks/capture_speed.py [--dims 2048,8192] [--examples 1500] [--checkpoints 3]

Models: the digits MLP 64-256-256-10 (85k parameters: the target is ≥ 10× at 8192), the digits CNN
with 32 channels (conv positions multiply the factored cost), and a text classifier with a 50k
vocabulary (800k parameters, almost all in the Embedding, whose dense projection is the expensive
path; fewer examples). Each capture writes a real store; times include the writes. Every time is
the best of ``--repeat`` runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from _common import trained

import trackin_ooc as to
from trackin_ooc.demo import train_with_checkpoints
from trackin_ooc.demo.text import TokenClassifier, token_data


def timed_capture(model, ckpts, data, where, repeat: int = 1, **kw) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        to.capture(model, ckpts, data, where, overwrite=True, **kw)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="2048,8192")
    p.add_argument("--examples", type=int, default=1500)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--text-examples", type=int, default=256)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("TRACKIN_OOC_QUIET", "1")
    dims = [int(d) for d in args.dims.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, best of {args.repeat}")

    tmp = tempfile.mkdtemp(prefix="capture_speed_")
    try:
        rows = []
        for kind in ("mlp", "cnn"):
            model, ckpts, split = trained(kind, args.checkpoints)
            data = torch.utils.data.Subset(split.train, range(min(args.examples, len(split.train))))
            n_params = sum(q.numel() for q in model.parameters())
            for dim in dims:
                t = {}
                for mode in ("factored", "gaussian"):
                    t[mode] = timed_capture(
                        model,
                        ckpts,
                        data,
                        os.path.join(tmp, f"{kind}_{mode}_{dim}.zarr"),
                        projection=mode,
                        projection_dim=dim,
                        batch_size=args.batch_size,
                        device=args.device,
                        repeat=args.repeat,
                    )
                rows.append((f"digits {kind} ({n_params:,} params)", len(data), len(ckpts), dim, t))

        torch.manual_seed(0)
        text = TokenClassifier()
        train_ds = token_data(max(args.text_examples, 300), seed=0)
        ckpts = [
            str(q)
            for q in train_with_checkpoints(
                text, train_ds, os.path.join(tmp, "text_ckpt"), epochs=1, lr=2.0, checkpoint_every=1
            )
        ]
        data = torch.utils.data.Subset(train_ds, range(args.text_examples))
        t = {}
        for mode in ("factored", "gaussian"):
            t[mode] = timed_capture(
                text,
                ckpts,
                data,
                os.path.join(tmp, f"text_{mode}.zarr"),
                projection=mode,
                projection_dim=args.text_dim,
                batch_size=args.batch_size,
                device=args.device,
                repeat=args.repeat,
            )
        n_params = sum(q.numel() for q in text.parameters())
        rows.append((f"text, 50k vocab ({n_params:,} params)", len(data), len(ckpts), args.text_dim, t))

        print(
            f"\n{'model':34s} {'examples':>8s} {'ckpts':>5s} {'dim':>6s} {'dense s':>8s} "
            f"{'factored s':>10s} {'dense ÷ factored':>16s} {'factored ex/s':>13s}"
        )
        for name, n, c, dim, t in rows:
            print(
                f"{name:34s} {n:8d} {c:5d} {dim:6d} {t['gaussian']:8.2f} {t['factored']:10.2f} "
                f"{t['gaussian'] / t['factored']:16.1f} {n * c / t['factored']:13.0f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
