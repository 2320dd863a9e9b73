"""``trackin-ooc fit-curvature``: the EK-FAC curvature at every checkpoint, for ``capture --preconditioner kfac``."""

from __future__ import annotations

import time

import click

from .cmd_capture import _layers, _ref, model_option
from .settings import Settings, pass_settings, plural


@click.command("fit-curvature")
@model_option
@click.option(
    "--data",
    "data_ref",
    required=True,
    metavar="MOD:FN",
    callback=_ref,
    help="Zero-argument callable returning the TRAIN dataset (the curvature is the train data's).",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    required=True,
    metavar="PATH",
    help="A checkpoint, as for capture; repeat in training order (the same ones the stores use).",
)
@click.option("--out", required=True, metavar="FILE", help="Where the curvature goes (a torch file).")
@click.option(
    "--layers",
    metavar="A,B",
    help="Comma-separated Linear/Conv module or parameter names, as capture's --layers (default: all).",
)
@click.option(
    "--damping",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    metavar="X",
    help="Damping of each layer as a multiple of its mean eigenvalue.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=256, show_default=True, metavar="B", help="Examples per batch."
)
@click.option(
    "--loss",
    "loss_ref",
    metavar="MOD:FN",
    callback=_ref,
    help="Zero-argument callable returning (outputs, targets) -> per-example losses (as capture's).",
)
@click.option(
    "--target-key",
    default="labels",
    show_default=True,
    metavar="KEY",
    help="Where dict (Hugging Face style) batches hold the targets.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --out.")
@pass_settings
def fit_curvature(
    settings: Settings,
    model_ref,
    data_ref,
    checkpoints,
    out,
    layers,
    damping,
    batch_size,
    loss_ref,
    target_key,
    overwrite,
):
    """Fit the EK-FAC curvature of the model's Linear and Conv layers at every checkpoint on the train data.

    Then capture the train and the test store with --preconditioner kfac --curvature FILE: their
    scores are Σ_c η_c g'ᵀ (F_c + damping)^-1 g, the curvature-aware TracIn (docs/quality.md).

    \b
    Example:
      trackin-ooc fit-curvature --model trackin_ooc.demo.examples:digits_cnn_model \\
          --data trackin_ooc.demo.examples:digits_train \\
          --checkpoint ckpt/epoch_005.pt --checkpoint ckpt/epoch_010.pt --out curvature.pt
      trackin-ooc capture ... --preconditioner kfac --curvature curvature.pt --out train.zarr
    """
    import os

    import trackin_ooc as to
    from trackin_ooc import refs

    if os.path.exists(out) and not overwrite:
        raise to.CaptureError(f"{out} exists; pass --overwrite to replace it")
    model = refs.load_model(model_ref)
    data = refs.load_dataset(data_ref)
    loss_fn = refs.load_loss(loss_ref) if loss_ref else None
    t0 = time.perf_counter()
    import torch

    gpu = settings.device == "gpu" or (settings.device == "auto" and torch.cuda.is_available())
    device = "cuda" if gpu else "cpu"
    curvature = to.fit_curvature(
        model,
        list(checkpoints),
        data,
        out,
        layers=_layers(layers),
        damping=damping,
        loss_fn=loss_fn,
        batch_size=batch_size,
        target_key=target_key,
        device=device,
        overwrite=overwrite,
    )
    settings.done(
        f"fitted the curvature of {plural(len(curvature.layers[0]), 'layer')} at "
        f"{plural(len(curvature.layers), 'checkpoint')} on {plural(curvature.n_examples, 'example')} "
        f"into {out} in {time.perf_counter() - t0:.1f} s"
    )
