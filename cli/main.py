"""Entry point of the ``trackin-ooc`` command (the full CLI arrives with issue 5)."""

from __future__ import annotations

import click

from trackin_ooc import __version__


@click.group()
@click.version_option(__version__)
def cli() -> None:
    """TracIn training-data influence, out of core."""


def main() -> None:
    cli()
