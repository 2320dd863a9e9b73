"""What the factored projection costs, against a plain forward and backward and against a dense projection.

    .venv/bin/python benchmarks/projection_cost.py --quick     # fewer batches, GPT-2 at 2048 and 8192
    .venv/bin/python benchmarks/projection_cost.py             # more batches, also 1024 and 4096

Cases (CPU, ``--threads`` threads, models from configs or the project's architectures, random weights):

- GPT-2 of 13.8M parameters from a ``GPT2Config`` (6 layers, 384 wide, 6 heads, 8,192-token vocabulary,
  tied head), 128 tokens, batches of 8: the factored featurizer (one hooked forward and backward, features,
  exact norms) per batch ÷ a plain batched forward and backward of the same batch, at each k. Target ≤ 2×.
- ResNet-18 (11M parameters) at 32×32, batches of 32: the same ratio at each k. Target ≤ 4×.
- The CIFAR ResNet (16-32-64, BatchNorm) at 4096 dims: ``trackin_ooc.capture`` of 64 examples with
  ``projection="gaussian"`` ÷ with ``projection="factored"`` (in-memory stores, one checkpoint). Target ≥ 2×.
- The rule that picks how a convolution's per-example gradients are formed (a batched product of its
  patches for a 1×1 kernel or fewer positions than output channels, else a grouped weight gradient), on a seeded
  sweep of random convolutions (channels 8–512, 2–64 pixels a side, kernels 1/3/5, strides 1/2, batches
  4–32): the chosen way's time ÷ the faster way's, every case and the worst.

Times are the median over batches after a warm-up batch (the first batch also checks the hooks and
generates the tables). Every case is printed, then the worst ratio per target.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sweep_projection import label
from torch.utils.data import TensorDataset

import trackin_ooc as to
from trackin_ooc.capturing.checkpoints.fitting import drop_tied_duplicates
from trackin_ooc.capturing.per_example.batches import call_model
from trackin_ooc.capturing.per_example.losses import default_loss
from trackin_ooc.capturing.projection.factored import factored_spec
from trackin_ooc.capturing.projection.hooks import FactoredFeatures
from trackin_ooc.demo import architectures as arch


def gpt2_13m() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=8192,
        n_embd=384,
        n_layer=6,
        n_head=6,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def gpt2_batches(n: int, batch: int = 8, tokens: int = 128):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, 8192, (batch, tokens), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids


def image_batches(n: int, batch: int = 32):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def median_time(fn, batches) -> float:
    times = []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        fn(x, y)
        if i:  # the first batch warms up (hook check, tables, allocator)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def featurizer_ratio(make, batches, dim: int) -> tuple[float, float, float]:
    """(factored seconds per batch, plain forward+backward seconds per batch, ratio)."""
    model = make().eval()
    names = [n for n, _ in model.named_parameters()]
    spec = factored_spec(model, names, dim, 0)

    def plain(x, y):
        model.zero_grad(set_to_none=True)
        default_loss(call_model(model, x), y).sum().backward()

    with FactoredFeatures(model, spec) as feats:
        prepared = feats.prepare(drop_tied_duplicates(model, {k: v.detach() for k, v in model.state_dict().items()}))
        fac = median_time(lambda x, y: feats.one(prepared, x, y), batches())
    base = median_time(plain, batches())
    return fac, base, fac / base


def capture_ratio(dim: int, n: int = 64) -> tuple[float, float, float]:
    """(gaussian capture seconds, factored capture seconds, gaussian ÷ factored) on the CIFAR ResNet."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    model = arch.cifar_resnet(seed=0)
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for kind in ("factored", "gaussian"):
        best = float("inf")
        for _ in range(2):  # the second run has the projection matrices cached, as a long capture does
            t0 = time.perf_counter()
            to.capture(
                model,
                [ckpt],
                data,
                None,
                learning_rates=[0.1],
                projection=kind,
                projection_dim=dim,
                batch_size=32,
                device="cpu",
                progress=False,
            )
            best = min(best, time.perf_counter() - t0)
        out[kind] = best
    return out["gaussian"], out["factored"], out["gaussian"] / out["factored"]


