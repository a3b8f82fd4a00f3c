"""Stage 4: train the K embedding subspaces.

mode="shared" (the paper): one model with K slices over a shared backbone;
every batch comes from one cluster and trains that cluster's slice; the
training images are re-clustered every ``recluster_every`` epochs.

mode="worker" (the parallel variant of seed document 000): trains its own copy
of the backbone (frozen with ``freeze_backbone``) and only slice
``cluster_id`` on that cluster's rows; no re-clustering. The finetune stage
merges the workers' checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

import numpy as np
import pandas as pd

from dcml.contracts import checkpoint
from dcml.cli_options import selection_options, training_options
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_parquet_meta
from dcml.contracts.records import StageTimer

MODES = ("shared", "worker")


# -- helpers shared with the finetune stage ------------------------------------------

def load_manifest(path):
    """(manifest, train rows, test rows, validation rows)."""
    from dcml.contracts import manifest as manifest_mod

    man = manifest_mod.read(path)
    train_rows = man.split("train")
    if train_rows.empty:
        raise DcmlError(f"{path}: manifest has no 'train' rows; ingest with a split mode that has a training split")
    eval_rows = man.split("test", "query", "gallery")
    return man, train_rows, eval_rows, man.split("val")


def open_activations(path):
    """The fast mode's cache (dcml.algorithm.activations), or None when ``path`` is unset or holds no cache."""
    if not path:
        return None
    from dcml.algorithm.activations import ActivationCache, is_cache

    return ActivationCache(path) if is_cache(path) else None


def selection_metrics(trainer) -> dict:
    """What validation chose: the epoch kept and its scores."""
    if trainer.best is None:
        return {}
    entry = next((h for h in trainer.history if h["epoch"] == trainer.best_epoch), {})
    out = {"best_epoch": trainer.best_epoch, "stopped_early": bool(trainer.stopped_early)}
    out.update({k: entry[k] for k in ("val_recall@1", "val_map@r") if k in entry})
    return out


def read_clusters(path, train_rows: pd.DataFrame) -> tuple[np.ndarray, int, dict]:
    """Cluster id per train row (in manifest order), k, and the file's metadata."""
    meta = read_parquet_meta(path)
    try:
        table = pd.read_parquet(path, columns=["image_id", "cluster"])
    except Exception as exc:  # missing columns, not Parquet
        raise DcmlError(f"{path}: not a cluster assignment table ({' '.join(str(exc).split())[:160]}); "
                        "create it with `dcml cluster`") from None
    ids = table["image_id"].astype(str)
    if ids.duplicated().any():
        raise DcmlError(f"{path}: image_id {ids[ids.duplicated()].iloc[0]!r} appears twice; re-create it with `dcml cluster`")
    train_ids = train_rows["image_id"].astype(str)
    missing = ~train_ids.isin(set(ids))
    extra = ~ids.isin(set(train_ids))
    if missing.any() or extra.any():
        detail = (f"{int(missing.sum())} training image(s) of the manifest are missing (e.g. {train_ids[missing].iloc[0]!r})"
                  if missing.any() else f"{int(extra.sum())} image_id(s) are not training images of the manifest (e.g. {ids[extra].iloc[0]!r})")
        raise DcmlError(f"{path}: clusters do not match the manifest: {detail}; "
                        "cluster the features extracted from this manifest")
    clusters = table.set_index(ids)["cluster"].reindex(train_ids).to_numpy(dtype=np.int64)
    k = int(meta.get("k") or (clusters.max() + 1))
    if clusters.min() < -1 or clusters.max() >= k:
        raise DcmlError(f"{path}: cluster ids must be in -1..{k - 1}; re-create it with `dcml cluster`")
    return clusters, k, meta


def device_or_default(device):
    from dcml.algorithm.training import default_device

    return default_device() if device in (None, "", "auto") else device


