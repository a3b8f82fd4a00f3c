"""Running a model for the quantiser: its device, training batches (unpacking,
cycling) and eval mode with gradients on chosen parameters only.

Shared by :mod:`.corrections`, :mod:`.importance` and :mod:`.finetune`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dcml.contracts.errors import DcmlError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def images_and_labels(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DcmlError("each batch must be a tuple (images, labels, ...); use a DataLoader over dcml.algorithm.data.ManifestImageDataset")
    return batch[0].to(device), batch[1].to(device)


def cycle_batches(batches: Iterable, count: int):
    """``count`` batches, re-iterating ``batches`` when it runs out."""
    taken = 0
    while taken < count:
        yielded = False
        for batch in batches:
            yielded = True
            yield batch
            taken += 1
            if taken >= count:
                return
        if not yielded:
            raise DcmlError("no training batches to draw from; the train split needs at least two classes with two images each")


class EvalWithGrads:
    """Eval mode (frozen BN statistics, no dropout) with gradients on the
    parameters ``names`` only; restores modes and requires_grad flags on exit."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = set(names)

    def __enter__(self):
        self.was_training = self.model.training
        self.flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.eval()
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in self.names)
        return self

    def __exit__(self, *exc):
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.flags[name])
            p.grad = None
        self.model.train(self.was_training)
        return False

