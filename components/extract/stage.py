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

``score=True`` (the pipeline's extract step) also scores the fresh backbone's
pooled features, L2-normalised and at full width, on the validation and test
splits: every run's ``pretrained features`` baseline (dcml.algorithm.baseline),
kept in the record's metrics. A backbone without pretrained weights has none;
the record says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from dcml.contracts import events
from dcml.contracts.io import check_writable
from dcml import stagekit
from dcml.algorithm import baseline
from dcml.contracts import manifest as manifest_lib
from dcml.contracts import params
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import write_vectors
from dcml.contracts.records import StageTimer

STAGE = "extract"
# Parameters this stage takes (dcml.contracts.params); fast_views is its --views.
PARAMS = ("backbone", "weights", "image_size", "train_blocks", "fast_views", "batch_size", "num_workers", "seed")
RENAME = params.STAGE_NAMES[STAGE]


def run(manifest, out, model=None, splits=("train",), device=None, activations_out=None, score=False,
        **hyper) -> dict:
    """Write ``out`` (columns image_id, label, split, feature) and return the stage record.

    ``hyper``: the parameters in ``PARAMS`` (defaults: dcml.contracts.params;
    ``views`` is the pipeline's fast_views). ``model``: a checkpoint whose
    backbone to use instead of a fresh one. ``score``: also score the
    backbone's features on the validation and test splits (not with ``model``).
    """
    stagekit.stage_process()  # this process: glibc keeps large batch buffers for reuse
    import torch

    from dcml.algorithm.inference import compute_vectors, resolve_device
    from dcml.algorithm.models import build_model

    hp = params.resolve(PARAMS, hyper, STAGE, rename=RENAME)
    check_writable(out)
    if activations_out is not None:
        check_writable(activations_out, folder=True)
    batch_size, num_workers, seed = hp["batch_size"], hp["num_workers"], hp["seed"]
    views, train_blocks = hp["views"], hp["train_blocks"]
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    timer = StageTimer(STAGE, {**hp, "model": str(model) if model else None, "splits": list(splits),
                               **({"score": True} if score else {})})
    bad = sorted(set(splits) - set(manifest_lib.SPLITS))
    if not splits or bad:
        raise DcmlError(f"--split: unknown split(s) {bad or '(none given)'}; use {', '.join(manifest_lib.SPLITS)}")
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

    device = resolve_device(device)
    if model:
        from dcml.model_files import load_model

        net, _ = load_model(model, device=device)
    else:
        # Seeded like the train stage, so a randomly initialised backbone
        # (small_cnn, weights=none) is the very one training starts from.
        from dcml.algorithm.training import seed_everything

        seed_everything(int(seed))
        net = build_model(stagekit.model_config({**hp, "embedding_dim": 128, "freeze_bn": "auto"},
                                                num_slices=1)).to(device)
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
    extra = {}
    if score and not model:
        skipped = baseline.available(model_config)
        if skipped:
            extra["baseline_skipped"] = skipped
        else:
            metrics.update(_baseline_scores(net, man, batch_size=int(batch_size), device=device,
                                            num_workers=int(num_workers)))
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
                          extra={"device": str(device), "torch_threads": torch.get_num_threads(), **extra})
    meta = {"model_config": model_config, "manifest_fingerprint": man.meta["fingerprint"],
            "dataset": man.dataset, "splits": list(splits), "record": record}
    write_vectors(out, rows[["image_id", "label", "split"]], features, "feature", meta)
    cache = f", fast-mode cache: {views} views, {metrics['cache_mib']} MiB" if metrics.get("cache_views") else ""
    events.emit("summary", text=f"{metrics['num_images']} x {metrics['dim']} features{cache}{_scores_text(metrics, extra)}")
    return record


def _baseline_scores(net, man, **kwargs) -> dict:
    """``pretrained_<split>_<metric>`` of the backbone's normalised features on the val and test splits."""
    from dcml.algorithm.inference import compute_vectors

    out = {}
    for name, rows in (("val", man.split("val")), ("test", man.split("test", "query", "gallery"))):
        if rows.empty:
            continue
        rows = rows.reset_index(drop=True)
        x = compute_vectors(net, man, rows, kind="features", desc=f"pretrained features: {name} ({len(rows)} images)",
                            **kwargs)
        out.update({f"pretrained_{name}_{k}": v for k, v in baseline.score_vectors(baseline.normalised(x), rows).items()})
    return out


def _scores_text(metrics: dict, extra: dict) -> str:
    if extra.get("baseline_skipped"):
        return "; no pretrained-features baseline (weights=none)"
    parts = [f"{name} R@1 {metrics[f'pretrained_{name}_recall@1']:.3f}" for name in ("val", "test")
             if f"pretrained_{name}_recall@1" in metrics]
    return f"; pretrained features: {', '.join(parts)}" if parts else ""


@click.command(name=STAGE, help="Backbone features of a manifest's images -> Parquet vector table.")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest Parquet (from `dcml ingest`).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output features Parquet.")
@params.click_options(*PARAMS, rename=RENAME)
@click.option("--model", default=None, type=click.Path(dir_okay=False, path_type=Path), help="A dcml checkpoint: use its backbone instead.")
@click.option("--split", "splits", multiple=True, default=("train",), show_default=True, help="Split(s) to extract; repeat the option for several.")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
@click.option("--activations-out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the fast mode's cache.")
@click.option("--score/--no-score", default=False, show_default=True,
              help="Also score the backbone's pooled features (L2-normalised) on the val and test splits: "
                   "the 'pretrained features' baseline of a run.")
def cli(manifest, out, model, splits, device, activations_out, score, **hyper):
    record = run(manifest=manifest, out=out, model=model, splits=splits, device=device,
                 activations_out=activations_out, score=score, **hyper)
    m = record["metrics"]
    click.echo(f"{out}: {m['num_images']} x {m['dim']} features ({m['images_per_s']} images/s)")
    for name in ("val", "test"):
        if f"pretrained_{name}_recall@1" in m:
            click.echo(f"pretrained features, {name}: R@1 {m[f'pretrained_{name}_recall@1']:.4f}, "
                       f"MAP@R {m[f'pretrained_{name}_map@r']:.4f}")
    if m.get("cache_views"):
        click.echo(f"{activations_out}: {m['cache_views']} views x {m['cache_shape']} activations, {m['cache_mib']} MiB")
