"""Stage 5: merge the per-cluster sub-models into one model, fine-tune it on all data.

Several worker checkpoints (``dcml train --mode worker``): the merged head
takes the rows of slice k from worker k (slices side by side); the backbones
are averaged parameter by parameter, BatchNorm statistics included
(``merge="average"``), or taken from worker 0 (``merge="first"``, for
backbones that were frozen and so are identical). Then the whole embedding
(K=1) is fine-tuned on all training images for ``epochs`` epochs; with
``epochs=0`` the merged model is written as is, K slices each normalised on
its own. One checkpoint (shared mode): no merge, just the fine-tuning.

``finetune_cluster_epochs`` > 0 (with ``clusters``, the workers' clusters):
before the K=1 fine-tuning, the merged K-slice model trains the whole
embedding on one-cluster batches for that many epochs, re-clustered every
``recluster_every`` epochs: the reference code's whole-embedding phase, for
the parallel mode.

``nproc=N`` (``--nproc``, the pipeline's ``gpus_per_task``): the fine-tuning
runs as N data-parallel processes on this node (torchrun; dcml.launch); every
process merges the same inputs, rank 0 writes the checkpoint.
"""

from __future__ import annotations

import click
import torch

from dcml.contracts import events
from dcml.contracts.io import check_writable
from dcml import launch, model_files, stagekit
from dcml.algorithm import baseline
from dcml.contracts import checkpoint, params
from dcml.contracts.errors import DcmlError
from dcml.contracts.records import StageTimer

MERGES = ("average", "first")
# Hyper-parameters this stage takes (dcml.contracts.params); finetune_epochs is its --epochs.
PARAMS = ("finetune_epochs", "finetune_cluster_epochs", "recluster_every", "cluster_grouping") + tuple(
    n for n in stagekit.TRAINING_PARAMS if n != "epochs") + ("baseline_candidate", "fusion")
RENAME = params.STAGE_NAMES["finetune"]


def merge_checkpoints(loaded: list[tuple[str, dict]], merge: str = "average"):
    """One model from worker checkpoints [(path, ckpt)]; (model, cluster ids in slice order)."""
    if merge not in MERGES:
        raise DcmlError(f"merge={merge!r}: use one of {', '.join(MERGES)}")
    by_cluster: dict[int, tuple[str, dict]] = {}
    first_path, first = loaded[0]
    for path, ckpt in loaded:
        worker = ckpt.get("worker")
        if not isinstance(worker, dict) or worker.get("cluster_id") is None:
            raise DcmlError(f"{path}: not a worker checkpoint (no cluster_id); merge only outputs of `dcml train --mode worker`")
        if worker["k"] != len(loaded):
            raise DcmlError(f"{path}: trained for k={worker['k']} clusters but {len(loaded)} checkpoints were given; "
                            f"pass one checkpoint per cluster 0..{worker['k'] - 1}")
        for key in sorted(set(first["model_config"]) | set(ckpt["model_config"])):
            if first["model_config"].get(key) != ckpt["model_config"].get(key):
                raise DcmlError(f"{path}: model_config '{key}' is {ckpt['model_config'].get(key)!r} but {first_path} has "
                                f"{first['model_config'].get(key)!r}; merge workers trained with the same settings")
        cid = int(worker["cluster_id"])
        if cid in by_cluster:
            raise DcmlError(f"{path}: cluster_id {cid} is also in {by_cluster[cid][0]}; pass each cluster's worker once")
        by_cluster[cid] = (path, ckpt)
    k = len(loaded)
    missing = sorted(set(range(k)) - set(by_cluster))
    if missing:
        raise DcmlError(f"no worker checkpoint for cluster(s) {missing}; pass one checkpoint per cluster 0..{k - 1}")

    workers = [by_cluster[c][1] for c in range(k)]
    states = [model_files.state_dict_of(w) for w in workers]
    for (path, _), state in zip((by_cluster[c] for c in range(k)), states):
        if state.keys() != states[0].keys():
            raise DcmlError(f"{path}: its weights have other tensors than {by_cluster[0][0]}'s; merge workers of one architecture")
    template = model_files.build_from({"model_config": workers[0]["model_config"], "model": states[0]}, by_cluster[0][0])
    merged = {}
    for name, tensor in states[0].items():
        if name in ("head.weight", "head.bias"):
            rows = tensor.clone()
            for c, state in enumerate(states):
                start, stop = template.slice_bounds(c)
                rows[start:stop] = state[name][start:stop]
            merged[name] = rows
        elif merge == "average" and tensor.is_floating_point():
            merged[name] = torch.stack([s[name].double() for s in states]).mean(dim=0).to(tensor.dtype)
        else:  # merge="first", and integer buffers (BatchNorm's num_batches_tracked)
            merged[name] = tensor.clone()
    template.load_state_dict(merged)
    return template, list(range(k))


