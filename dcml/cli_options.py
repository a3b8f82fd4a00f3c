"""Click options shared by the training stages (train, finetune)."""

import click

LOSSES = ("margin", "triplet", "contrastive", "proxy_anchor")
MINERS = ("reference", "distance_weighted", "none")


def training_options(f):
    """Loss, miner, P x M batches and Adam settings."""
    options = [
        click.option("--loss", default="margin", show_default=True, type=click.Choice(LOSSES)),
        click.option("--margin", type=float, help="Loss margin [default: per loss]."),
        click.option("--miner", default="reference", show_default=True, type=click.Choice(MINERS)),
        click.option("--classes-per-batch", type=int, default=20, show_default=True, help="P"),
        click.option("--images-per-class", type=int, default=4, show_default=True, help="M"),
        click.option("--lr-backbone", type=float, default=1e-5, show_default=True),
        click.option("--lr-embedding", type=float, default=1e-5, show_default=True),
        click.option("--lr-proxies", type=float,
                     help="Loss parameters (proxies, learnable beta) [default: 100 x lr-embedding]."),
        click.option("--weight-decay", type=float, default=1e-4, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f
