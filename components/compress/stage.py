"""Optional stage: k-means weight sharing of a trained embedding model.

Every conv/linear weight tensor keeps 2^B shared float32 values (its codebook)
and a B-bit index per weight (``dcml.methods.quantize``); biases and BatchNorm stay
float32. Before clustering, every conv that feeds a BatchNorm gets equal
per-channel weight ranges (the scale moves into the BatchNorm, the function
is unchanged); after it, each BatchNorm's running mean is corrected for the
mean shift quantisation caused, measured on train images. ``loss-aware``
weights the k-means centroid update by the diagonal Fisher of the metric
loss, measured on class-balanced P x M batches of the manifest's train split
(eval transforms). Optional centroid fine-tuning trains the shared values
(and the float biases / BatchNorm affine parameters) on such batches (train
transforms), by default to reproduce the float model's embeddings. The output
is a ``dcml.compressed/1`` checkpoint that ``dcml evaluate --model`` reads
like any other.
"""

from __future__ import annotations

from pathlib import Path

import click

from dcml.contracts.errors import DcmlError
from dcml.contracts.io import check_writable
from dcml.contracts.params import PARAMS as _P
from dcml.contracts.records import StageTimer
from dcml import stagekit

STAGE = "compress"
# The checkpoint does not carry a proxy loss's trained proxies, so only
# pair-based losses give meaningful gradients here.
IMPORTANCE_LOSSES = ("margin", "triplet", "contrastive")
FINETUNE_LOSSES = ("distill", "metric")
EQUALIZE_CHECK_IMAGES = 8


def training_batches(man, rows, model_config, *, train: bool, classes_per_batch: int, images_per_class: int,
                     seed: int, num_workers: int):
    """Class-balanced P x M batches ``(images, labels, row_index)`` of ``rows``
    (one epoch per iteration; each new iteration draws the next epoch)."""
    from torch.utils.data import DataLoader

    from dcml.algorithm.data import ManifestImageDataset, build_transform
    from dcml.algorithm.samplers import ClusterBatchSampler

    dataset = ManifestImageDataset(man, rows, build_transform(model_config, train=train))
    sampler = ClusterBatchSampler(rows["label"].to_numpy(), None, classes_per_batch=classes_per_batch,
                                  images_per_class=images_per_class, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)


def calibration_images(man, rows, model_config, count: int, seed: int):
    """``count`` train images (eval transforms), drawn at random with ``seed``, as one tensor."""
    import torch

    from dcml.algorithm.data import ManifestImageDataset, build_transform

    picked = rows.sample(min(int(count), len(rows)), random_state=int(seed))
    dataset = ManifestImageDataset(man, picked, build_transform(model_config, train=False))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def equalize_checked(net, calibration) -> list[str]:
    """Channel equalisation of ``net``, its function checked on the first few
    calibration images (a handful show a conv output that feeds more than its
    BatchNorm; all of them would triple a costly forward pass for nothing)."""
    from dcml.methods import quantize as Q

    return Q.equalize_channels(net, calibration[:EQUALIZE_CHECK_IMAGES])


def importance_loss(model, loss: str, miner: str, margin: float | None):
    """loss(embeddings, labels): the loss of every slice of the full embedding,
    summed (a K=1 model has one slice: the whole embedding)."""
    from dcml.algorithm.losses import build_loss, build_miner

    bounds = [model.slice_bounds(k) for k in range(model.num_slices)]
    losses = [build_loss(loss, embedding_dim=b - a, margin=margin) for a, b in bounds]
    mine = build_miner(miner, loss=loss)

    def fn(embeddings, labels):
        total = 0.0
        for (a, b), crit in zip(bounds, losses):
            # Slices of the full embedding are normalised on their own, so
            # embeddings[:, a:b] is exactly what learner k was trained on.
            part = embeddings[:, a:b]
            total = total + (crit(part, labels, mine(part, labels)) if mine is not None else crit(part, labels))
        return total

    return fn


