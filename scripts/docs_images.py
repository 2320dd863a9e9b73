#!/usr/bin/env python
"""Regenerate the pictures in docs/images/ from one digits run (the demo's setup, through the public API):

- proponents.png: test digits with their top proponents and opponents (to.show(...).save);
- suspects.png:   the most self-influential training digits, stored and true labels (to.show(...).save);
- report.png:     the top of the HTML report (to.report) as headless Chromium draws it.

    .venv/bin/python scripts/docs_images.py            # needs the demo extra (matplotlib) and chromium
    .venv/bin/python scripts/docs_images.py --out DIR  # somewhere else

chromium: scripts/install_chromium.sh. Takes about a minute on two cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()

    import torch

    import trackin_ooc as to
    from trackin_ooc.demo import digits_cnn, load_digits_split, train_with_checkpoints
    from trackin_ooc.views import browser

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trackin-docs-images-") as tmp:
        tmp = Path(tmp)
        split = load_digits_split(n_train=1500, flip_fraction=0.1, seed=0)
        model = digits_cnn(seed=0)
        ckpts = train_with_checkpoints(model, split.train, tmp / "ckpt", epochs=30, checkpoint_every=5, lr=0.1)
        kw = dict(projection_dim=512, seed=0, progress=False)
        train = to.capture(model, ckpts, split.train, tmp / "train.zarr", **kw)
        test = to.capture(model, ckpts, split.test, tmp / "test.zarr", **kw)

        best = to.top_k(test, train, k=3, normalize=True, progress=False)
        to.show(best, split.train, split.test, n=4, labels=split.true_train_labels, invert=True).save(
            args.out / "proponents.png", overwrite=True)
        si = to.self_influence(train, progress=False)
        to.show(si, split.train, n=16, labels=split.true_train_labels, invert=True).save(
            args.out / "suspects.png", overwrite=True)

        page = to.report(test, train, tmp / "report.html", train_data=split.train, test_data=split.test, k=4,
                         n_test=3, n_suspects=10, labels=split.true_train_labels, invert=True, progress=False)
        shot = browser.screenshot(page, tmp / "report.png", width=1100, height=1500)
        (args.out / "report.png").write_bytes(shot.read_bytes())
    for name in ("proponents.png", "suspects.png", "report.png"):
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
