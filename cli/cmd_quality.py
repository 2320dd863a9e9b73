"""``retrain`` and ``lds``: measure how well the scores predict retraining (the linear datamodeling score)."""

from __future__ import annotations

import inspect
import sys
import time

import click

from .settings import Settings, pass_settings, plural

TRAIN_FN_HELP = (
    "train_fn(indices, seed) -> test losses (or a zero-argument callable returning it): trains a "
    "fresh model on the training examples at indices and returns one loss per test example."
)


def _train_fn(ref: str):
    """The train function ``ref`` names: the function itself (two parameters), or what a zero-argument
    factory returns. Functions from a file are pickled by value, so that cluster workers need not import it."""
    from trackin_ooc.refs import LoadError, call, resolve

    fn = resolve(ref)
    try:
        params = inspect.signature(fn).parameters.values()
        required = [
            p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        required = [None, None]
    if not required:
        fn = call(ref, "train function")
    if not callable(fn):
        raise LoadError(f"{ref!r} returned a {type(fn).__name__}; name a function (indices, seed) -> test losses")
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is not None and module.__name__.startswith("_trackin_ooc_user_"):
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    return fn


@click.command("retrain")
@click.option("--train-fn", "train_fn", required=True, metavar="MOD:FN", help=TRAIN_FN_HELP)
@click.option(
    "--n-train",
    "n_train",
    required=True,
    type=click.IntRange(min=2),
    metavar="N",
    help="Training examples (rows of the train store); subsets are drawn from 0..N-1.",
)
@click.option(
    "--out",
    required=True,
    metavar="RUNS.zarr",
    help="Where each finished retraining is written (rerun the same command to resume).",
)
@click.option(
    "--subsets",
    "n_subsets",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    metavar="N",
    help="Retrainings.",
)
@click.option(
    "--fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    metavar="F",
    help="Share of the training examples in each subset.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="S",
    help="Fixes the subsets and each retraining's seed.",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier retraining output at RUNS.zarr.")
@pass_settings
def retrain(settings: Settings, train_fn, n_train, out, n_subsets, fraction, seed, overwrite):
    """Retrain on random subsets of the training data and record each model's test losses.

    Each retraining is a Dask task (on the cluster the global options name, else in this process, one
    at a time) and is written to RUNS.zarr as soon as it finishes; rerunning the same command skips the
    retrainings already written. Then measure the scores with trackin-ooc lds --runs RUNS.zarr.
    """
    import numpy as np

    import trackin_ooc as to

    fn = _train_fn(train_fn)
    done_before = 0
    try:
        prior = to.open_runs(out)
        if prior.attrs.get("n_subsets") == n_subsets and not overwrite:
            done_before = int(np.isfinite(prior["output"].values).all(axis=1).sum()) if prior.sizes["test"] else 0
    except to.StoreError:
        pass
    t0 = time.perf_counter()
    with settings.client() as client:
        runs = to.retrain(
            fn,
            n_train,
            n_subsets=n_subsets,
            fraction=fraction,
            seed=seed,
            out=out,
            overwrite=overwrite,
            progress=settings.progress,
            client=client,
        )
    seconds = time.perf_counter() - t0
    again = f", {done_before} of them already there" if done_before else ""
    settings.done(
        f"wrote {plural(n_subsets, 'retraining')} ({runs.attrs['subset_size']:,} of {n_train:,} training examples "
        f"each, {runs.sizes['test']:,} test losses) to {runs.attrs['path']} in {seconds:.1f} s{again}"
    )


@click.command("lds")
@click.option("--train", "train", required=True, metavar="STORE", help="The training examples' gradient store.")
@click.option("--test", "test", required=True, metavar="STORE", help="The test examples' gradient store.")
@click.option(
    "--runs",
    "runs",
    required=True,
    metavar="RUNS.zarr",
    help="Retrainings on subsets of the train store's examples (trackin-ooc retrain, to.retrain).",
)
@click.option("--normalize", is_flag=True, help="Measure cosine TracIn instead of the dot-product scores.")
@click.option("--out", metavar="FILE", help="Per-test-example LDS: .csv, .parquet or .zarr (by extension).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier table at FILE.")
@pass_settings
def lds(settings: Settings, train, test, runs, normalize, out, overwrite):
    """The linear datamodeling score: how well the scores predict the test losses of retrained models.

    For each test example, the Spearman correlation over the retrainings between the summed scores of
    the training examples each one kept and minus the test loss it produced; prints the mean (higher
    is better; 0 is chance). One pass over each store: the influence matrix is never formed.
    """
    import pandas as pd

    import trackin_ooc as to
    from trackin_ooc import tables
    from trackin_ooc.summary import open_gradient_store

    if out is not None:
        tables.check_output(out, overwrite=overwrite, inputs=[train, test, runs])
    te, tr = open_gradient_store(test).require_complete(), open_gradient_store(train).require_complete()
    t0 = time.perf_counter()
    with settings.client() as client:
        result = to.lds(
            te,
            tr,
            runs,
            normalize=normalize,
            device=settings.device,
            memory_limit=settings.scoring_memory_limit,
            progress=settings.progress,
            client=client,
        )
    seconds = time.perf_counter() - t0
    written = ""
    if out is not None:
        cols = {"test": result["test"].values}
        if te.has_labels:
            cols["test_label"] = te.labels()
        cols["lds"] = result.values
        frame = pd.DataFrame(cols)
        table = frame if not out.lower().endswith(".zarr") else frame.set_index("test").to_xarray()
        written = f"; per-example values in {tables.write(table, out, overwrite=overwrite, inputs=[te, tr, runs])}"
    how = "cosine TracIn" if normalize else "TracIn"
    undefined = result.attrs["n_undefined"]
    skipped = f" ({undefined} without a defined correlation left out)" if undefined else ""
    click.echo(
        f"LDS {result.attrs['lds']:.4f} ({how}; mean over {plural(te.n_examples, 'test example')}{skipped}, "
        f"{plural(result.attrs['n_subsets'], 'retraining')}) in {seconds:.1f} s{written}"
    )
