"""``index`` and ``net-influence``: fast answers on big train stores (an index for top-k, influence summed
over a test set)."""

from __future__ import annotations

import time

import click

from .settings import Settings, pass_settings, plural

OUT_HELP = "Output file: .csv, .parquet or .zarr (by extension)."


@click.command("index")
@click.argument("store", metavar="TRAIN")
@click.option(
    "--lists",
    "n_lists",
    type=click.IntRange(min=1),
    metavar="N",
    help="Inverted lists (k-means cells); default about the square root of the number of examples.",
)
@click.option(
    "--normalize/--raw",
    default=True,
    show_default=True,
    help="An index for cosine queries (top-k's default) or, with --raw, for top-k --index --raw.",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier index of TRAIN.")
@pass_settings
def index(settings: Settings, store, n_lists, normalize, overwrite):
    """Build the top-k index of TRAIN, saved inside TRAIN's folder (used by top-k --index).

    Train rows are grouped into lists of similar gradients, each stored as one contiguous run, so
    that a query reads only the lists nearest its test examples and scores them exactly. The default
    number of lists read (--probe) is calibrated for recall@10 >= 0.95. Rerun after an interruption
    to resume; rebuild (--overwrite) after TRAIN is rewritten.
    """
    import trackin_ooc as to
    from trackin_ooc.summary import human_bytes, open_gradient_store

    st = open_gradient_store(store).require_complete()
    if n_lists is not None and n_lists > st.n_examples:
        raise click.BadParameter(
            f"{n_lists} lists for {st.n_examples:,} examples; use at most {st.n_examples}", param_hint="--lists"
        )
    t0 = time.perf_counter()
    with settings.client():
        idx = to.build_index(
            st,
            n_lists=n_lists,
            normalize=normalize,
            overwrite=overwrite,
            memory_limit=settings.scoring_memory_limit,
            progress=settings.progress,
        )
    seconds = time.perf_counter() - t0
    cal = idx.calibration
    quality = ""
    if not idx.structured:
        quality = f"; {idx.verdict}"
    elif "fraction_read" in cal:
        pro, opp = idx.rules()
        quality = (
            f"; by default (--probe: {pro.n_probe} lists for proponents, {opp.n_probe} for opponents) a "
            f"test example reads {100 * cal['fraction_read']:.2f} % of rows, recall@10 {cal['recall']:.2f} "
            "(the lower end) on held-out queries"
        )
    settings.done(
        f"indexed {plural(st.n_examples, 'train example')} into {plural(idx.n_lists, 'list')} at {idx.path} in "
        f"{seconds:.1f} s ({human_bytes(idx.nbytes)}){quality}"
    )


@click.command("net-influence")
@click.option("--train", "train", required=True, metavar="STORE", help="The training examples' gradient store.")
@click.option("--test", "test", required=True, metavar="STORE", help="The test (validation) examples' store.")
@click.option("--by-label", is_flag=True, help="One sum per test label instead of one over the whole test set.")
@click.option("--normalize", is_flag=True, help="Cosine similarity of gradients instead of dot products.")
@click.option("--out", required=True, metavar="FILE", help=OUT_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an earlier table at FILE.")
@pass_settings
def net_influence(settings: Settings, train, test, by_label, normalize, out, overwrite):
    """Influence of every training example summed over the test set (or over each test label).

    Positive: the example lowers the test losses (helps); negative: raises them (hurts; check its label).
    One row per train example (and test label with --by-label), rank 1 = most helpful, with train example
    ids and labels where the stores have them. One pass over each store.
    """
    import trackin_ooc as to
    from trackin_ooc import tables
    from trackin_ooc.summary import open_gradient_store

    fmt = tables.check_output(out, overwrite=overwrite, inputs=[train, test])
    te, tr = open_gradient_store(test).require_complete(), open_gradient_store(train).require_complete()
    t0 = time.perf_counter()
    with settings.client():
        net = to.net_influence(
            te,
            tr,
            by="label" if by_label else None,
            normalize=normalize,
            memory_limit=settings.scoring_memory_limit,
            progress=settings.progress,
        )
    table = tables.net_influence_dataset(net) if fmt == ".zarr" else tables.net_influence_frame(net)
    path = tables.write(table, out, overwrite=overwrite, inputs=[te, tr])
    seconds = time.perf_counter() - t0
    groups = f" per label ({plural(net.sizes['group'], 'label')})" if by_label else ""
    settings.done(
        f"wrote the net influence of {plural(tr.n_examples, 'train example')} on "
        f"{plural(te.n_examples, 'test example')}{groups} to {path} in {seconds:.1f} s"
    )
