"""Stage 1, ingest: a dataset in its official layout -> a Parquet manifest."""

from __future__ import annotations

import click

from dcml.contracts import manifest
from dcml.contracts.errors import DcmlError
from dcml.contracts.records import StageTimer
from data_prep import common, registry

SPLIT_MODE_CHOICES = list(common.SPLIT_MODES)


def summarise(df) -> dict:
    """Images and classes per split."""
    return {split: {"images": int(len(rows)), "classes": int(rows["label"].nunique())}
            for split, rows in df.groupby("split", sort=False)}


def run(dataset: str, out, root=None, split_mode: str | None = None, check_images: bool = False,
        max_per_class: int | None = None, vehicleid_test_size: int = 800, val_fraction: float = 0.0) -> dict:
    """Read ``dataset`` from ``root`` and write its manifest to ``out``; returns the stage record.

    ``split_mode`` None (or "") takes the dataset's default: ``official``,
    except ``folder`` whose default is ``class-disjoint``. Nothing is written
    when any check fails.
    """
    name = registry.canonical(dataset)
    module = registry.reader_module(name)
    split_mode = split_mode or module.DEFAULT_SPLIT_MODE
    if max_per_class is not None and max_per_class <= 0:
        max_per_class = None
    params = {"dataset": name, "root": None if root in (None, "") else str(root), "split_mode": split_mode,
              "check_images": bool(check_images), "max_per_class": max_per_class, "val_fraction": float(val_fraction)}
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DcmlError(f"--val-fraction {val_fraction}: must be in [0, 1) (0 = no validation split)")
    options = {}
    if name == "vehicleid":
        params["vehicleid_test_size"] = options["test_size"] = int(vehicleid_test_size)
    timer = StageTimer("ingest", params)
    df, meta = module.read(root or None, split_mode, max_per_class=max_per_class, **options)
    if check_images:
        common.check_images(df, meta["root"])
    df, validation = manifest.carve_validation(df, float(val_fraction), str(root or name))
    splits = summarise(df)
    metrics = {"images": int(len(df)), "classes": int(df["label"].nunique()),
               **{f"{split}_images": s["images"] for split, s in splits.items()},
               **{f"{split}_classes": s["classes"] for split, s in splits.items()}}
    record = timer.finish(inputs={}, metrics=metrics,
                          extra={"root": meta["root"], "fingerprint": meta["fingerprint"], "splits": splits,
                                 "validation": validation})
    manifest.write(out, df, {**meta, "record": record})
    per_split = ", ".join(f"{split} {s['images']} images / {s['classes']} classes" for split, s in splits.items())
    click.echo(f"ingest {name} ({split_mode}): {len(df)} images, {metrics['classes']} classes [{per_split}] -> {out}")
    if validation.get("note"):
        click.echo(validation["note"])
    return record


@click.command("ingest")
@click.option("--dataset", required=True, metavar="NAME",
              help=f"Dataset reader: {', '.join(registry.names())}.")
@click.option("--root", default=None, metavar="DIR",
              help="Dataset folder (fashion-mnist: found automatically when omitted).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Manifest to write (.parquet).")
@click.option("--split-mode", type=click.Choice(SPLIT_MODE_CHOICES), default=None,
              help="official (default; folder: class-disjoint) or class-disjoint.")
@click.option("--check-images", is_flag=True, help="Decode every image fully and fail on a corrupt one.")
@click.option("--max-per-class", type=click.IntRange(min=2), default=None,
              help="Keep at most N images per class and split (first by image_id), for quick runs.")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Share of the training classes held out as the 'val' split (class-disjoint; picks the epoch kept).")
@click.option("--vehicleid-test-size", type=click.Choice(["800", "1600", "2400"]), default="800", show_default=True,
              help="VehicleID test set (number of vehicles).")
def cli(dataset, root, out, split_mode, check_images, max_per_class, val_fraction, vehicleid_test_size):
    """Turn a dataset into a Parquet manifest (one row per image)."""
    run(dataset=dataset, out=out, root=root, split_mode=split_mode, check_images=check_images,
        max_per_class=max_per_class, vehicleid_test_size=int(vehicleid_test_size), val_fraction=val_fraction)