def run(manifest, checkpoints, out, merge="average", activations=None, clusters=None, freeze_backbone=False,
        resume=True, work_dir=None, device=None, threads=None, nproc=1, **hyper) -> dict:
    """Merge worker checkpoints (or take the one shared-mode checkpoint) and
    fine-tune with K=1 on all training images; writes a checkpoint to ``out``.

    ``hyper``: the hyper-parameters in ``PARAMS`` (``epochs`` is the
    pipeline's finetune_epochs; 0 = merge only). With a ``val`` split the
    merged model itself is a candidate: fine-tuning that does not beat it on
    validation leaves it unchanged; with ``baseline_candidate`` so are the
    backbone's pretrained features (dcml.algorithm.baseline): when they score
    higher on validation, ``out`` is the model that embeds with them.
    ``nproc``: data-parallel processes."""
    stagekit.stage_process()  # this process: glibc keeps large batch buffers for reuse
    call = {k: v for k, v in locals().items() if k != "hyper"} | hyper
    hp = params.resolve(PARAMS, hyper, "finetune", rename=RENAME)
    check_writable(out)
    cluster_epochs = hp["finetune_cluster_epochs"]
    if cluster_epochs and clusters is None:
        raise DcmlError(f"finetune_cluster_epochs={cluster_epochs} needs the clusters the workers trained on; "
                        "pass --clusters (dcml cluster's output) or set it to 0")
    if hp["epochs"] + cluster_epochs > 0 and launch.needed(stagekit.check_nproc(nproc)):
        call["checkpoints"] = [str(c) for c in ([checkpoints] if isinstance(checkpoints, (str, bytes)) else checkpoints)]
        return launch.run_processes(f"{__name__}:run", call, nproc)
    from dcml.algorithm.training import Trainer, seed_everything

    if isinstance(checkpoints, (str, bytes)) or not hasattr(checkpoints, "__iter__"):
        checkpoints = [checkpoints]
    checkpoints = [str(c) for c in checkpoints]
    if not checkpoints:
        raise DcmlError("no checkpoint given; pass --checkpoint once per trained model")
    timer = StageTimer("finetune", {**hp, "merge": merge, "freeze_backbone": freeze_backbone, "resume": resume,
                                    "device": device, "threads": threads})
    stagekit.set_threads(threads)
    man, train_rows, eval_rows, val_rows = stagekit.load_manifest(manifest)
    cache = stagekit.open_activations(activations)
    loaded = [(path, checkpoint.load(path)) for path in checkpoints]
    if len(loaded) == 1:
        model = model_files.build_from(loaded[0][1], loaded[0][0])
        merged_from = None
    else:
        model, merged_from = merge_checkpoints(loaded, merge)

    history, trainer, processes = [], None, 1
    assignments = None
    if cluster_epochs:
        assignments, k_file, _ = stagekit.read_clusters(clusters, train_rows)
        if k_file != model.num_slices:
            raise DcmlError(f"{clusters}: has k={k_file} clusters but the model has {model.num_slices} slices; "
                            "pass the clusters the workers were trained on")
    if hp["epochs"] + cluster_epochs > 0:
        if not cluster_epochs:
            model.set_num_slices(1)
        settings = stagekit.train_settings(
            {**hp, "epochs": hp["epochs"] + cluster_epochs}, recluster_every=hp["recluster_every"] if cluster_epochs else 0,
            finetune_epoch=cluster_epochs, whole_embedding_after=0.0, grouping=hp["cluster_grouping"],
            freeze_backbone=bool(freeze_backbone))
        seed_everything(hp["seed"])
        with stagekit.processes(device) as dev:
            trainer = Trainer(model, man, train_rows, settings, clusters=assignments, eval_rows=eval_rows,
                              val_rows=val_rows, activations=cache, **stagekit.resume_location(out, work_dir),
                              device=dev)
            history = trainer.fit(callbacks=[stagekit.EpochLog()], resume=resume)
            if not stagekit.is_main():  # rank 0 writes the checkpoint and the record
                return {}
            processes = trainer.world_size
        model.cpu()

    metrics = {**stagekit.final_metrics(history), **(stagekit.trainer_metrics(trainer) if trainer is not None else {})}
    choice = {}
    if hp["baseline_candidate"]:  # the pretrained features are one more candidate (dcml.algorithm.baseline)
        model, choice = baseline.select(model, man, val_rows, hp["select_on"], train_rows=train_rows, activations=cache,
                                        device=stagekit.device_or_default(device), num_workers=hp["num_workers"],
                                        fusion=hp["fusion"])
        metrics.update(choice)
    record = timer.finish(inputs={"manifest": manifest, "checkpoints": checkpoints, "activations": activations,
                                  "clusters": clusters}, metrics=metrics,
                          history=history, extra={"merged_from": merged_from, "num_inputs": len(checkpoints),
                                                  "num_slices": int(model.num_slices), "processes": processes})
    stagekit.write_output(out, model, record, epoch=len(history),
                 **({"merged_from": merged_from} if merged_from is not None else {}))
    if trainer is not None:
        trainer.resume_path.unlink(missing_ok=True)
    summary = stagekit.training_summary(record) if trainer is not None else "merged, no fine-tuning"
    if "delivered" in choice:
        summary += "; " + baseline.choice_line(choice)
    events.emit("summary", text=summary)
    return record


