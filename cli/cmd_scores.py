"""``self-influence``, ``influence`` and ``top-k``: scores from gradient stores, written to files."""

from __future__ import annotations

import time

import click

from .settings import Settings, pass_settings, plural, rate

OUT_HELP = "Output file: .csv, .parquet or .zarr (by extension)."
OVERWRITE_HELP = "Replace an earlier output of this command (never an input store or another kind of output)."


@click.command("self-influence")
@click.argument("store", metavar="STORE")
@click.option("--out", required=True, metavar="FILE", help=OUT_HELP)
@click.option(
    "--exact-norms",
    is_flag=True,
    help="Exact gradient norms stored by the capture instead of the projected features' norms.",
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@pass_settings
def self_influence(settings: Settings, store, out, exact_norms, overwrite):
    """Self-influence of every example of STORE: which labels are wrong (high: likely mislabelled or unusual).

    Rows are sorted by rank (1 = highest self-influence), with example ids and labels where the
    store has them.
    """
    import trackin_ooc as to
    from trackin_ooc import tables
    from trackin_ooc.summary import open_gradient_store

    tables.check_output(out, overwrite=overwrite, inputs=[store])
    st = open_gradient_store(store).require_complete()
    t0 = time.perf_counter()
    with settings.client():
        si = to.self_influence(st, device=settings.device, progress=settings.progress, exact_norms=exact_norms)
    path = tables.write_self_influence(si, out, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    settings.done(
        f"wrote self-influence of {plural(st.n_examples, 'example')} "
        f"({plural(st.n_checkpoints, 'checkpoint')}) to {path} in {seconds:.1f} s "
        f"({rate(st.n_examples, seconds, 'examples')})"
    )


@click.command("influence")
@click.option("--train", "train", required=True, metavar="STORE", help="The training examples' gradient store.")
@click.option("--test", "test", required=True, metavar="STORE", help="The test examples' gradient store.")
@click.option("--out", required=True, metavar="OUT.zarr", help="Where the (test, train) matrix goes (Zarr).")
@click.option("--normalize", is_flag=True, help="Cosine similarity of gradients instead of dot products.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@pass_settings
def influence(settings: Settings, train, test, out, normalize, overwrite):
    """The full (test, train) influence matrix, written block by block to a Zarr group.

    Raw scores by default: what moved each test loss most (--normalize: cosine, what looks most alike).

    Read it back with xarray.open_zarr(OUT) (variable "influence", dims test and train).
    """
    import trackin_ooc as to
    from trackin_ooc import tables
    from trackin_ooc.outputs import is_unfinished
    from trackin_ooc.summary import human_bytes, open_gradient_store, store_info

    # An unfinished influence output is left for the library to resume (or to refuse if it was started
    # by another job); anything else follows the output rule.
    tables.check_output(
        out, overwrite=overwrite, allowed=(".zarr",), kind="influence", inputs=[train, test], resumable=True
    )
    te, tr = open_gradient_store(test).require_complete(), open_gradient_store(train).require_complete()
    t0 = time.perf_counter()
    try:
        with settings.client():
            to.influence(
                te,
                tr,
                out=out,
                normalize=normalize,
                device=settings.device,
                memory_limit=settings.scoring_memory_limit,
                overwrite=overwrite,
                progress=settings.progress,
            )
    except Exception as e:
        if not is_unfinished(out, "influence"):
            raise
        from .errors import describe

        raise to.StoreError(
            f"influence failed: {describe(e)}; the partial output {out} keeps its finished "
            "blocks: rerun the same command to resume it"
        ) from e
    seconds = time.perf_counter() - t0
    info = store_info(out)
    pairs = te.n_examples * tr.n_examples
    settings.done(
        f"wrote the {te.n_examples:,} × {tr.n_examples:,} influence matrix"
        f"{' (normalized)' if normalize else ''} to {info['path']} in {seconds:.1f} s "
        f"({rate(pairs, seconds, 'pairs')}, {human_bytes(info['size_on_disk'])} on disk)"
    )


@click.command("top-k")
@click.option("--train", "train", required=True, metavar="STORE", help="The training examples' gradient store.")
@click.option("--test", "test", required=True, metavar="STORE", help="The test examples' gradient store.")
@click.option(
    "-k",
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    metavar="N",
    help="Proponents and opponents per test example.",
)
@click.option("--out", required=True, metavar="FILE", help=OUT_HELP)
@click.option(
    "--normalize/--raw",
    default=True,
    show_default=True,
    help="--normalize: cosine TracIn, the training examples most like each test example (to the model). "
    "--raw: dot products, what moved each test loss most; examples with large gradients (often "
    "mislabelled) then rank high for many test examples. docs/quality.md measures both.",
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option(
    "--index",
    "use_index",
    is_flag=True,
    help="Read only the lists of the train store's index (trackin-ooc index TRAIN, built for the same "
    "--normalize/--raw) nearest each test example: exact scores, approximate membership.",
)
@click.option(
    "--probe",
    "n_probe",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --index: lists read per test example and end (default: calibrated for recall@10 >= 0.95).",
)
@pass_settings
def top_k(settings: Settings, train, test, k, out, normalize, overwrite, use_index, n_probe):
    """Exact top-k proponents (highest scores) and opponents (lowest) of every test example.

    One row per (test example, rank): the proponent and the opponent at that rank (1 = strongest),
    their scores and train example ids, and labels where the stores have them. Cosine scores by default:
    the training examples most like each test example; measured (docs/quality.md), 0-6 % of their top 10
    are mislabelled examples against 19-72 % of the raw top 10. --raw: what moved each test loss most
    (raw scores predict retraining as well or better, up to 1.4x the LDS; 2x on K-FAC stores).
    """
    if n_probe is not None and not use_index:
        raise click.UsageError("--probe needs --index")
    import trackin_ooc as to
    from trackin_ooc import tables
    from trackin_ooc.summary import open_gradient_store

    tables.check_output(out, overwrite=overwrite, inputs=[train, test])
    te, tr = open_gradient_store(test).require_complete(), open_gradient_store(train).require_complete()
    t0 = time.perf_counter()
    with settings.client():
        result = to.top_k(
            te,
            tr,
            k=k,
            normalize=normalize,
            device=settings.device,
            memory_limit=settings.scoring_memory_limit,
            progress=settings.progress,
            index=True if use_index else None,
            n_probe=n_probe,
        )
    path = tables.write_top_k(result, out, test=te, train=tr, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    pairs = te.n_examples * tr.n_examples
    how = (
        f"index, {result.attrs['n_probe']} lists per end, {100 * result.attrs['fraction_read']:.1f} % of rows read"
        if use_index
        else rate(pairs, seconds, "pairs")
    )
    settings.done(
        f"wrote the top {k} proponents and opponents of {te.n_examples:,} test examples among "
        f"{tr.n_examples:,} train ({'cosine' if normalize else 'raw'} scores) to {path} in {seconds:.1f} s ({how})"
    )
