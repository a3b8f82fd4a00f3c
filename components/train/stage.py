"""Stage 4: train the K embedding subspaces.

mode="shared" (the paper): one model with K slices over a shared backbone;
every batch comes from one cluster and trains that cluster's slice; the
training images are re-clustered every ``recluster_every`` epochs. After
``whole_embedding_after`` of the epochs (the reference code's 8/19) the loss
sees the whole embedding while batches still come from one cluster each.
Controls: ``embedding_slices=False`` (one embedding, the clusters only pick
the batches) and ``cluster_grouping="random"`` (random class groups).

mode="worker" (the parallel variant of seed document 000): trains its own copy
of the backbone (frozen with ``freeze_backbone``) and only slice
``cluster_id`` on that cluster's rows; no re-clustering. The finetune stage
merges the workers' checkpoints.

``nproc=N`` (``--nproc``, the pipeline's ``gpus_per_task``): data-parallel
training in N processes on this node (torchrun; see dcml.launch and
dcml.algorithm.distributed). Rank 0 writes the checkpoint.
"""

from __future__ import annotations

import click

from dcml.contracts import events
from dcml.contracts.io import check_writable
from dcml import launch, model_files, stagekit
from dcml.contracts import params
from dcml.contracts.errors import DcmlError
from dcml.contracts.records import StageTimer

MODES = ("shared", "worker")
# Hyper-parameters this stage takes (defaults, ranges and help: dcml.contracts.params).
PARAMS = stagekit.MODEL_PARAMS + stagekit.DC_PARAMS + stagekit.TRAINING_PARAMS


# -- the stage ----------------------------------------------------------------------

def run(manifest, out, clusters=None, mode="shared", cluster_id=None, init=None, activations=None,
        num_slices=None, dropout=None, cluster_on="features", finetune_epoch=None, freeze_backbone=False,
        resume=True, work_dir=None, device=None, threads=None, nproc=1, distill=0.0, **hyper) -> dict:
    """Train and write a checkpoint to ``out``; returns the stage record.

    ``hyper``: the hyper-parameters in ``PARAMS`` (unset ones take their
    defaults from dcml.contracts.params). ``num_slices`` defaults to the
    clusters file's k (1 without clusters). ``init``: a checkpoint to start
    from (its architecture wins over backbone/embedding_dim/...).
    ``num_slices`` is the number of clusters (K); the model has K slices, or
    one with ``embedding_slices=False``.
    ``finetune_epoch``: from this epoch on train K=1 on all data (None: leave
    that to the finetune stage). ``activations``: the fast mode's cache
    (``dcml extract --views N``): train the top blocks on the cached
    activations of the frozen lower part instead of on images. ``nproc``:
    data-parallel processes (the record of rank 0 is returned). ``distill``: weight of the similarity
    distillation to the pretrained features (dcml.algorithm.training.distill; 0 = off; measured, not in presets).
    """
    stagekit.stage_process()  # this process: glibc keeps large batch buffers for reuse
    call = {k: v for k, v in locals().items() if k != "hyper"} | hyper
    hp = params.resolve(PARAMS, hyper, "train")
    if launch.needed(stagekit.check_nproc(nproc)):
        check_writable(out)
        return launch.run_processes(f"{__name__}:run", call, nproc)
    check_writable(out)
    from dcml.algorithm.models import build_model
    from dcml.algorithm.training import DistillTrainer, MaskedTrainer, Trainer, seed_everything

    if mode not in MODES:
        raise DcmlError(f"mode={mode!r}: use one of {', '.join(MODES)}")
    stage_args = {"mode": mode, "cluster_id": cluster_id, "num_slices": num_slices, "dropout": dropout,
                  "cluster_on": cluster_on, "finetune_epoch": finetune_epoch, "freeze_backbone": freeze_backbone,
                  "resume": resume, "device": device, "threads": threads,
                  **({"distill": float(distill)} if distill else {})}
    stagekit.set_threads(threads)
    man, train_rows, eval_rows, val_rows = stagekit.load_manifest(manifest)
    cache = stagekit.open_activations(activations)

    assignments, k_file = None, None
    if clusters is not None:
        assignments, k_file, _ = stagekit.read_clusters(clusters, train_rows)
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
    if mode == "worker" and finetune_epoch is not None:
        raise DcmlError("finetune_epoch is for mode=shared; workers are fine-tuned by `dcml finetune` after the merge")
    if mode == "worker" and not (hp["embedding_slices"] and not hp["embedding_masks"]):
        raise DcmlError("embedding_slices=false and embedding_masks are for mode=shared; a worker trains its own slice")
    slices = k if hp["embedding_slices"] and not hp["embedding_masks"] else 1

    seed_everything(hp["seed"])  # the fresh head's init is part of the run
    if init is not None:
        model = model_files.load_model(init)[0]
        if slices > model.embedding_dim:
            raise DcmlError(f"{init}: embedding_dim={model.embedding_dim} cannot hold {slices} slices")
        model.set_num_slices(slices)
    else:
        model = build_model(stagekit.model_config(hp, num_slices=slices, dropout=dropout))

    settings = stagekit.train_settings(
        hp, recluster_every=hp["recluster_every"] if mode == "shared" else 0, cluster_on=cluster_on,
        finetune_epoch=None if finetune_epoch is None else int(finetune_epoch), freeze_backbone=bool(freeze_backbone),
        whole_embedding_after=hp["whole_embedding_after"], grouping=hp["cluster_grouping"], num_groups=k,
        mask_orthogonality=hp["mask_orthogonality"], distill=float(distill))
    if distill and hp["embedding_masks"]:
        raise DcmlError("distill and embedding_masks: pick one (the distillation trainer has no masks)")
    trainer_class = MaskedTrainer if hp["embedding_masks"] else (DistillTrainer if distill else Trainer)
    timer = StageTimer("train", {**hp, **stage_args}, name=f"train-worker-{cluster_id}" if mode == "worker" else "train")
    with stagekit.processes(device) as dev:
        trainer = trainer_class(model, man, train_rows, settings, clusters=assignments,
                          only_learner=cluster_id if mode == "worker" else None,
                          eval_rows=eval_rows, val_rows=val_rows, activations=cache, fresh_head=init is None,
                          **stagekit.resume_location(out, work_dir), device=dev)
        history = trainer.fit(callbacks=[stagekit.EpochLog()], resume=resume)
        if not stagekit.is_main():  # rank 0 writes the checkpoint and the record
            return {}
        processes = trainer.world_size

    model.cpu()
    record = timer.finish(inputs={"manifest": manifest, "clusters": clusters, "init": init, "activations": activations},
                          metrics={**stagekit.final_metrics(history), **stagekit.trainer_metrics(trainer)},
                          history=history,
                          extra={"mode": mode, "k": k, "num_slices": slices, "cluster_id": cluster_id,
                                 "whole_embedding_from": trainer.whole_from, "fast_mode": cache is not None,
                                 "head_init": trainer.head_init, "processes": processes})
    extra = {"epoch": trainer.epoch, "cluster_state": trainer.cluster_state()}
    if mode == "worker":
        extra["worker"] = {"cluster_id": cluster_id, "k": k, "freeze_backbone": bool(freeze_backbone)}
    stagekit.write_output(out, model, record, **extra)
    trainer.resume_path.unlink(missing_ok=True)
    events.emit("summary", text=stagekit.training_summary(record))
    return record