def set_threads(threads) -> None:
    """Pin torch's CPU threads: OpenMP threads that spin on an oversubscribed box
    can make an epoch several times slower than one thread."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def resume_file(out, work_dir) -> Path:
    out = Path(out)
    return (Path(work_dir) if work_dir else out.parent) / f"{out.name}.resume.pt"


def final_metrics(history: list[dict]) -> dict:
    metrics = {}
    trained = [h for h in history if h["epoch"] > 0]
    if trained:
        metrics["final_loss"] = trained[-1]["loss"]
        metrics["epochs"] = len(trained)
        metrics["train_seconds"] = round(sum(h["seconds"] for h in trained), 3)
    evaluated = [h for h in history if "recall@1" in h]
    if evaluated:
        metrics["recall@1"] = evaluated[-1]["recall@1"]
    return metrics


def write_output(out, model, record: dict, **extra) -> None:
    checkpoint.save(out, {
        "model_config": dict(model.config),
        "model": model.state_dict(),
        "record": json.dumps(record, default=str),
        **extra,
    })


# -- the stage ----------------------------------------------------------------------

def run(manifest, out, clusters=None, mode="shared", cluster_id=None, init=None, activations=None,
        backbone="small_cnn", weights=None, image_size=None, embedding_dim=128, num_slices=None,
        dropout=None, train_blocks=-1, loss="margin", margin=None, miner="reference",
        classes_per_batch=20, images_per_class=4, lr_backbone=1e-5, lr_embedding=1e-5, lr_proxies=None,
        weight_decay=1e-4, epochs=10, recluster_every=2, cluster_on="features", finetune_epoch=None,
        eval_every=0, freeze_bn=None, freeze_backbone=False, head_init="auto", warmup_epochs=0,
        schedule="constant", select_on="recall@1", patience=0, seed=0, num_workers=0,
        resume=True, work_dir=None, device=None, threads=None) -> dict:
    """Train and write a checkpoint to ``out``; returns the stage record.

    ``weights=None`` / ``freeze_bn=None`` / ``image_size=None`` use the
    backbone's defaults (dcml.algorithm.models.default_config). ``num_slices`` defaults
    to the clusters file's k (1 without clusters). ``init``: a checkpoint to
    start from (its architecture wins over backbone/embedding_dim/...).
    ``finetune_epoch``: from this epoch on train K=1 on all data (None: leave
    that to the finetune stage). ``activations``: the fast mode's cache
    (``dcml extract --views N``): train the top blocks on the cached
    activations of the frozen lower part instead of on images.
    """
    params = {k: v for k, v in locals().items() if k not in ("manifest", "out", "clusters", "init", "work_dir", "activations")}
    from dcml.algorithm.models import build_model
    from dcml.algorithm.training import Trainer, TrainSettings, seed_everything

    if mode not in MODES:
        raise DcmlError(f"mode={mode!r}: use one of {', '.join(MODES)}")
    set_threads(threads)
    man, train_rows, eval_rows, val_rows = load_manifest(manifest)
    cache = open_activations(activations)

    assignments, k_file = None, None
    if clusters is not None:
        assignments, k_file, _ = read_clusters(clusters, train_rows)
    k = int(num_slices) if num_slices is not None else (k_file or 1)
    if k_file is not None and k_file != k:
        raise DcmlError(f"{clusters}: has k={k_file} clusters but num_slices={k}; leave num_slices unset or re-cluster with --k {k}")
    if mode == "worker":
        if assignments is None:
            raise DcmlError("mode=worker needs --clusters (the assignments the workers split)")
        if cluster_id is None or not 0 <= int(cluster_id) < k:
            raise DcmlError(f"{clusters}: cluster_id={cluster_id} is out of range for k={k}; pass --cluster-id 0..{k - 1}")
        cluster_id = int(cluster_id)
    elif cluster_id is not None:
        raise DcmlError("cluster_id is for mode=worker; drop it or pass --mode worker")

    seed_everything(seed)  # the fresh head's init is part of the run
    if init is not None:
        model = checkpoint.load_model(init)[0]
        if k > model.embedding_dim:
            raise DcmlError(f"{init}: embedding_dim={model.embedding_dim} cannot hold {k} slices")
        model.set_num_slices(k)
    else:
        model = build_model({"backbone": backbone, "weights": weights, "image_size": image_size,
                             "embedding_dim": embedding_dim, "num_slices": k, "freeze_bn": freeze_bn,
                             "dropout": dropout, "train_blocks": train_blocks})

    settings = TrainSettings(
        epochs=int(epochs), classes_per_batch=int(classes_per_batch), images_per_class=int(images_per_class),
        lr_backbone=float(lr_backbone), lr_embedding=float(lr_embedding),
        lr_loss=None if lr_proxies is None else float(lr_proxies), weight_decay=float(weight_decay),
        loss=loss, margin=margin, miner=miner,
        recluster_every=int(recluster_every) if mode == "shared" else 0, cluster_on=cluster_on,
        finetune_epoch=None if finetune_epoch is None else int(finetune_epoch),
        eval_every=int(eval_every), freeze_backbone=bool(freeze_backbone), head_init=head_init,
        warmup_epochs=int(warmup_epochs), schedule=schedule, select_on=select_on, patience=int(patience),
        seed=int(seed), num_workers=int(num_workers),
    )
    if mode == "worker" and settings.finetune_epoch is not None:
        raise DcmlError("finetune_epoch is for mode=shared; workers are fine-tuned by `dcml finetune` after the merge")
    timer = StageTimer("train", params, name=f"train-worker-{cluster_id}" if mode == "worker" else "train")
    trainer = Trainer(model, man, train_rows, settings, clusters=assignments,
                      only_learner=cluster_id if mode == "worker" else None,
                      eval_rows=eval_rows, val_rows=val_rows, activations=cache, fresh_head=init is None,
                      resume_path=resume_file(out, work_dir), device=device_or_default(device))
    history = trainer.fit(resume=resume)

    model.cpu()
    worker = {"cluster_id": cluster_id, "k": k, "freeze_backbone": bool(freeze_backbone)} if mode == "worker" else None
    record = timer.finish(inputs={"manifest": manifest, "clusters": clusters, "init": init, "activations": activations},
                          metrics={**final_metrics(history), **selection_metrics(trainer)}, history=history,
                          extra={"mode": mode, "k": k, "cluster_id": cluster_id, "fast_mode": cache is not None,
                                 "head_init": trainer.head_init})
    extra = {"epoch": trainer.epoch, "cluster_state": trainer.cluster_state()}
    if worker:
        extra["worker"] = worker
    write_output(out, model, record, **extra)
    trainer.resume_path.unlink(missing_ok=True)
    return record


@click.command("train")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="Manifest Parquet (dcml ingest).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt).")
@click.option("--clusters", type=click.Path(dir_okay=False), help="Cluster assignments Parquet (dcml cluster).")
@click.option("--mode", type=click.Choice(MODES), default="shared", show_default=True)
@click.option("--cluster-id", type=int, help="mode=worker: the cluster (and slice) this worker trains.")
@click.option("--init", type=click.Path(dir_okay=False), help="Checkpoint to start from (e.g. the previous round's model).")
@click.option("--backbone", default="small_cnn", show_default=True,
              type=click.Choice(["small_cnn", "resnet18", "resnet50", "efficientnet_lite0"]))
@click.option("--weights", help="imagenet | none | path to a local weights file [default: per backbone].")
@click.option("--image-size", type=int, help="Input side [default: per backbone].")
@click.option("--embedding-dim", type=int, default=128, show_default=True)
@click.option("--num-slices", type=int, help="K [default: the clusters file's k, else 1].")
@click.option("--dropout", type=float, help="Dropout before the head [default: 0.01].")
@click.option("--train-blocks", type=int, default=-1, show_default=True,
              help="Backbone blocks that train, counted from the top (-1 = all, 0 = none: head only).")
@click.option("--activations", type=click.Path(file_okay=False),
              help="Fast mode: the cache of the frozen lower part (dcml extract --views N).")
@training_options
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--recluster-every", type=int, default=2, show_default=True, help="R (shared mode; 0 = never).")
@click.option("--cluster-on", type=click.Choice(["features", "embedding"]), default="features", show_default=True)
@click.option("--finetune-epoch", type=int, help="Shared mode: from this epoch, K=1 on all data.")
@click.option("--eval-every", type=int, default=0, show_default=True, help="R@1 on the test split every N epochs (0 = never).")
@click.option("--freeze-bn/--no-freeze-bn", default=None, help="[default: frozen for pretrained weights]")
@click.option("--freeze-backbone/--no-freeze-backbone", default=False, show_default=True)
@click.option("--head-init", type=click.Choice(["auto", "pca", "random"]), default="auto", show_default=True,
              help="pca: the head starts as the principal components of the backbone features (auto: for pretrained backbones).")
@selection_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from <out>.resume.pt if present.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where the resume file lives [default: beside --out].")
@click.option("--device", help="cuda | cpu [default: cuda when available].")
@click.option("--threads", type=int, help="CPU threads for torch [default: torch's]; 1 is fastest on a busy shared machine.")
def cli(**kwargs):
    """Train the K embedding subspaces (shared backbone, or one parallel worker)."""
    record = run(**kwargs)
    click.echo(f"wrote {kwargs['out']} ({record['metrics']})")