@click.command("finetune")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="Manifest Parquet (dcml ingest).")
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="A trained checkpoint; repeat once per worker to merge them.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt).")
@click.option("--merge", type=click.Choice(MERGES), default="average", show_default=True,
              help="Backbones: average them, or take worker 0's (frozen backbones).")
@click.option("--activations", type=click.Path(file_okay=False),
              help="Fast mode: the cache of the frozen lower part (dcml extract --views N).")
@click.option("--clusters", type=click.Path(dir_okay=False),
              help="With --finetune-cluster-epochs: the clusters the workers trained on (dcml cluster).")
@params.click_options(*PARAMS, rename=RENAME)
@click.option("--freeze-backbone/--no-freeze-backbone", default=False, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where the resume file lives [default: beside --out].")
@click.option("--device", help="cuda | cpu [default: cuda when available].")
@click.option("--threads", type=int, help="CPU threads for torch [default: torch's]; 1 is fastest on a busy shared machine.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel processes on this node (torchrun): one per GPU, or CPU processes (gloo).")
def cli(**kwargs):
    """Merge sub-models (slices side by side, backbones averaged) and fine-tune on all data."""
    kwargs["checkpoints"] = list(kwargs["checkpoints"])
    record = run(**kwargs)
    click.echo(f"wrote {kwargs['out']} ({record['metrics']})")
    if "delivered" in record["metrics"]:
        click.echo(baseline.choice_line(record["metrics"]))
        warning = baseline.noise_warning(record["metrics"])
        if warning:
            click.echo(warning)
