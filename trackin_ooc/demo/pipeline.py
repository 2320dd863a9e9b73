"""The ``trackin-ooc demo`` run: the TracIn paper's mislabel experiment on digits, end to end.

Train a small CNN by SGD on digits with 10 % of the training labels flipped, saving checkpoints;
capture train and test gradient stores; rank training examples by TracIn self-influence; find
proponents and opponents of test digits; write plots and tables to one folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DemoOutputError

MARKER = ".trackin-demo"
FRACTIONS = (0.1, 0.2)
# The memorising run: an MLP 64-256-256-10 trained with AdamW (lr 3e-3, batches of 64) for this many epochs fits
# most flipped labels of the demo's split (measured: 84 % fitted after 40 epochs).
MEMORISED_EPOCHS = 40
MEMORISED_HIDDEN = (256, 256)


# ---- mislabel-detection metrics ----------------------------------------------------------------
def recall_curve(scores, flipped) -> tuple[np.ndarray, np.ndarray]:
    """Check examples from the highest score down: (fraction of data checked, fraction of flips found)."""
    scores = np.asarray(scores, dtype=np.float64)
    flipped = np.asarray(flipped, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(flipped[order])]) / max(1, int(flipped.sum()))
    checked = np.arange(len(scores) + 1) / len(scores)
    return checked, found


def recall_at(scores, flipped, fraction: float) -> float:
    """Fraction of the flipped labels among the top ``fraction`` of examples by score."""
    flipped = np.asarray(flipped, dtype=bool)
    m = int(round(fraction * len(flipped)))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return float(flipped[order[:m]].sum() / max(1, int(flipped.sum())))


# ---- result ------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    out: Path
    files: dict[str, Path]
    recall: dict[str, dict[float, float]]  # method -> {fraction checked: fraction of flips found}
    n_train: int
    n_test: int
    n_flipped: int
    test_accuracy: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    memorised: dict | None = None  # the AdamW MLP that fits the flipped labels: recall per method, fit, accuracy
    fitted: float | None = None  # share of the flipped labels the CNN predicts (has fitted)

    def summary(self) -> str:
        """The short text ``trackin-ooc demo`` prints at the end."""
        head = "".join(f"{f:>9.0%}" for f in FRACTIONS)
        lines = [
            f"digits: {self.n_train:,} training examples ({self.n_flipped} labels flipped), "
            f"{self.n_test} test; CNN test accuracy {self.test_accuracy:.1%}",
            f"flipped labels found when checking the top {' / '.join(f'{f:.0%}' for f in FRACTIONS)} "
            "of the training data:",
            f"  {'method':<24}{head}",
        ]
        for name, rec in self.recall.items():
            lines.append(f"  {name:<24}" + "".join(f"{rec[f]:>9.1%}" for f in FRACTIONS))
        if self.fitted is not None:
            lines.append(
                f"  (the CNN fits {self.fitted:.0%} of the flipped labels: their loss stays high, so the loss "
                "finds them about as well as self-influence)"
            )
        if self.memorised is not None:
            m = self.memorised
            lines += [
                f"a wider MLP trained with AdamW until it fits {m['fitted']:.0%} of the flipped labels (it has "
                f"memorised them; test accuracy {m['test_accuracy']:.1%}):",
                f"  {'method':<24}{head}",
            ]
            for name, rec in m["recall"].items():
                lines.append(f"  {name:<24}" + "".join(f"{rec[f]:>9.1%}" for f in FRACTIONS))
            lines.append(
                "  why: once a model has memorised a flipped label, its loss there is small, so the last "
                "checkpoint's loss no longer singles it out; self-influence sums every checkpoint's squared "
                "gradient norm, and while the model was still learning, the flipped examples disagreed with every "
                "similar example and had the largest gradients."
            )
        names = ", ".join(p.name for k, p in self.files.items() if k != "stores")
        lines.append(f"wrote {names} to {self.out} (stores and checkpoints inside) in {self.seconds:.1f} s")
        return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------------
def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DemoOutputError(f"demo output {out} is a file; choose a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise DemoOutputError(
            f"demo output folder {out} is not empty and was not written by the demo; "
            "choose another --out or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by trackin-ooc demo; its files here are replaced on every run\n")


def run_demo(
    out: str | os.PathLike = "./trackin-demo",
    *,
    n_train: int = 1500,
    flip_fraction: float = 0.1,
    epochs: int = 30,
    checkpoint_every: int = 5,
    lr: float = 0.1,
    projection_dim: int | None = 512,
    k: int = 5,
    normalize: bool = True,
    n_show: int = 4,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    say: Callable[[str], None] | None = None,
    torch_threads: int | None = 1,
    memorised_epochs: int | None = MEMORISED_EPOCHS,
) -> DemoResult:
    """Run the demo into ``out`` and return what it found (see :meth:`DemoResult.summary`).

    ``out`` may be new, empty, or a previous demo's folder (whose files are replaced); anything
    else needs ``overwrite=True``. ``say`` receives one line per step (None: silent).

    ``torch_threads`` (default 1) caps torch's CPU threads for the run: this model's batches are so
    small that more threads only spin, and on a busy machine they make training many times slower.

    ``memorised_epochs``: the second experiment, a wider MLP trained with AdamW for that many epochs
    (None: skipped), which memorises most flipped labels: there the last checkpoint's loss misses them
    and self-influence (Adam-aware, from the checkpoints' moments) still finds them.
    """
    import torch

    previous = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    try:
        return _run(
            out,
            n_train=n_train,
            flip_fraction=flip_fraction,
            epochs=epochs,
            checkpoint_every=checkpoint_every,
            lr=lr,
            projection_dim=projection_dim,
            k=k,
            normalize=normalize,
            n_show=n_show,
            seed=seed,
            device=device,
            overwrite=overwrite,
            progress=progress,
            say=say,
            memorised_epochs=memorised_epochs,
        )
    finally:
        torch.set_num_threads(previous)


def _run(
    out,
    *,
    n_train,
    flip_fraction,
    epochs,
    checkpoint_every,
    lr,
    projection_dim,
    k,
    normalize,
    n_show,
    seed,
    device,
    overwrite,
    progress,
    say,
    memorised_epochs,
) -> DemoResult:
    import torch

    import trackin_ooc as to

    from .. import tables
    from .digits import load_digits_split
    from .models import digits_cnn
    from .training import train_with_checkpoints

    say = say or (lambda _msg: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out).expanduser().resolve()
    _prepare(out, overwrite)
    stores = out / "stores"

    def step(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        say(f"{name}: {timings[name]:.1f} s")

    t0 = time.perf_counter()
    split = load_digits_split(n_train=n_train, flip_fraction=flip_fraction, seed=seed)
    model = digits_cnn(seed=seed)
    say(
        f"training a small CNN on {n_train:,} digits ({int(split.flipped.sum())} labels flipped), "
        f"{epochs} epochs of SGD, a checkpoint every {checkpoint_every}"
    )
    checkpoints = train_with_checkpoints(
        model,
        split.train,
        out / "checkpoints",
        epochs=epochs,
        lr=lr,
        checkpoint_every=checkpoint_every,
        seed=seed,
    )
    with torch.no_grad():
        x, y = split.test.tensors
        accuracy = float((model(x).argmax(1) == y).float().mean())
        xs, ys = split.train.tensors
        fitted = float((model(xs).argmax(1) == ys)[torch.from_numpy(split.flipped)].float().mean())
    step("train", t0)

    t0 = time.perf_counter()
    common = dict(projection_dim=projection_dim, seed=seed, overwrite=True, device=device, progress=progress)
    train = to.capture(model, checkpoints, split.train, stores / "train.zarr", **common)
    test = to.capture(model, checkpoints, split.test, stores / "test.zarr", **common)
    step("capture", t0)

    t0 = time.perf_counter()
    si = to.self_influence(train, device=device, progress=progress)
    loss_last = train.to_xarray()["loss"].isel(checkpoint=-1).values
    rng = np.random.default_rng(seed)
    random_scores = rng.permutation(n_train).astype(np.float64)
    methods = {
        "TracIn self-influence": np.asarray(si.values),
        "last-checkpoint loss": np.asarray(loss_last),
        "random": random_scores,
    }
    recall = {name: {f: recall_at(s, split.flipped, f) for f in FRACTIONS} for name, s in methods.items()}
    best = to.top_k(test, train, k=k, normalize=normalize, device=device, progress=progress)
    step("score", t0)

    memorised = None
    if memorised_epochs:
        t0 = time.perf_counter()
        say(
            f"training an MLP {'-'.join(map(str, (64, *MEMORISED_HIDDEN, 10)))} with AdamW for {memorised_epochs} "
            "epochs: it memorises the flipped labels"
        )
        memorised = _memorised(
            split,
            out / "checkpoints_memorised",
            stores / "memorised.zarr",
            epochs=memorised_epochs,
            seed=seed,
            device=device,
            progress=progress,
        )
        step("memorised", t0)

    t0 = time.perf_counter()
    files = {
        "mislabels": out / "mislabels.png",
        "proponents": out / "proponents.png",
        "self_influence": out / "self_influence.csv",
        "top_k": out / "top_k.csv",
    }
    panels = [("SGD-trained CNN", methods)]
    if memorised is not None:
        panels.append(
            (
                f"AdamW MLP, {memorised['fitted']:.0%} of the flipped labels memorised",
                {**memorised.pop("scores"), "random": random_scores},
            )
        )
    _plot_mislabels(files["mislabels"], panels, split.flipped)
    files["proponents"].unlink(missing_ok=True)  # the demo's own folder (MARKER): its files are replaced
    to.show(best, split.train, split.test, n=n_show, k=min(3, k), labels=split.true_train_labels, invert=True).save(
        files["proponents"]
    )
    frame = tables.self_influence_frame(si)
    rows = frame["example"].to_numpy()
    frame["true_label"] = split.true_train_labels[rows]
    frame["flipped"] = split.flipped[rows]
    frame["loss_last_checkpoint"] = loss_last[rows]
    tables.write(frame, files["self_influence"], overwrite=True)
    tables.write_top_k(best, files["top_k"], test=test, train=train, overwrite=True)
    files["stores"] = stores
    step("write", t0)

    return DemoResult(
        out=out,
        files=files,
        recall=recall,
        n_train=n_train,
        n_test=len(split.test),
        n_flipped=int(split.flipped.sum()),
        test_accuracy=accuracy,
        seconds=time.perf_counter() - t_start,
        timings=timings,
        memorised=memorised,
        fitted=fitted,
    )


def _memorised(split, checkpoint_dir: Path, store_path: Path, *, epochs: int, seed: int, device, progress) -> dict:
    """Train the memorising MLP with AdamW, capture self-influence (exact norms, Adam-aware) and losses."""
    import functools

    import torch

    import trackin_ooc as to

    from .models import digits_mlp
    from .recipes import Recipe, train_run

    recipe = Recipe(
        make_model=functools.partial(digits_mlp, MEMORISED_HIDDEN),
        optimizer="adamw",
        lr=3e-3,
        epochs=epochs,
        batch_size=64,
        n_checkpoints=6,
    )
    x, y = split.train.tensors
    model, checkpoints = train_run(recipe, x, y, checkpoint_dir, seed=seed)
    with torch.no_grad():
        fitted = float((model(x).argmax(1) == y)[torch.from_numpy(split.flipped)].float().mean())
        xt, yt = split.test.tensors
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    # A tiny factored store suffices: self-influence from the exact gradient norms every capture records.
    store = to.capture(
        model,
        checkpoints,
        split.train,
        store_path,
        projection_dim=64,
        projection="factored",
        seed=seed,
        overwrite=True,
        device=device,
        progress=progress,
    )
    si = to.self_influence(store, exact_norms=True, device=device, progress=progress)
    scores = {
        "TracIn self-influence": np.asarray(si.values),
        "last-checkpoint loss": np.asarray(store.read_losses()[-1]),
    }
    recall = {name: {f: recall_at(v, split.flipped, f) for f in FRACTIONS} for name, v in scores.items()}
    return {
        "recall": recall,
        "fitted": fitted,
        "test_accuracy": accuracy,
        "scores": scores,
        "preconditioner": store.spec.describe(),
    }


# ---- plots -------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_mislabels(path: Path, panels: list[tuple[str, dict[str, np.ndarray]]], flipped: np.ndarray) -> None:
    """One panel per model: fraction of flipped labels found against fraction of data checked, per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=110, squeeze=False)
    styles = {"TracIn self-influence": "-", "last-checkpoint loss": "--", "random": ":"}
    for ax, (title, methods) in zip(axes[0], panels):
        for name, scores in methods.items():
            x, y = recall_curve(scores, flipped)
            ax.plot(x, y, styles.get(name, "-"), label=f"{name} ({recall_at(scores, flipped, 0.1):.0%} at 10 %)")
        ax.set_xlabel("fraction of training data checked")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Mislabel detection on digits ({int(flipped.sum())} of {len(flipped)} labels flipped)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