@click.command("train")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="Manifest Parquet (dcml ingest).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt).")
@click.option("--clusters", type=click.Path(dir_okay=False), help="Cluster assignments Parquet (dcml cluster).")
@click.option("--mode", type=click.Choice(MODES), default="shared", show_default=True)
@click.option("--cluster-id", type=int, help="mode=worker: the cluster (and slice) this worker trains.")
@click.option("--init", type=click.Path(dir_okay=False), help="Checkpoint to start from (e.g. the previous round's model).")
@click.option("--activations", type=click.Path(file_okay=False),
              help="Fast mode: the cache of the frozen lower part (dcml extract --views N).")
@click.option("--num-slices", type=int, help="K [default: the clusters file's k, else 1].")
@click.option("--dropout", type=float, help="Dropout before the head [default: 0.01].")
@params.click_options(*PARAMS)
@click.option("--cluster-on", type=click.Choice(["features", "embedding"]), default="features", show_default=True)
@click.option("--finetune-epoch", type=int, help="Shared mode: from this epoch, K=1 on all data.")
@click.option("--freeze-backbone/--no-freeze-backbone", default=False, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from <out>.resume.pt if present.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where the resume file lives [default: beside --out].")
@click.option("--device", help="cuda | cpu [default: cuda when available].")
@click.option("--threads", type=int, help="CPU threads for torch [default: torch's]; 1 is fastest on a busy shared machine.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel processes on this node (torchrun): one per GPU, or CPU processes (gloo).")
def cli(**kwargs):
    """Train the K embedding subspaces (shared backbone, or one parallel worker)."""
    record = run(**kwargs)
    click.echo(f"wrote {kwargs['out']} ({record['metrics']})")
