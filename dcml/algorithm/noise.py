"""Training noise drawn per sample of the global batch: dropout masks and stochastic depth that do not
depend on how many processes share a batch.

torch's own ``nn.Dropout`` and EfficientNet's drop-connect draw from the process's RNG stream, so N
data-parallel processes draw N unrelated sets of masks and end with other weights than one process.
Here a training step opens :func:`global_batch` (the trainer does, for every batch): from then on every
draw is of the *whole* global batch, ``[size, *shape]``, from one generator seeded for this batch, and a
process keeps the rows of its share. Every process makes the same draws in the same order (the same
layers on the same global batch size), so each computes exactly its share of what one process computes.
Outside a step (evaluation, a user's own loop) the draws come from torch's stream, as torch's do.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

_local = threading.local()


class _Step:
    """The draws of one global batch: its seed, its size, this process's rows ``[start, stop)``."""

    def __init__(self, seed: int, size: int, share: tuple[int, int]):
        self.seed, self.size, self.share = int(seed), int(size), (int(share[0]), int(share[1]))
        self.generators: dict[torch.device, torch.Generator] = {}

    def uniform(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        start, stop = self.share
        if like.shape[0] != stop - start:
            raise RuntimeError(f"per-sample noise: a tensor of {like.shape[0]} rows in a step whose share has "
                               f"{stop - start} (rows {start}..{stop} of a global batch of {self.size})")
        generator = self.generators.get(like.device)
        if generator is None:
            generator = self.generators[like.device] = torch.Generator(device=like.device).manual_seed(self.seed)
        whole = torch.rand((self.size, *shape), generator=generator, dtype=like.dtype, device=like.device)
        return whole[start:stop]


@contextlib.contextmanager
def global_batch(seed: int, size: int, share: tuple[int, int]):
    """Draw the noise of one training step per sample of a global batch of ``size``; this process holds
    rows ``share = (start, stop)`` of it (``(0, size)`` in one process). ``seed``: the batch's."""
    previous = getattr(_local, "step", None)
    _local.step = _Step(seed, size, share)
    try:
        yield
    finally:
        _local.step = previous


def uniform(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """U[0, 1) of shape ``[len(like), *shape]`` for the rows of ``like`` (its device and dtype)."""
    step = getattr(_local, "step", None)
    if step is None:
        return torch.rand((like.shape[0], *shape), dtype=like.dtype, device=like.device)
    return step.uniform(like, tuple(shape))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Each element zeroed with probability ``p``, the rest scaled by 1 / (1 - p) (``F.dropout``'s rule)."""
    if not training or p == 0:
        return x
    keep = (uniform(x, *x.shape[1:]) >= p).to(x.dtype)
    return x * keep / (1.0 - p)


def drop_connect(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: each sample's residual branch ``x`` [N, C, H, W] dropped with probability ``p``,
    kept ones scaled by 1 / (1 - p) (efficientnet-lite-pytorch's ``drop_connect`` rule)."""
    if not training or not p:
        return x
    keep_prob = 1.0 - p
    binary = torch.floor(keep_prob + uniform(x, *([1] * (x.dim() - 1))))
    return x / keep_prob * binary


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose masks are drawn per sample of the global batch (:func:`dropout`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
