"""Centroid fine-tuning after quantisation (Deep Compression): the shared
values train on the metric loss or, by default in the compress stage, by
distilling the float model's embeddings."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: see dcml.contracts.events.progress

from dcml.contracts.errors import DcmlError

from ._runtime import EvalWithGrads, LossFn, cycle_batches, device_of, images_and_labels
from .codebooks import QuantizedTensor, quantizable_weights


def distillation_loss(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half the squared distance to the float model's embedding, batch mean
    (for unit-norm embeddings: 1 - cosine; for K slices, summed over slices)."""
    return 0.5 * ((embeddings - target) ** 2).sum(dim=1).mean()


def float_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that is not a quantised weight: biases, BatchNorm gamma/beta."""
    quantized = {id(p) for p in quantizable_weights(model).values()}
    return {name: p for name, p in model.named_parameters() if id(p) not in quantized}


def finetune_centroids(model: nn.Module, codebooks: Mapping[str, QuantizedTensor], batches: Iterable,
                       loss_fn: LossFn | None, steps: int, lr: float, *, optimizer: str = "adam",
                       teacher: nn.Module | None = None, train_float: bool = False,
                       desc: str = "finetune centroids") -> tuple[dict[str, QuantizedTensor], list[float]]:
    """Train the shared values (Deep Compression's centroid fine-tuning).

    Each step materialises every quantised weight from its codebook and fixed
    indices, back-propagates the loss of one batch, and gives centroid j the
    summed gradient of its members (the exact gradient of the loss w.r.t. the
    shared value); ``optimizer`` ("adam" or "sgd") then moves the centroids.
    The loss is ``loss_fn(embeddings, labels)`` or, with a ``teacher`` (the
    float model), :func:`distillation_loss` to the teacher's embedding of the
    same images: a dense signal on every image, where a metric loss on a
    trained model is near zero on most pairs. ``train_float`` also trains the
    float parameters (biases, BatchNorm gamma/beta; stored in float32 anyway)
    at the same learning rate. Indices and BatchNorm statistics stay fixed;
    the model runs in eval mode. Returns (new codebooks, loss per step); the
    model ends up holding the fine-tuned quantised weights.
    """
    if steps < 0:
        raise DcmlError(f"finetune steps={steps}: must be >= 0")
    if lr <= 0:
        raise DcmlError(f"finetune lr={lr}: must be > 0")
    if loss_fn is None and teacher is None:
        raise DcmlError("centroid fine-tuning needs a loss: pass loss_fn or a teacher model to distil from")
    layers = quantizable_weights(model)
    device = device_of(model)
    centroids = {name: q.codebook.detach().to(device, torch.float32).clone().requires_grad_(True)
                 for name, q in codebooks.items()}
    indices = {name: q.indices.to(device) for name, q in codebooks.items()}
    extra = float_parameters(model) if train_float else {}
    trainable = list(centroids.values()) + list(extra.values())
    if optimizer == "adam":
        opt = torch.optim.Adam(trainable, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=lr)
    else:
        raise DcmlError(f"optimizer={optimizer!r}: use 'adam' or 'sgd'")
    if teacher is not None:
        teacher.eval()

    def materialise():
        with torch.no_grad():
            for name, c in centroids.items():
                layers[name].copy_(c[indices[name]].reshape(layers[name].shape))

    def batch_loss(batch):
        images, labels = images_and_labels(batch, device)
        embeddings = model(images)
        if teacher is None:
            return loss_fn(embeddings, labels)
        with torch.no_grad():
            target = teacher(images)
        return distillation_loss(embeddings, target)

    losses: list[float] = []
    materialise()
    with EvalWithGrads(model, [*centroids, *extra]):
        for batch in tqdm(cycle_batches(batches, steps) if steps else [], desc=desc, total=steps, disable=None, leave=False):
            model.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(batch)
            losses.append(float(loss.detach()))
            if not loss.requires_grad:
                continue
            loss.backward()
            for name, c in centroids.items():
                grad = layers[name].grad
                if grad is not None:
                    c.grad = torch.zeros_like(c).index_add_(0, indices[name], grad.reshape(-1).float())
            opt.step()
            materialise()
    tuned = {name: QuantizedTensor(codebook=c.detach().cpu().clone(), indices=codebooks[name].indices,
                                   shape=codebooks[name].shape, bits=codebooks[name].bits)
             for name, c in centroids.items()}
    return tuned, losses
