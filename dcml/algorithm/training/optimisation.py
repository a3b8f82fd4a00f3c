"""What the optimiser steps on: the losses (one per slice, one for the whole embedding), the miner,
the learning rate of every step (warm-up, schedule) and the numbers a step reports."""

from __future__ import annotations

import math

import torch


def build_losses(settings, model, num_classes: int, device):
    """(losses, miner, whether the miner draws random numbers): a loss per slice of ``model``, and one
    for the whole embedding after them when K > 1 (the whole-embedding and fine-tuning phases)."""
    from pytorch_metric_learning.miners import DistanceWeightedMiner

    from dcml.algorithm.losses import build_loss, build_miner

    s = settings

    def make(dim):
        return build_loss(s.loss, embedding_dim=dim, num_classes=num_classes, margin=s.margin, **s.loss_options)

    dims = [b - a for a, b in (model.slice_bounds(k) for k in range(model.num_slices))]
    losses = [make(d) for d in dims]
    if model.num_slices > 1:  # the fine-tuning phase trains the whole embedding as one
        losses.append(make(model.embedding_dim))
    miner = build_miner(s.miner, loss=s.loss)
    return torch.nn.ModuleList(losses).to(device), miner, isinstance(miner, DistanceWeightedMiner)


def set_learning_rates(optimizer, base_lrs: list[float], settings, epoch: int, step: int, steps: int,
                       warming_up: bool) -> None:
    """Learning rates of this step: backbone off while warming up, then the schedule."""
    s = settings
    factor = 1.0
    if s.schedule == "cosine" and not warming_up:
        span = max(s.epochs - s.warmup_epochs, 1)
        progress = (epoch - s.warmup_epochs + step / max(steps, 1)) / span
        factor = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    for group, base in zip(optimizer.param_groups, base_lrs):
        off = group.get("name") == "backbone" and warming_up
        group["lr"] = 0.0 if off else base * factor


def mined_counts(pairs) -> tuple[int, int]:
    """(positive, negative) pairs or triplets a miner returned."""
    if pairs is None:
        return 0, 0
    if len(pairs) == 4:
        return len(pairs[0]), len(pairs[2])
    return len(pairs[0]), len(pairs[0])


def nonzero_terms(loss_fn) -> int | None:
    """Non-zero loss terms of the last call, when the PML reducer records them."""
    reducers = getattr(loss_fn.reducer, "reducers", {"": loss_fn.reducer})
    for reducer in reducers.values():
        divisor = getattr(reducer, "divisor", None)
        if divisor is not None:
            return int(divisor)
    return None
