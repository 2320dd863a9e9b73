"""``trackin-ooc report``: one self-contained HTML page of a train and a test store and their examples."""

from __future__ import annotations

import time

import click

from .settings import Settings, pass_settings


@click.command("report")
@click.option("--train", "train", required=True, metavar="STORE", help="The training examples' gradient store.")
@click.option("--test", "test", required=True, metavar="STORE", help="The test examples' gradient store.")
@click.option(
    "--train-data",
    "train_ref",
    metavar="MOD:FN",
    help="Zero-argument callable returning the training dataset (to draw the examples).",
)
@click.option("--test-data", "test_ref", metavar="MOD:FN", help="... and the test dataset.")
@click.option("--out", required=True, metavar="FILE.html", help="The report (one HTML file, opens without a network).")
@click.option(
    "-k",
    "k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Proponents and opponents per test example.",
)
@click.option(
    "--test-examples",
    "n_test",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Test examples shown with their proponents and opponents.",
)
@click.option(
    "--suspects",
    "n_suspects",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Most self-influential training examples shown.",
)
@click.option(
    "--normalize/--raw",
    default=True,
    show_default=True,
    help="Proponents and opponents by cosine TracIn (as top-k), or by raw dot products.",
)
@click.option(
    "--tokenizer",
    "tokenizer_ref",
    metavar="MOD:FN",
    help="Zero-argument callable returning a tokenizer (anything with decode): token ids shown as text.",
)
@click.option("--target-key", default="labels", show_default=True, help="The target's key in dict examples.")
@click.option("--invert", is_flag=True, help="Draw grayscale pictures dark on white.")
@click.option("--title", metavar="TEXT", help="The page's title.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report at FILE (never an input or other file).")
@pass_settings
def report(
    settings: Settings,
    train,
    test,
    train_ref,
    test_ref,
    out,
    k,
    n_test,
    n_suspects,
    normalize,
    tokenizer_ref,
    target_key,
    invert,
    title,
    overwrite,
):
    """Write one HTML page about TRAIN and TEST: the stores, suspects (highest self-influence), the first
    test examples with their proponents and opponents, the most helpful and harmful training examples,
    each checkpoint's share of the scores and the score distribution.

    Pictures are embedded and the page loads nothing from anywhere: it opens offline, by mail, on a
    cluster's login node. Without --train-data the examples are shown by id and label only.
    """
    import trackin_ooc as to
    from trackin_ooc import refs
    from trackin_ooc.outputs import check_file_output
    from trackin_ooc.summary import open_gradient_store

    check_file_output(out, what="report", overwrite=overwrite, inputs=[train, test])
    tr = open_gradient_store(train).require_complete()
    te = open_gradient_store(test).require_complete()
    train_data = refs.call(train_ref, "dataset") if train_ref else None
    test_data = refs.call(test_ref, "dataset") if test_ref else None
    tokenizer = refs.call(tokenizer_ref, "tokenizer") if tokenizer_ref else None
    t0 = time.perf_counter()
    with settings.client():
        path = to.report(
            te,
            tr,
            out,
            train_data=train_data,
            test_data=test_data,
            k=min(k, tr.n_examples),
            n_test=n_test,
            n_suspects=n_suspects,
            normalize=normalize,
            tokenizer=tokenizer,
            target_key=target_key,
            invert=invert,
            title=title,
            overwrite=overwrite,
            progress=settings.progress,
        )
    settings.done(
        f"wrote the report of {tr.n_examples:,} training and {te.n_examples:,} test examples to {path} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
