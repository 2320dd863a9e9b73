"""``trackin-ooc info``: what a gradient store (or an influence output) holds."""

from __future__ import annotations

import json

import click

from .settings import Settings, pass_settings


@click.command("info")
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
@pass_settings
def info(settings: Settings, store, as_json):
    """Summarise STORE: examples, checkpoints and learning rates, projection, dtype, size, completeness.

    Works on incomplete stores too (an interrupted capture), and on influence outputs.
    """
    from trackin_ooc.summary import format_info, store_info

    summary = store_info(store)
    click.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))
