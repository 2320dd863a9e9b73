"""``trackin-ooc capture``: per-example gradients of a dataset at every checkpoint → a gradient store."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import click

from .settings import Settings, pass_settings, plural, rate

PROJECTIONS = ("gaussian", "rademacher", "factored", "factors")  # factors: exact, per-layer factors
DTYPES = ("float32", "float16", "bfloat16")
PRECONDITIONERS = ("auto", "adam", "adafactor", "kfac", "none")  # capture(preconditioner=...)


def _ref(ctx, param, value):
    """Check the MOD:FN form while parsing (a usage error); importing it comes later, in the library."""
    if value is None:
        return None
    mod, sep, fn = value.strip().rpartition(":")
    if not sep or not mod or not all(part.isidentifier() for part in fn.split(".")):
        raise click.BadParameter(
            f"{value!r} is not of the form MOD:FN; name a module (package.module:function) "
            "or a file (path/to/file.py:function)"
        )
    return value


def _layers(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise click.BadParameter(
            "give at least one module or parameter name, e.g. --layers conv2,fc", param_hint="'--layers'"
        )
    return names


# The --model option of every command that loads the user's model.
model_option = click.option(
    "--model",
    "model_ref",
    required=True,
    metavar="MOD:FN",
    callback=_ref,
    help="Zero-argument callable returning the torch model (module:function or file.py:function).",
)


@click.command("capture")
@model_option
@click.option(
    "--data",
    "data_ref",
    required=True,
    metavar="MOD:FN",
    callback=_ref,
    help="Zero-argument callable returning the dataset (a torch Dataset, or a non-shuffling DataLoader).",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    metavar="PATH",
    help="A checkpoint: a torch file (state dict, optionally with its learning rate or optimizer state), "
    "a .safetensors file, a Hugging Face Trainer checkpoint-N folder, or a run folder of them "
    "(all its checkpoint-N folders, in step order); repeat in training order. Required "
    "unless --like names a store that records its checkpoints.",
)
@click.option(
    "--lr",
    "lrs",
    multiple=True,
    type=float,
    metavar="X",
    help="Learning rate of each checkpoint, one --lr per checkpoint (a run folder counts as its "
    "checkpoint-N folders; default: read from the checkpoints).",
)
@click.option(
    "--out", required=True, metavar="STORE", help="Where the gradient store goes (a folder, e.g. train.zarr)."
)
@click.option(
    "--like",
    "like",
    metavar="TRAIN_STORE",
    help="Capture with TRAIN_STORE's options (checkpoints, learning rates, layers, projection, seed, "
    "dtype, preconditioner, target key), so the new store combines with it.",
)
@click.option("--layers", metavar="A,B", help="Comma-separated module or parameter names (default: all trainable).")
@click.option(
    "--projection-dim",
    type=click.IntRange(min=1),
    metavar="K",
    help="Project gradients to K dimensions (default: exact gradients).",
)
@click.option(
    "--projection",
    type=click.Choice(PROJECTIONS),
    default="gaussian",
    show_default=True,
    help="Kind of random projection (with --projection-dim); 'factors' (without it): exact "
    "gradients, per-layer factors where cheaper.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random projection.")
@click.option(
    "--preconditioner",
    type=click.Choice(PRECONDITIONERS),
    default="auto",
    show_default=True,
    help="adam: store features of P^1/2 g, P = 1/(sqrt(v_hat)+eps) from each checkpoint's Adam moments "
    "(factored layers: their rank-1 Adafactor form); adafactor: the rank-1 form for every weight "
    "matrix; none: plain gradients (the SGD form); auto: kfac with --curvature, else adam when every "
    "checkpoint carries Adam moments, else none; kfac: P = (F + damping)^-1 from the EK-FAC "
    "curvature of --curvature (trackin-ooc fit-curvature on the train data). Capture test stores "
    "like their train store (docs/preconditioning.md).",
)
@click.option(
    "--curvature",
    metavar="FILE",
    help="For --preconditioner kfac (auto picks it with this): the curvature file trackin-ooc "
    "fit-curvature wrote (the same for the train and the test store).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    metavar="B",
    help="Examples per batch of per-example gradients.",
)
@click.option(
    "--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Storage dtype of the gradients."
)
@click.option(
    "--loss",
    "loss_ref",
    metavar="MOD:FN",
    callback=_ref,
    help="Zero-argument callable returning (outputs, targets) -> per-example losses "
    "(default: cross-entropy, or the causal LM loss summed over tokens for (B, T, V) logits).",
)
@click.option(
    "--target-key",
    default="labels",
    show_default=True,
    metavar="KEY",
    help="Where dict (Hugging Face style) batches hold the targets; the model gets the other entries.",
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    metavar="N",
    help="Rows per stored chunk and row block (default: about 8 MiB of gradients per chunk).",
)
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Store examples with NaN/inf gradients or losses as zeros and flag them (default: refuse).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing store at --out (default: resume an "
    "incomplete one left by the same capture, refuse a complete one).",
)
@pass_settings
def capture(
    settings: Settings,
    model_ref,
    data_ref,
    checkpoints,
    lrs,
    out,
    like,
    layers,
    projection_dim,
    projection,
    seed,
    preconditioner,
    curvature,
    batch_size,
    dtype,
    loss_ref,
    target_key,
    chunk_rows,
    allow_nonfinite,
    overwrite,
):
    """Capture per-example loss gradients at every checkpoint into a gradient store.

    Rerunning a capture that was killed resumes it: only the row blocks it had not written are
    computed. With --scheduler-address, --scheduler-file, --workers or --cluster the row blocks are
    computed as Dask tasks on the cluster's workers.

    \b
    Example:
      trackin-ooc capture --model trackin_ooc.demo.examples:digits_cnn_model \\
          --data trackin_ooc.demo.examples:digits_train \\
          --checkpoint ckpt/epoch_005.pt --checkpoint ckpt/epoch_010.pt \\
          --projection-dim 512 --out train.zarr
      trackin-ooc capture --like train.zarr --model trackin_ooc.demo.examples:digits_cnn_model \\
          --data trackin_ooc.demo.examples:digits_test --out test.zarr
    """
    if like is not None:
        _check_like_options(click.get_current_context())
    elif not checkpoints:
        raise click.UsageError("Missing option '--checkpoint' (or --like TRAIN_STORE: its checkpoints and options)")
    # A run folder expands to several checkpoints: the library counts --lr against that expansion.
    if lrs and len(lrs) != len(checkpoints) and not any(os.path.isdir(c) for c in checkpoints):
        raise click.BadParameter(
            f"{len(lrs)} --lr for {len(checkpoints)} --checkpoint; give one --lr per checkpoint or none",
            param_hint="'--lr'",
        )
    layer_names = _layers(layers)
    if projection == "factors" and projection_dim is not None:
        raise click.BadParameter(
            "--projection factors keeps gradients exact: leave out --projection-dim", param_hint="'--projection'"
        )
    if projection not in ("gaussian", "factors") and projection_dim is None:
        raise click.BadParameter("--projection needs --projection-dim K", param_hint="'--projection'")

    import trackin_ooc as to
    from trackin_ooc import refs
    from trackin_ooc.outputs import check_capture_output, is_remote, is_unfinished
    from trackin_ooc.summary import human_bytes, store_info

    # The output rule (kind "gradients": --overwrite replaces only an earlier gradient store), then
    # without --overwrite a complete store is refused and an incomplete one resumed.
    check_capture_output(out, overwrite=overwrite)
    model = refs.load_model(model_ref)
    data = refs.load_dataset(data_ref)
    loss_fn = refs.load_loss(loss_ref) if loss_ref else None
    existed = os.path.lexists(out)
    # Replacing a store: capture next to it and swap only on success, so that a failed capture
    # (a bad checkpoint, a crash, Ctrl-C) leaves the old store as it was.
    staging = _staging_dir(out) if overwrite and existed and not is_remote(out) else None
    target = os.path.join(staging, os.path.basename(os.path.abspath(out))) if staging else out
    t0 = time.perf_counter()
    try:
        with settings.client() as client, settings.plan_lines({target: out} if staging else None):
            common = dict(
                batch_size=batch_size,
                overwrite=overwrite,
                device=settings.device,
                progress=settings.progress,
                chunk_rows=chunk_rows,
                nonfinite="flag" if allow_nonfinite else "raise",
                client=client,
            )
            if like is not None:
                ctx = click.get_current_context()
                given = {k: v for k, v in (("dtype", dtype), ("target_key", target_key)) if _given(ctx, k)}
                if loss_ref:
                    given["loss_fn"] = loss_fn
                if checkpoints:
                    given["checkpoints"] = list(checkpoints)
                if curvature:
                    given["curvature"] = curvature
                store = to.capture_like(like, model, data, target, **given, **common)
            else:
                store = to.capture(
                    model,
                    list(checkpoints),
                    data,
                    target,
                    learning_rates=list(lrs) if lrs else None,
                    loss_fn=loss_fn,
                    layers=layer_names,
                    projection_dim=projection_dim,
                    projection=projection,
                    seed=seed,
                    dtype=dtype,
                    target_key=target_key,
                    preconditioner=preconditioner,
                    curvature=curvature,
                    **common,
                )
        if staging:
            _swap_in(target, out)
            store = to.open_store(out)
    except BaseException as e:
        from .errors import describe

        what = "interrupted" if isinstance(e, KeyboardInterrupt) else describe(e)
        if staging:
            raise to.CaptureError(f"capture failed: {what}; the existing store {out} was left as it was") from e
        if is_unfinished(out, "gradients"):
            raise to.CaptureError(
                f"capture failed: {what}; the partial store {out} is incomplete (scoring refuses it): "
                "rerun the same command to resume it, or with --overwrite to start over"
            ) from e
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - t0
    info = store_info(store)
    settings.done(
        f"captured {plural(store.n_examples, 'example')} × {plural(store.n_checkpoints, 'checkpoint')} "
        f"({store.spec.describe()}) into {store.path} in {seconds:.1f} s "
        f"({rate(store.n_examples, seconds, 'examples')}, {human_bytes(info['size_on_disk'])} on disk)"
    )


# What --like takes from the train store (by click parameter name): giving them too is a usage error.
LIKE_FIXED = {
    "projection": "--projection",
    "projection_dim": "--projection-dim",
    "seed": "--seed",
    "layers": "--layers",
    "lrs": "--lr",
    "preconditioner": "--preconditioner",
}


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option ``name`` on the command line (not its default)."""
    from click.core import ParameterSource

    return name in ctx.params and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _check_like_options(ctx: click.Context) -> None:
    given = [flag for name, flag in LIKE_FIXED.items() if _given(ctx, name)]
    if given:
        raise click.UsageError(
            f"--like takes {', '.join(given)} from the train store (another value would not combine with it); "
            "leave {} out".format("it" if len(given) == 1 else "them")
        )


def _staging_dir(out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.staging-", dir=parent)


def _swap_in(new: str, out: str) -> None:
    """Replace ``out`` (a store folder, or whatever was there) by the finished store at ``new``."""
    old = f"{new}.old"
    os.replace(out, old)  # same filesystem: atomic; the old store is removed with the staging folder
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