def run(model, manifest, out, bits: int = 4, method: str = _P["compress_method"].default, importance_batches: int = 20,
        finetune_steps: int = _P["compress_finetune_steps"].default, finetune_lr: float = 1e-3,
        finetune_loss: str = "distill", finetune_float: bool = True, equalize: bool = True,
        bias_correction: bool = True, calibration_images_count: int = 256, damping: float = 0.0,
        loss: str = _P["loss"].default, miner: str = _P["miner"].default, margin: float | None = None,
        classes_per_batch: int = _P["classes_per_batch"].default, images_per_class: int = _P["images_per_class"].default,
        seed: int = _P["seed"].default, num_workers: int = _P["num_workers"].default, device=None) -> dict:
    """Quantise ``model``'s conv/linear weights to ``bits`` bits with ``method``,
    write the compressed checkpoint ``out``, and return the stage record."""
    stagekit.stage_process()  # this process: glibc keeps large batch buffers for reuse
    import copy

    import torch

    from dcml.contracts import manifest as manifest_lib
    from dcml.methods import quantize as Q
    from dcml.model_files import load_model
    from dcml.algorithm.inference import resolve_device

    params = {"model": str(model), "bits": int(bits), "method": method, "importance_batches": int(importance_batches),
              "finetune_steps": int(finetune_steps), "finetune_lr": float(finetune_lr),
              "finetune_loss": finetune_loss, "finetune_float": bool(finetune_float), "equalize": bool(equalize),
              "bias_correction": bool(bias_correction), "calibration_images": int(calibration_images_count),
              "damping": float(damping), "loss": loss, "miner": miner,
              "margin": margin, "classes_per_batch": int(classes_per_batch),
              "images_per_class": int(images_per_class), "seed": int(seed)}
    timer = StageTimer(STAGE, params)
    check_writable(out)
    Q.check_bits(bits)
    Q.check_method(method)
    if loss not in IMPORTANCE_LOSSES:
        raise DcmlError(f"--loss {loss!r}: compression needs a pair-based loss ({', '.join(IMPORTANCE_LOSSES)}); "
                        "a proxy loss's trained proxies are not stored in the checkpoint")
    if finetune_loss not in FINETUNE_LOSSES:
        raise DcmlError(f"--finetune-loss {finetune_loss!r}: use one of {', '.join(FINETUNE_LOSSES)}")
    if method == "loss-aware" and int(importance_batches) < 1:
        raise DcmlError(f"--importance-batches {importance_batches}: loss-aware needs at least 1 batch")
    if int(finetune_steps) < 0 or not float(finetune_lr) > 0:
        raise DcmlError(f"--finetune-steps {finetune_steps} / --finetune-lr {finetune_lr}: steps must be >= 0 and lr > 0")
    if (equalize or bias_correction) and int(calibration_images_count) < 2:
        raise DcmlError(f"--calibration-images {calibration_images_count}: equalisation and bias correction need "
                        "at least 2 train images")

    device = resolve_device(device)
    net, _ = load_model(model, device=device)
    man = manifest_lib.read(manifest)
    rows = man.split("train")
    needs_data = equalize or bias_correction or method == "loss-aware" or int(finetune_steps) > 0
    if needs_data and rows.empty:
        raise DcmlError(f"{manifest}: no 'train' rows to calibrate and measure the loss on; pass the manifest the "
                        "model was trained with (or --no-equalize --no-bias-correction with uniform / kmeans)")
    torch.manual_seed(int(seed))
    batch_opts = {"classes_per_batch": int(classes_per_batch), "images_per_class": int(images_per_class),
                  "seed": int(seed), "num_workers": int(num_workers)}
    needs_metric_loss = method == "loss-aware" or (int(finetune_steps) > 0 and finetune_loss == "metric")
    loss_fn = importance_loss(net, loss, miner, margin) if needs_metric_loss else None
    calibration = calibration_images(man, rows, net.config, calibration_images_count, seed) \
        if equalize or bias_correction else None

    equalized = equalize_checked(net, calibration) if equalize else []
    # The float model (after the function-preserving equalisation): reference
    # for bias correction and teacher for distillation.
    distill = int(finetune_steps) > 0 and finetune_loss == "distill"
    float_net = copy.deepcopy(net) if bias_correction or distill else None
    original = {name: p.detach().cpu().clone() for name, p in Q.quantizable_weights(net).items()}
    importance, stats = None, {}
    if method == "loss-aware":
        loader = training_batches(man, rows, net.config, train=False, **batch_opts)
        importance = Q.compute_importance(net, loader, loss_fn, num_batches=int(importance_batches), stats=stats)
    quantized = Q.quantize_model(net, int(bits), method, importance, damping=float(damping))
    Q.apply_quantized(net, quantized)
    corrected = Q.correct_bias(net, float_net, calibration) if bias_correction else 0

    history = []
    if int(finetune_steps) > 0:
        before = Q.error_summary(Q.reconstruction_errors(original, quantized, importance))
        loader = training_batches(man, rows, net.config, train=True, **{**batch_opts, "seed": int(seed) + 1})
        teacher = float_net if distill else None
        quantized, losses = Q.finetune_centroids(net, quantized, loader, loss_fn, int(finetune_steps),
                                                 float(finetune_lr), teacher=teacher, train_float=finetune_float)
        history = [{"step": i + 1, "loss": value} for i, value in enumerate(losses)]
    per_layer = Q.reconstruction_errors(original, quantized, importance)
    after = Q.error_summary(per_layer)

    metrics = {
        "bits": int(bits),
        "method": method,
        "quantized_layers": len(quantized),
        "equalized_layers": len(equalized),
        "bias_corrected_batchnorms": corrected,
        "recon_mse": after["mse"],
        "recon_rel_mse_mean": after["rel_mse_mean"],
        "recon_rel_mse_max": after["rel_mse_max"],
        "recon_max_abs": after["max_abs"],
    }
    if "weighted_sq_error" in after:
        metrics["recon_weighted_sq_error"] = after["weighted_sq_error"]
    if stats:
        metrics["importance_batches_used"] = stats["batches_used"]
    if history:
        metrics["recon_rel_mse_mean_before_finetune"] = before["rel_mse_mean"]
        metrics["finetune_loss_first"] = history[0]["loss"]
        metrics["finetune_loss_last"] = history[-1]["loss"]
    record = timer.finish(inputs={"model": model, "manifest": manifest}, metrics=metrics, history=history,
                          extra={"device": str(device), "layers": per_layer})
    report = Q.save_compressed(out, net.cpu(), quantized, record=record)
    record["metrics"].update(report)
    return record


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.2f} MiB"


