"""Click options shared by the training stages (train, finetune)."""

import click

LOSSES = ("margin", "triplet", "contrastive", "proxy_anchor", "multi_similarity")
MINERS = ("auto", "reference", "distance_weighted", "multi_similarity", "none")


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


def selection_options(f):
    """Warm-up, schedule, and the validation choice of the epoch kept."""
    options = [
        click.option("--warmup-epochs", type=int, default=0, show_default=True,
                     help="First epochs train the head only (backbone frozen)."),
        click.option("--schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
                     help="Learning-rate schedule after the warm-up (cosine: per step, down to 0)."),
        click.option("--select-on", type=click.Choice(["recall@1", "map@r"]), default="recall@1", show_default=True,
                     help="Validation metric that picks the epoch kept (needs a 'val' split: ingest --val-fraction)."),
        click.option("--patience", type=int, default=0, show_default=True,
                     help="Stop after this many epochs without a better validation score (0 = never)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f