def conv_rule_sweep(cases: int, seed: int = 0) -> float:
    """Prints, per random convolution, both ways of forming its per-example gradients and the rule's pick;
    returns the worst time of the pick ÷ the faster way."""
    import random

    from trackin_ooc.capturing.projection.calls import ConvCall
    from trackin_ooc.capturing.projection.factors import LayerChoice

    rng = random.Random(seed)
    worst = 0.0
    for _ in range(cases):
        c, o = rng.choice((8, 16, 32, 64, 128, 256, 512)), rng.choice((8, 16, 32, 64, 128, 256, 512))
        k, stride, side = rng.choice((1, 3, 5)), rng.choice((1, 2)), rng.choice((2, 4, 8, 16, 32, 64))
        conv = torch.nn.Conv2d(c, o, k, stride=stride, padding=k // 2, bias=False)
        b = max(1, min(32, (1 << 22) // (c * k * k * o)))  # the chunk of examples the hooks form at once
        x = torch.randn(b, c, side * stride, side * stride)
        delta = torch.randn(conv(x).shape)
        layer = LayerChoice("conv2d", "c", ("c.weight",), c * k * k, o, "factors").tap_layer()
        call = ConvCall(layer, conv, x, delta)
        d = call.delta_map
        with torch.no_grad():
            times = {}
            for name, fn in (("patches", call._patches), ("grouped", call._grouped)):
                fn(0, b, d)
                t0 = time.perf_counter()
                for _ in range(3):
                    fn(0, b, d)
                times[name] = (time.perf_counter() - t0) / 3
        pick = "patches" if call.patches_first(o) else "grouped"
        ratio = times[pick] / min(times.values())
        worst = max(worst, ratio)
        print(
            f"conv {c:>3d}->{o:<3d} k{k} s{stride} {side:>2d}x{side:<2d} positions, batch {b:>2d}: patches "
            f"{times['patches'] * 1e3:7.2f} ms, grouped {times['grouped'] * 1e3:7.2f} ms, picks {pick:8s} "
            f"({ratio:.2f}x the faster)"
        )
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = 3 if args.quick else 6
    ks = (2048, 8192) if args.quick else (1024, 2048, 4096, 8192)
    print(f"# factored projection cost ({label()}, {args.threads} threads)")
    worst = {}
    model = gpt2_13m()
    print(f"GPT-2 from a config: {sum(p.numel() for p in model.parameters()):,} parameters, 8 × 128 tokens")
    for k in ks:
        fac, base, ratio = featurizer_ratio(gpt2_13m, lambda: gpt2_batches(n), k)
        print(
            f"gpt2-13.8M  k={k:<5d} factored {fac:.2f} s/batch, forward+backward {base:.2f} s  ratio {ratio:.2f}x"
            f" (target <= 2)"
        )
        worst["gpt2 <= 2x"] = max(worst.get("gpt2 <= 2x", 0.0), ratio)
    for k in ks[-2:]:
        fac, base, ratio = featurizer_ratio(lambda: arch.resnet18_cifar(seed=0), lambda: image_batches(n), k)
        print(
            f"resnet18    k={k:<5d} factored {fac:.2f} s/batch, forward+backward {base:.2f} s  ratio {ratio:.2f}x"
            f" (target <= 4)"
        )
        worst["resnet18 <= 4x"] = max(worst.get("resnet18 <= 4x", 0.0), ratio)
    gauss, fac, ratio = capture_ratio(4096)
    print(
        f"cifar-resnet k=4096  capture gaussian {gauss:.2f} s, factored {fac:.2f} s  gaussian/factored {ratio:.1f}x"
        " (target >= 2)"
    )
    worst["cifar gaussian/factored >= 2x"] = ratio
    worst["conv rule pick / faster way"] = conv_rule_sweep(12 if args.quick else 32)
    print("# worst case per target")
    for name, value in worst.items():
        print(f"{name:32s} {value:.2f}")


if __name__ == "__main__":
    main()
