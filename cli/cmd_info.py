"""``trackin-ooc info``: what a gradient store (or an influence output) holds."""

from __future__ import annotations

import json

import click

from .settings import Settings, pass_settings


@click.command("info")
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
@click.option(
    "--verify",
    is_flag=True,
    help="Read every chunk and check its crc32c checksum; exit 1 and list the bad chunks if any.",
)
@pass_settings
def info(settings: Settings, store, as_json, verify):
    """Summarise STORE: examples, checkpoints and learning rates, projection, dtype, size, completeness.

    Works on incomplete stores too (an interrupted capture), and on influence outputs.
    """
    from trackin_ooc.errors import CorruptChunkError
    from trackin_ooc.summary import format_info, open_gradient_store, store_info

    summary = store_info(store)
    bad = None
    if verify:
        bad = [str(b) for b in open_gradient_store(store).verify()]
        summary["verified"] = {"bad_chunks": bad}
    click.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))
    if bad is not None and not as_json:
        click.echo("verify: all chunks intact" if not bad else f"verify: {len(bad)} bad chunk(s):")
        for line in bad:
            click.echo(f"  {line}")
    if bad:
        raise CorruptChunkError(
            f"{len(bad)} chunk(s) of {summary['path']} failed their checksum (first: {bad[0]}); "
            "re-capture or restore the store"
        )
