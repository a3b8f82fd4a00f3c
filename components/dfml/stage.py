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
"""

from __future__ import annotations

import click

from dcml.methods import dfml
from dcml.contracts.errors import DcmlError
from dcml.contracts.records import StageTimer
from dcml.algorithm.training import TrainSettings, seed_everything

FACTORIZABLE_BACKBONES = ("efficientnet_lite0",)


def run(manifest, out, backbone="efficientnet_lite0", weights="imagenet", image_size=128, embedding_dim=128,
        groups=3, loss="proxy_anchor", margin=None, miner=None, classes_per_batch=20, images_per_class=4,
        lr_backbone=1e-4, lr_embedding=1e-4, lr_proxies=None, lr_router=1e-4, weight_decay=1e-4,
        epochs=10, routed_weight=0.5, distill_weight=0.5, temperature=0.1, balance_weight=0.0, routed_scale=None,
        eval_every=0, eval_routed=False, freeze_bn=None, dropout=None, seed=0, num_workers=0,
        resume=True, work_dir=None, device=None) -> dict:
    """Train DFML and write a plain dcml checkpoint to ``out``; returns the stage record.

    ``miner=None`` means "none" for proxy_anchor and "reference" for the pair
    losses. ``lr_proxies=None`` is 100 x lr_embedding. ``routed_scale=None``
    is G (see dcml.methods.dfml.factorize). ``freeze_bn=None``: frozen for
    pretrained weights.
    """
    params = {k: v for k, v in locals().items() if k not in ("manifest", "out", "work_dir")}
    from components.train.stage import (device_or_default, final_metrics, load_manifest, resume_file, selection_metrics,
                                        write_output)
    from dcml.algorithm.models import build_model

    if backbone not in FACTORIZABLE_BACKBONES:
        raise DcmlError(f"backbone={backbone!r} cannot be factorised for DFML; use one of {', '.join(FACTORIZABLE_BACKBONES)}")
    if miner is None:
        miner = "none" if loss == "proxy_anchor" else "reference"
    man, train_rows, eval_rows, val_rows = load_manifest(manifest)

    seed_everything(seed)  # the fresh head's and the routers' init are part of the run
    plain = build_model({"backbone": backbone, "weights": weights, "image_size": image_size,
                         "embedding_dim": embedding_dim, "num_slices": 1, "freeze_bn": freeze_bn,
                         "dropout": dropout})
    model = dfml.factorize(plain, groups=int(groups), routed_scale=routed_scale)
    del plain

    settings = TrainSettings(
        epochs=int(epochs), classes_per_batch=int(classes_per_batch), images_per_class=int(images_per_class),
        lr_backbone=float(lr_backbone), lr_embedding=float(lr_embedding),
        lr_loss=None if lr_proxies is None else float(lr_proxies), weight_decay=float(weight_decay),
        loss=loss, margin=margin, miner=miner, recluster_every=0, eval_every=int(eval_every),
        seed=int(seed), num_workers=int(num_workers),
    )
    timer = StageTimer("train-dfml", params)
    trainer = dfml.DFMLTrainer(model, man, train_rows, settings, lr_router=float(lr_router),
                               routed_weight=float(routed_weight), distill_weight=float(distill_weight),
                               temperature=float(temperature), balance_weight=float(balance_weight),
                               eval_routed=bool(eval_routed), eval_rows=eval_rows, val_rows=val_rows,
                               fresh_head=True, resume_path=resume_file(out, work_dir),
                               device=device_or_default(device))
    history = trainer.fit(resume=resume)

    merged = dfml.defactorize(trainer.model.cpu())
    metrics = {**final_metrics(history), **selection_metrics(trainer)}
    if history and "routing_entropy" in history[-1]:
        metrics["routing_entropy"] = history[-1]["routing_entropy"]
        metrics["collapsed_units"] = history[-1]["collapsed_units"]
        if "routed_recall@1" in history[-1]:
            metrics["routed_recall@1"] = history[-1]["routed_recall@1"]
    units = dfml.routed_units(trainer.model)
    record = timer.finish(inputs={"manifest": manifest}, metrics=metrics, history=history, extra={
        "method": "dfml", "groups": int(groups), "routed_scale": units[0][1].routed_scale,
        "routed_units": [name for name, _ in units],
        "routing": history[-1]["routing"] if history else {},
    })
    write_output(out, merged, record, epoch=trainer.epoch)
    trainer.resume_path.unlink(missing_ok=True)
    return record


@click.command("train-dfml")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="Manifest Parquet (dcml ingest).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt), a plain dcml model.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, type=click.Choice(FACTORIZABLE_BACKBONES))
@click.option("--weights", default="imagenet", show_default=True, help="imagenet | none | path to a local weights file.")
@click.option("--image-size", type=int, default=128, show_default=True)
@click.option("--embedding-dim", type=int, default=128, show_default=True)
@click.option("--groups", type=int, default=3, show_default=True, help="G: sub-blocks per block.")
@click.option("--loss", default="proxy_anchor", show_default=True,
              type=click.Choice(["proxy_anchor", "margin", "triplet", "contrastive"]))
@click.option("--margin", type=float, help="Loss margin [default: per loss].")
@click.option("--miner", type=click.Choice(["reference", "distance_weighted", "none"]),
              help="[default: none for proxy_anchor, reference otherwise]")
@click.option("--classes-per-batch", type=int, default=20, show_default=True, help="P")
@click.option("--images-per-class", type=int, default=4, show_default=True, help="M")
@click.option("--lr-backbone", type=float, default=1e-4, show_default=True)
@click.option("--lr-embedding", type=float, default=1e-4, show_default=True)
@click.option("--lr-proxies", type=float, help="Proxies / learnable beta [default: 100 x lr-embedding].")
@click.option("--lr-router", type=float, default=1e-4, show_default=True,
              help="Routers (1e-3 collapsed the routing within 3 epochs in a test run).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--routed-weight", type=float, default=0.5, show_default=True, help="Weight of L(routed).")
@click.option("--distill-weight", type=float, default=0.5, show_default=True, help="Weight of KD(routed -> full).")
@click.option("--temperature", type=float, default=0.1, show_default=True, help="Softmax temperature of the KD.")
@click.option("--balance-weight", type=float, default=0.0, show_default=True,
              help="Weight of the routers' load-balancing term (0 = DFML as published).")
@click.option("--routed-scale", type=float, help="Routed output = scale x chosen sub-block [default: G].")
@click.option("--eval-every", type=int, default=0, show_default=True, help="R@1 on the test split every N epochs (0 = never).")
@click.option("--eval-routed/--no-eval-routed", default=False, show_default=True,
              help="Also evaluate the routed model and log how test images are routed.")
@click.option("--freeze-bn/--no-freeze-bn", default=None, help="[default: frozen for pretrained weights]")
@click.option("--dropout", type=float, help="Dropout before the head [default: 0.01].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from <out>.resume.pt if present.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where the resume file lives [default: beside --out].")
@click.option("--device", help="cuda | cpu [default: cuda when available].")
def cli(**kwargs):
    """Deep Factorized Metric Learning: factorised backbone + router, plain checkpoint out."""
    record = run(**kwargs)
    click.echo(f"wrote {kwargs['out']} ({record['metrics']})")
