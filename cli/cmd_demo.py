"""``trackin-ooc demo``: the mislabel experiment on digits, end to end (what ``make demo`` runs)."""

from __future__ import annotations

import click

from .settings import Settings, pass_settings


@click.command("demo")
@click.option(
    "--out",
    default="./trackin-demo",
    show_default=True,
    metavar="DIR",
    help="Folder for plots, tables, checkpoints and stores (a previous demo's folder is reused).",
)
@click.option("--overwrite", is_flag=True, help="Write into DIR even if it holds files the demo did not write.")
@pass_settings
def demo(settings: Settings, out, overwrite):
    """Find flipped labels in digits with TracIn, and show proponents and opponents.

    \b
    Trains a small CNN by SGD on scikit-learn's digits with 10 % of the training labels flipped,
    saving checkpoints; captures train and test gradient stores; then writes to DIR:
      mislabels.png       flipped labels found vs data checked (self-influence, loss, random)
      proponents.png      test digits beside their top proponents and opponents
      self_influence.csv  training examples ranked by self-influence, with true labels
      top_k.csv           top proponents and opponents of every test digit
    and prints the recall at 10 % and 20 % of the data checked.
    """
    from trackin_ooc.demo.pipeline import run_demo

    with settings.client():
        result = run_demo(
            out, device=settings.device, overwrite=overwrite, progress=settings.progress, say=settings.say
        )
    click.echo(result.summary())
