"""Exact per-example gradients: hooks vs vmap vs the per-example autograd loop, per batch, one run.

    .venv/bin/python benchmarks/per_example_methods.py [--threads 1] [--repeat 7] [--batch 256]

``PerExampleGradients`` with ``prefer="hooks"`` (the default: hooked layers from one batched forward
and backward, vmap for the rest) and ``prefer="vmap"`` (vmap over the whole model where it works), and
the per-example loop for the Hugging Face models, on untrained models of the sizes users bring: digits
MLPs and CNN, the BatchNorm CIFAR ResNet (3×32×32), tiny BERT (padded dict batches) and tiny GPT-2
(causal LM loss). Times are CPU seconds of this process (``time.process_time``, robust to other
processes on a shared machine; with ``--threads 1`` they equal the time the batch takes on one core),
best of ``--repeat`` runs, the methods interleaved.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import subprocess
import time

import torch

from trackin_ooc.capturing.checkpoints import drop_tied_duplicates
from trackin_ooc.capturing.per_example import PerExampleGradients, split_batch
from trackin_ooc.capturing.per_example.vmap import loop_gradients
from trackin_ooc.demo import architectures as arch
from trackin_ooc.demo import digits_cnn, digits_mlp, load_digits_split


def best_times(fns: dict, repeat: int) -> dict[str, float]:
    for f in fns.values():
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, f in fns.items():
            t0 = time.process_time()
            f()
            best[name] = min(best[name], time.process_time() - t0)
    return best


def compare(name: str, model, inputs, targets, repeat: int, loop: bool = False) -> None:
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    state = drop_tied_duplicates(model, {k: v.detach() for k, v in model.state_dict().items()})
    pegs = {p: PerExampleGradients(model, names, prefer=p) for p in ("hooks", "vmap")}
    fns = {p: (lambda g=g: g(state, inputs, targets)) for p, g in pegs.items()}
    if loop:
        fns["loop"] = lambda: loop_gradients(model, pegs["hooks"].loss_fn, state, names, inputs, targets)
    best = best_times(fns, repeat)
    used = {p: g.method for p, g in pegs.items()}
    n = sum(p.numel() for p in model.parameters())
    cells = "  ".join(f"{p}: {t * 1e3:8.1f} ms ({used.get(p, 'loop')})" for p, t in best.items())
    ratio = best["vmap"] / best["hooks"]
    print(f"{name:16s} {n:>9,d} params  B={len(targets):4d}  {cells}  vmap/hooks {ratio:4.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"{datetime.date.today()} commit {commit}, torch {torch.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU ms per batch, best of {args.repeat}"
    )

    split = load_digits_split(n_train=1000)
    x, y = split.train.tensors
    for b in (32, args.batch):
        for hidden in ((64,), (64, 64), (256, 256), (1024,)):
            compare(f"mlp{hidden}", digits_mlp(hidden), x[:b], y[:b], args.repeat)
        compare("cnn", digits_cnn(), x[:b], y[:b], args.repeat)
    images = arch.digits_rgb32(split.train)
    compare(
        "cifar_resnet", arch.cifar_resnet(), images.tensors[0][:64], images.tensors[1][:64], max(2, args.repeat // 3)
    )
    for task, make in (("classify", arch.tiny_bert), ("lm", arch.tiny_gpt2)):
        dicts = arch.digit_token_dicts(split.train, task=task)
        inputs, targets = split_batch(arch.pad_collate([dicts[i] for i in range(64)]))
        compare(
            "tiny_bert" if task == "classify" else "tiny_gpt2",
            make(),
            inputs,
            targets,
            max(2, args.repeat // 3),
            loop=True,
        )


if __name__ == "__main__":
    main()