@click.command(name=STAGE, help="k-means weight quantisation of a model -> compact checkpoint (codebooks + packed indices).")
@click.option("--model", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Trained dcml checkpoint.")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest whose train split gives the importance / fine-tuning batches.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Compressed checkpoint to write.")
@click.option("--bits", default=4, show_default=True, type=click.IntRange(2, 8),
              help="Bits per weight: 2^B shared values per layer (the pipeline runs this stage only when compress_bits > 0).")
@click.option("--method", default=_P["compress_method"].default, show_default=True,
              type=click.Choice(list(_P["compress_method"].choices)))
@click.option("--importance-batches", default=20, show_default=True, type=int, help="Batches for the Fisher importance (loss-aware).")
@click.option("--finetune-steps", default=_P["compress_finetune_steps"].default, show_default=True, type=int, help="Centroid fine-tuning steps (0 = none).")
@click.option("--finetune-lr", default=1e-3, show_default=True, type=float, help="Adam learning rate of the centroids.")
@click.option("--finetune-loss", default="distill", show_default=True, type=click.Choice(list(FINETUNE_LOSSES)),
              help="distill: match the float model's embeddings; metric: the --loss metric loss on the labels.")
@click.option("--finetune-float/--centroids-only", default=True, show_default=True,
              help="Fine-tuning also trains the float biases and BatchNorm gamma/beta.")
@click.option("--equalize/--no-equalize", default=True, show_default=True,
              help="Equalise per-channel weight ranges of convs followed by BatchNorm before clustering.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Correct BatchNorm running means for the mean shift quantisation causes.")
@click.option("--calibration-images", default=256, show_default=True, type=int,
              help="Train images (eval transforms) for equalisation check and bias correction.")
@click.option("--damping", default=0.0, show_default=True, type=float,
              help="loss-aware: add this x the mean importance to every importance (shrinks towards plain kmeans).")
@click.option("--loss", default=_P["loss"].default, show_default=True, type=click.Choice(list(IMPORTANCE_LOSSES)))
@click.option("--miner", default=_P["miner"].default, show_default=True, type=click.Choice(list(_P["miner"].choices)))
@click.option("--margin", default=None, type=float, help="Loss margin (default: the loss's own).")
@click.option("--classes-per-batch", default=_P["classes_per_batch"].default, show_default=True, type=int,
              help=_P["classes_per_batch"].help)
@click.option("--images-per-class", default=_P["images_per_class"].default, show_default=True, type=int,
              help=_P["images_per_class"].help)
@click.option("--seed", default=_P["seed"].default, show_default=True, type=int)
@click.option("--num-workers", default=_P["num_workers"].default, show_default=True, type=int,
              help=_P["num_workers"].help)
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available).")
def cli(model, manifest, out, bits, method, importance_batches, finetune_steps, finetune_lr, finetune_loss,
        finetune_float, equalize, bias_correction, calibration_images, damping, loss, miner, margin,
        classes_per_batch, images_per_class, seed, num_workers, device):
    record = run(model=model, manifest=manifest, out=out, bits=bits, method=method,
                 importance_batches=importance_batches, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                 finetune_loss=finetune_loss, finetune_float=finetune_float, equalize=equalize,
                 bias_correction=bias_correction, calibration_images_count=calibration_images,
                 damping=damping, loss=loss, miner=miner, margin=margin, classes_per_batch=classes_per_batch,
                 images_per_class=images_per_class, seed=seed, num_workers=num_workers, device=device)
    m = record["metrics"]
    click.echo(f"{out}: {method} {bits} bits, {m['quantized_layers']} layers, {_kib(m['compressed_size_bytes'])} "
               f"(float {_kib(m['float_size_bytes'])}, x{m['compression_ratio']:.1f}; budget {_kib(m['budget_bytes'])}), "
               f"relative weight MSE {m['recon_rel_mse_mean']:.4g}")
