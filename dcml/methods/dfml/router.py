"""Routing: the straight-through hard one-hot, the :class:`Router`, the state every
routed unit shares (G, route mode, routed scale, routing counts), and the routing
counts of a whole model with their summary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def straight_through_one_hot(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard one-hot of argmax(softmax(logits)) in the forward pass, softmax gradients backward.

    Returns (gates, index): gates has the shape of ``logits`` with exactly one 1
    per row in value; index holds the chosen position.
    """
    probs = F.softmax(logits, dim=-1)
    index = probs.argmax(dim=-1)
    hard = F.one_hot(index, logits.shape[-1]).to(probs.dtype)
    # (probs - probs.detach()) is exactly 0, so the forward value is exactly one-hot.
    return hard + (probs - probs.detach()), index


class Router(nn.Module):
    """Bias-free Linear(in_features -> G) followed by a straight-through hard one-hot.

    Each call also keeps ``balance`` = G * sum_g f_g * P_g (f_g: share of rows
    sent to g, P_g: their mean softmax probability of g), the Switch-Transformer
    load-balancing term: 1 for an even spread, up to G when collapsed; its
    gradient (through P) pushes probability away from over-used sub-blocks.
    """

    def __init__(self, in_features: int, groups: int, data_init: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_features, groups, bias=False)
        self.balance: torch.Tensor | None = None
        # Persistent, so a resumed run does not initialise twice.
        self.register_buffer("init_pending", torch.tensor(bool(data_init)))

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Make the logits of these rows zero-mean with unit spread per sub-block.

        Block inputs share a large common component (pooled ReLU6 activations
        are all positive), so a randomly initialised router sends nearly every
        sample to the same sub-block. Projecting the batch-mean direction out of
        each router row removes it: the routing then starts from a random
        projection of how samples differ.
        """
        from dcml.algorithm import distributed

        rows = x.detach().reshape(-1, x.shape[-1]).to(self.linear.weight.dtype)
        if distributed.active():
            # Data parallel: every process holds a share of the batch; the statistics must be the
            # whole batch's, or each process starts its router from different weights (which the
            # all-reduced gradients then never bring together).
            self._data_init_global(rows)
        else:
            self._data_init_local(rows)

    @torch.no_grad()
    def _data_init_local(self, rows: torch.Tensor) -> None:
        if rows.shape[0] < 2:
            return
        mean = rows.mean(dim=0)
        direction = mean / mean.norm().clamp_min(1e-12)
        weight = self.linear.weight
        weight -= (weight @ direction).unsqueeze(1) * direction.unsqueeze(0)
        spread = (rows @ weight.T).std(dim=0).clamp_min(1e-6)
        weight /= spread.unsqueeze(1)
        self.init_pending.fill_(False)

    @torch.no_grad()
    def _data_init_global(self, rows: torch.Tensor) -> None:
        """:meth:`data_init` with the mean and spread summed over the processes' shares (every
        process calls it at the same step, also with an empty share)."""
        from dcml.algorithm.distributed import all_reduce_sum_

        head = torch.cat([torch.tensor([float(rows.shape[0])], dtype=rows.dtype, device=rows.device), rows.sum(0)])
        all_reduce_sum_(head)
        count = float(head[0])
        if count < 2:
            return
        mean = head[1:] / count
        direction = mean / mean.norm().clamp_min(1e-12)
        weight = self.linear.weight
        weight -= (weight @ direction).unsqueeze(1) * direction.unsqueeze(0)
        projected = rows @ weight.T
        centre = all_reduce_sum_(projected.sum(0)) / count
        squares = all_reduce_sum_(((projected - centre) ** 2).sum(0))
        weight /= (squares / (count - 1)).sqrt().clamp_min(1e-6).unsqueeze(1)
        self.init_pending.fill_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and bool(self.init_pending):
            self.data_init(x)
        logits = self.linear(x)
        gates, index = straight_through_one_hot(logits)
        groups = logits.shape[-1]
        probs = F.softmax(logits, dim=-1).reshape(-1, groups)
        share = torch.bincount(index.reshape(-1), minlength=groups).to(probs.dtype) / max(probs.shape[0], 1)
        self.balance = groups * (share * probs.mean(dim=0)).sum()
        return gates, index


class RoutedUnit(nn.Module):
    """Common state of a factorised unit: G, route mode, routing counts."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = int(groups)
        self.route_mode = "full"
        # The routed pass outputs routed_scale x the chosen sub-block (see factorize).
        self.routed_scale = float(groups)
        # How often each sub-block was chosen in routed passes (samples or tokens).
        self.register_buffer("route_counts", torch.zeros(self.groups, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def _count(self, index: torch.Tensor) -> None:
        self.route_counts += torch.bincount(index.reshape(-1), minlength=self.groups).to(self.route_counts.device)


def routed_units(model: nn.Module) -> list[tuple[str, RoutedUnit]]:
    """(name, unit) of every unit with a router, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedUnit)]


def routing_counts(model: nn.Module) -> dict[str, list[int]]:
    """Samples (conv) or tokens (ViT) sent to each sub-block, per routed unit, since the last reset."""
    return {name: [int(c) for c in unit.route_counts.tolist()] for name, unit in routed_units(model)}


def reset_routing_counts(model: nn.Module) -> None:
    for _, unit in routed_units(model):
        unit.route_counts.zero_()


def routing_summary(counts: dict[str, list[int]]) -> dict:
    """Per-unit fractions and the normalised entropy of the spread (1 = even, 0 = collapsed)."""
    import math

    fractions, entropies = {}, []
    for name, row in counts.items():
        total = sum(row)
        frac = [c / total for c in row] if total else [0.0] * len(row)
        fractions[name] = [round(f, 4) for f in frac]
        if total:
            h = -sum(f * math.log(f) for f in frac if f > 0)
            entropies.append(h / math.log(len(row)))
    return {
        "fractions": fractions,
        "mean_normalized_entropy": round(sum(entropies) / len(entropies), 4) if entropies else None,
        "collapsed_units": sum(1 for row in counts.values() if sum(row) and max(row) == sum(row)),
    }
