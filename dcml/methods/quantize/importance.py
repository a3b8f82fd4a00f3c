"""The diagonal Fisher importance that ``loss-aware`` codebooks weight each
weight's squared error by (see :mod:`.codebooks`)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: see dcml.contracts.events.progress

from dcml.contracts.errors import DcmlError

from ._runtime import EvalWithGrads, LossFn, cycle_batches, device_of, images_and_labels
from .codebooks import quantizable_weights


def compute_importance(model: nn.Module, batches: Iterable, loss_fn: LossFn, *,
                       num_batches: int | None = None, stats: dict | None = None,
                       desc: str = "importance") -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the metric loss for every conv/linear weight.

    For each batch ``(images, labels, ...)`` the loss ``loss_fn(model(images),
    labels)`` is back-propagated in eval mode and the squared gradient of every
    quantisable weight is accumulated. ``num_batches`` draws that many batches
    (re-iterating ``batches`` if needed); None uses ``batches`` once. Batches
    whose loss is zero or carries no gradient (no active pair mined) are
    skipped; when every batch is, a DcmlError says so.
    Returns float32 tensors on the CPU, same shapes as the weights; ``stats``
    (a dict, optional) receives ``batches_used`` and ``batches_skipped``.
    """
    layers = quantizable_weights(model)
    device = device_of(model)
    importance = {name: torch.zeros_like(p, dtype=torch.float32, device=device) for name, p in layers.items()}
    stream = batches if num_batches is None else cycle_batches(batches, int(num_batches))
    used = skipped = 0
    with EvalWithGrads(model, layers):
        for batch in tqdm(stream, desc=desc, total=num_batches, disable=None, leave=False):
            model.zero_grad(set_to_none=True)
            images, labels = images_and_labels(batch, device)
            loss = loss_fn(model(images), labels)
            # A zero loss (no active pair/triplet) carries no information.
            if not loss.requires_grad or float(loss.detach()) == 0.0:
                skipped += 1
                continue
            loss.backward()
            for name, p in layers.items():
                if p.grad is not None:
                    importance[name] += p.grad.detach().float() ** 2
            used += 1
    if used == 0:
        raise DcmlError(f"the loss was zero on all {skipped} importance batches, so no importance could be measured; "
                        "use more batches, another miner (e.g. --miner none) or the plain kmeans method")
    if stats is not None:
        stats.update(batches_used=used, batches_skipped=skipped)
    return {name: h.cpu() for name, h in importance.items()}
