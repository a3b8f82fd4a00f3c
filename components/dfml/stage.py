"""DFML training stage: factorised backbone + router, a normal dcml checkpoint out.

The pretrained model is factorised losslessly (``dcml.methods.dfml.factorize``): each
EfficientNet-Lite MBConv block becomes G sub-blocks and gets a router. Every
batch goes through the network twice: the full pass (all sub-blocks, the
original function) and the routed pass (one sub-block per block and sample).

    loss = L(full) + routed_weight * L(routed) + distill_weight * KD(routed -> full, detached)

with KD the KL divergence between the in-batch similarity distributions
(``dcml.methods.dfml.similarity_distillation``). After training the sub-blocks are
merged back (``dcml.methods.dfml.defactorize``), so the checkpoint holds the plain
EmbeddingModel: ``dcml evaluate`` / ``extract`` / ``compress`` use it as is.
The record's history carries, per epoch, how many samples each block sent to
each of its sub-blocks.

The training loop is ``dcml.methods.dfml.DFMLTrainer``; this module only reads
the arguments and the manifest and writes the checkpoint and its record.
``nproc=N`` (``--nproc``, the pipeline's ``gpus_per_task``): N data-parallel
processes on this node (torchrun; dcml.launch); rank 0 writes the checkpoint.
"""

from __future__ import annotations

import click

from dcml.contracts import events
from dcml.contracts.io import check_writable
from dcml import launch, stagekit
from dcml.algorithm import baseline
from dcml.algorithm.training import seed_everything
from dcml.contracts import params
from dcml.contracts.errors import DcmlError
from dcml.contracts.records import StageTimer
from dcml.methods import dfml

FACTORIZABLE_BACKBONES = ("efficientnet_lite0",)
# Hyper-parameters this stage takes (dcml.contracts.params); dfml_groups is its --groups.
PARAMS = tuple(n for n in stagekit.MODEL_PARAMS if n != "train_blocks") + ("dfml_groups", "lr_router") \
    + stagekit.TRAINING_PARAMS + ("baseline_candidate", "fusion")
RENAME = params.STAGE_NAMES["train-dfml"]
FIXED_DEFAULTS = {"backbone": "efficientnet_lite0"}  # the only backbone DFML can factorise


