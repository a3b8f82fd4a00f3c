"""Stage 1, ingest: a dataset in its official layout -> a Parquet manifest."""

from __future__ import annotations

import click

from dcml.contracts import events
from dcml.contracts.io import check_writable
from dcml.contracts import manifest, params
from dcml.contracts.errors import DcmlError
from dcml.contracts.records import StageTimer
from data_prep import common, registry

# Parameters this stage takes (dcml.contracts.params); data_root is its --root.
PARAMS = ("dataset", "data_root", "split_mode", "max_per_class", "check_images", "val_fraction", "data_version")
RENAME = params.STAGE_NAMES["ingest"]


def summarise(df) -> dict:
    """Images and classes per split."""
    return {split: {"images": int(len(rows)), "classes": int(rows["label"].nunique())}
            for split, rows in df.groupby("split", sort=False)}


def run(out, vehicleid_test_size: int = 800, **hyper) -> dict:
    """Read ``dataset`` from ``root`` and write its manifest to ``out``; returns the stage record.

    ``hyper``: the parameters in ``PARAMS`` (defaults: dcml.contracts.params;
    ``root`` is the pipeline's data_root). ``split_mode`` "" takes the
    dataset's default: ``official``, except ``folder`` whose default is
    ``class-disjoint``. ``max_per_class`` 0 keeps every image.
    ``val_fraction`` of the training classes become the ``val`` split
    (class-disjoint validation for choosing the epoch; see
    dcml.contracts.manifest.carve_validation). Nothing is written when any
    check fails.
    """
    hp = params.resolve(PARAMS, hyper, "ingest", rename=RENAME)
    check_writable(out)
    name = registry.canonical(hp["dataset"])
    module = registry.reader_module(name)
    root, check_images, val_fraction = hp["root"] or None, hp["check_images"], hp["val_fraction"]
    split_mode = hp["split_mode"] or module.DEFAULT_SPLIT_MODE
    max_per_class = hp["max_per_class"] or None
    if max_per_class == 1:
        raise DcmlError("--max-per-class 1: a class needs at least 2 images to form a positive pair; use 2 or more (0 = all)")
    params_record = {"dataset": name, "root": None if root is None else str(root), "split_mode": split_mode,
                     "check_images": bool(check_images), "max_per_class": max_per_class,
                     "val_fraction": float(val_fraction)}
    if hp["data_version"]:
        params_record["data_version"] = hp["data_version"]
    options = {}
    if name == "vehicleid":
        params_record["vehicleid_test_size"] = options["test_size"] = int(vehicleid_test_size)
    timer = StageTimer("ingest", params_record)
    df, meta = module.read(root, split_mode, max_per_class=max_per_class, **options)
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
    events.emit("summary", text=describe(record) + (f"; {validation['note']}" if validation.get("note") else ""))
    return record


def describe(record: dict) -> str:
    """'<dataset> (<split mode>): N images, C classes [train ..., val ..., test ...]' from an ingest record."""
    splits = record["extra"]["splits"]
    per_split = ", ".join(f"{split} {s['images']} images / {s['classes']} classes" for split, s in splits.items())
    m, p = record["metrics"], record["params"]
    return f"{p['dataset']} ({p['split_mode']}): {m['images']} images, {m['classes']} classes [{per_split}]"


@click.command("ingest")
@click.option("--dataset", required=True, metavar="NAME",
              help=f"Dataset reader: {', '.join(registry.names())}.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Manifest to write (.parquet).")
@params.click_options(*(n for n in PARAMS if n != "dataset"), rename=RENAME)
@click.option("--vehicleid-test-size", type=click.Choice(["800", "1600", "2400"]), default="800", show_default=True,
              help="VehicleID test set (number of vehicles).")
def cli(out, vehicleid_test_size, **hyper):
    """Turn a dataset into a Parquet manifest (one row per image)."""
    record = run(out=out, vehicleid_test_size=int(vehicleid_test_size), **hyper)
    click.echo(f"ingest {describe(record)} -> {out}")
