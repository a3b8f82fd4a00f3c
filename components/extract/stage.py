"""Stage 2: manifest -> backbone features (a Parquet vector table).

Features are the pooled backbone outputs (not normalised; k-means normalises
them) of every image in the chosen splits, computed with eval transforms.
Either a fresh pretrained backbone (``backbone`` / ``weights`` /
``image_size``) or the backbone of a trained dcml model (``model``): the
latter re-clusters the data between training rounds, as the reference does.

The fast mode (``views > 0``, with ``train_blocks >= 0``) also writes
``activations_out``: the frozen lower part's output for ``views`` augmented
views of every training image and the eval view of the others
(dcml.algorithm.activations), which the training stages train the top on. With
``views = 0`` and an ``activations_out`` an empty folder marks "no cache".
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from dcml.contracts import manifest as manifest_lib
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import write_vectors
from dcml.contracts.records import StageTimer

STAGE = "extract"


def run(manifest, out, backbone: str = "efficientnet_lite0", weights: str = "imagenet", image_size: int = 128,
        batch_size: int = 64, model=None, splits=("train",), num_workers: int = 0, device=None,
        seed: int = 0, views: int = 0, train_blocks: int = -1, activations_out=None) -> dict:
    """Write ``out`` (columns image_id, label, split, feature) and return the stage record."""
    import torch

    from dcml.algorithm.inference import compute_vectors, default_device
    from dcml.algorithm.models import build_model

    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    params = {"backbone": backbone, "weights": str(weights), "image_size": int(image_size),
              "batch_size": int(batch_size), "model": str(model) if model else None, "splits": list(splits),
              "num_workers": int(num_workers), "seed": int(seed), "views": int(views),
              "train_blocks": int(train_blocks)}
    timer = StageTimer(STAGE, params)
    bad = sorted(set(splits) - set(manifest_lib.SPLITS))
    if not splits or bad:
        raise DcmlError(f"--split: unknown split(s) {bad or '(none given)'}; use {', '.join(manifest_lib.SPLITS)}")
    if int(batch_size) < 1:
        raise DcmlError(f"--batch-size: must be >= 1, got {batch_size}")
    if int(views) < 0:
        raise DcmlError(f"--views: must be >= 0 (0 = no fast-mode cache), got {views}")
    if int(views) > 0 and activations_out is None:
        raise DcmlError("--views: the fast-mode cache needs --activations-out DIR")
    if int(views) > 0 and int(train_blocks) < 0:
        raise DcmlError(f"--views {views}: the fast mode caches the frozen lower part, but train_blocks={train_blocks} "
                        "trains the whole backbone; set --train-blocks to the number of top blocks that train (e.g. 5)")
    man = manifest_lib.read(manifest)
    rows = man.split(*splits)
    if rows.empty:
        present = sorted(man.df["split"].unique())
        raise DcmlError(f"{manifest}: no images in split(s) {', '.join(splits)} (manifest has {', '.join(present)}); pick an existing --split")

    device = torch.device(device) if device else default_device()
    if model:
        from dcml.contracts.checkpoint import load_model

        net, _ = load_model(model, device=device)
    else:
        # Seeded like the train stage, so a randomly initialised backbone
        # (small_cnn, weights=none) is the very one training starts from.
        from dcml.algorithm.training import seed_everything

        seed_everything(int(seed))
        net = build_model({"backbone": backbone, "weights": str(weights), "image_size": int(image_size),
                           "num_slices": 1, "train_blocks": int(train_blocks)}).to(device)
    model_config = dict(net.config)
    # The record shows the backbone actually used (a checkpoint's, with --model).
    timer.params.update(backbone=model_config["backbone"], weights=model_config["weights"],
                        image_size=model_config["image_size"])

    t0 = time.perf_counter()
    features = compute_vectors(net, man, rows, kind="features", batch_size=int(batch_size), device=device,
                               num_workers=int(num_workers), desc=f"extract {model_config['backbone']}")
    seconds = time.perf_counter() - t0
    metrics = {"num_images": len(rows), "dim": int(features.shape[1]),
               "seconds": round(seconds, 3), "images_per_s": round(len(rows) / max(seconds, 1e-9), 2)}
    if activations_out is not None:
        from dcml.algorithm import activations

        if int(views) > 0:
            cache = activations.build(activations_out, net, man, views=int(views), seed=int(seed),
                                      batch_size=int(batch_size), device=device, num_workers=int(num_workers))
            metrics.update(cache_views=int(views), cache_mib=round(cache["bytes"] / 2**20, 1),
                           cache_seconds=cache["seconds"], cache_shape=cache["shape"])
        else:
            activations.write_empty(activations_out)
    record = timer.finish(inputs={"manifest": manifest, "model": model}, metrics=metrics,
                          extra={"device": str(device), "torch_threads": torch.get_num_threads()})
    meta = {"model_config": model_config, "manifest_fingerprint": man.meta["fingerprint"],
            "dataset": man.dataset, "splits": list(splits), "record": record}
    write_vectors(out, rows[["image_id", "label", "split"]], features, "feature", meta)
    return record


@click.command(name=STAGE, help="Backbone features of a manifest's images -> Parquet vector table.")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest Parquet (from `dcml ingest`).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output features Parquet.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              type=click.Choice(["resnet18", "resnet50", "efficientnet_lite0", "small_cnn"]), help="Backbone (ignored with --model).")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet | none | path to a local state_dict (ignored with --model).")
@click.option("--image-size", default=128, show_default=True, type=int, help="Input side in pixels (ignored with --model).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--model", default=None, type=click.Path(dir_okay=False, path_type=Path), help="A dcml checkpoint: use its backbone instead.")
@click.option("--split", "splits", multiple=True, default=("train",), show_default=True, help="Split(s) to extract; repeat the option for several.")
@click.option("--num-workers", default=0, show_default=True, type=int, help="DataLoader worker processes.")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for a randomly initialised backbone and the cached views.")
@click.option("--views", default=0, show_default=True, type=int,
              help="Fast mode: augmented views per training image to cache (0 = no cache).")
@click.option("--train-blocks", default=-1, show_default=True, type=int,
              help="Backbone blocks that train (from the top); the cache holds the output of the rest.")
@click.option("--activations-out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the fast mode's cache.")
def cli(manifest, out, backbone, weights, image_size, batch_size, model, splits, num_workers, device, seed, views,
        train_blocks, activations_out):
    record = run(manifest=manifest, out=out, backbone=backbone, weights=weights, image_size=image_size,
                 batch_size=batch_size, model=model, splits=splits, num_workers=num_workers, device=device,
                 seed=seed, views=views, train_blocks=train_blocks, activations_out=activations_out)
    m = record["metrics"]
    click.echo(f"{out}: {m['num_images']} x {m['dim']} features ({m['images_per_s']} images/s)")
    if m.get("cache_views"):
        click.echo(f"{activations_out}: {m['cache_views']} views x {m['cache_shape']} activations, {m['cache_mib']} MiB")