def run(manifest, out, routed_weight=0.5, distill_weight=0.5, temperature=0.1, balance_weight=0.0,
        routed_scale=None, eval_routed=False, dropout=None, resume=True, work_dir=None, device=None,
        nproc=1, **hyper) -> dict:
    """Train DFML and write a plain dcml checkpoint to ``out``; returns the stage record.

    ``hyper``: the hyper-parameters in ``PARAMS`` (defaults from
    dcml.contracts.params; ``groups`` is the pipeline's dfml_groups).
    ``routed_scale=None`` is G (see dcml.methods.dfml.factorize). ``nproc``:
    data-parallel processes.
    """
    stagekit.stage_process()  # this process: glibc keeps large batch buffers for reuse
    call = {k: v for k, v in locals().items() if k != "hyper"} | hyper
    hp = params.resolve(PARAMS, hyper, "train-dfml", rename=RENAME, fixed_defaults=FIXED_DEFAULTS)
    check_writable(out)
    if launch.needed(stagekit.check_nproc(nproc)):
        return launch.run_processes(f"{__name__}:run", call, nproc)
    backbone, groups = hp["backbone"], hp["groups"]
    options = {"routed_weight": routed_weight, "distill_weight": distill_weight, "temperature": temperature,
               "balance_weight": balance_weight, "routed_scale": routed_scale, "eval_routed": eval_routed,
               "dropout": dropout, "resume": resume, "device": device}
    from dcml.algorithm.models import build_model

    if backbone not in FACTORIZABLE_BACKBONES:
        raise DcmlError(f"backbone={backbone!r} cannot be factorised for DFML; use one of {', '.join(FACTORIZABLE_BACKBONES)}")
    man, train_rows, eval_rows, val_rows = stagekit.load_manifest(manifest)

    seed_everything(hp["seed"])  # the fresh head's and the routers' init are part of the run
    plain = build_model(stagekit.model_config(hp, num_slices=1, dropout=dropout, train_blocks=-1))
    model = dfml.factorize(plain, groups=int(groups), routed_scale=routed_scale)
    del plain

    settings = stagekit.train_settings(hp, recluster_every=0)
    timer = StageTimer("train-dfml", {**hp, **options})
    with stagekit.processes(device) as dev:
        trainer = dfml.DFMLTrainer(model, man, train_rows, settings, lr_router=hp["lr_router"],
                                   routed_weight=float(routed_weight), distill_weight=float(distill_weight),
                                   temperature=float(temperature), balance_weight=float(balance_weight),
                                   eval_routed=bool(eval_routed), eval_rows=eval_rows, val_rows=val_rows,
                                   fresh_head=True, **stagekit.resume_location(out, work_dir), device=dev)
        history = trainer.fit(callbacks=[stagekit.EpochLog()], resume=resume)
        if not stagekit.is_main():  # rank 0 writes the checkpoint and the record
            return {}
        processes = trainer.world_size

    merged = dfml.defactorize(trainer.model.cpu())
    metrics = {**stagekit.final_metrics(history), **stagekit.trainer_metrics(trainer)}
    if history and "routing_entropy" in history[-1]:
        metrics["routing_entropy"] = history[-1]["routing_entropy"]
        metrics["collapsed_units"] = history[-1]["collapsed_units"]
        if "routed_recall@1" in history[-1]:
            metrics["routed_recall@1"] = history[-1]["routed_recall@1"]
    choice = {}
    if hp["baseline_candidate"]:  # the pretrained features: this pipeline's baseline and a candidate
        merged, choice = baseline.select(merged, man, val_rows, hp["select_on"], train_rows=train_rows,
                                         test_rows=eval_rows, fusion=hp["fusion"],
                                         device=stagekit.device_or_default(device), num_workers=hp["num_workers"])
        metrics.update(choice)
    units = dfml.routed_units(trainer.model)
    record = timer.finish(inputs={"manifest": manifest}, metrics=metrics, history=history, extra={
        "method": "dfml", "groups": int(groups), "routed_scale": units[0][1].routed_scale,
        "routed_units": [name for name, _ in units],
        "routing": history[-1]["routing"] if history else {}, "processes": processes,
    })
    stagekit.write_output(out, merged, record, epoch=trainer.epoch)
    trainer.resume_path.unlink(missing_ok=True)
    events.emit("summary", text=stagekit.training_summary(record)
                + (f"; {baseline.choice_line(choice)}" if "delivered" in choice else ""))
    return record


@click.command("train-dfml")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="Manifest Parquet (dcml ingest).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt), a plain dcml model.")
@params.click_options(*PARAMS, rename=RENAME, fixed_defaults=FIXED_DEFAULTS)
@click.option("--routed-weight", type=float, default=0.5, show_default=True, help="Weight of L(routed).")
@click.option("--distill-weight", type=float, default=0.5, show_default=True, help="Weight of KD(routed -> full).")
@click.option("--temperature", type=float, default=0.1, show_default=True, help="Softmax temperature of the KD.")
@click.option("--balance-weight", type=float, default=0.0, show_default=True,
              help="Weight of the routers' load-balancing term (0 = DFML as published).")
@click.option("--routed-scale", type=float, help="Routed output = scale x chosen sub-block [default: G].")
@click.option("--eval-routed/--no-eval-routed", default=False, show_default=True,
              help="Also evaluate the routed model and log how test images are routed.")
@click.option("--dropout", type=float, help="Dropout before the head [default: 0.01].")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from <out>.resume.pt if present.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where the resume file lives [default: beside --out].")
@click.option("--device", help="cuda | cpu [default: cuda when available].")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel processes on this node (torchrun): one per GPU, or CPU processes (gloo).")
def cli(**kwargs):
    """Deep Factorized Metric Learning: factorised backbone + router, plain checkpoint out."""
    record = run(**kwargs)
    click.echo(f"wrote {kwargs['out']} ({record['metrics']})")
