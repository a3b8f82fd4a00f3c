"""BatchNorm over the whole global batch when N data-parallel processes each embed a share.

In one process a BatchNorm layer that trains normalises with the mean and
variance of the whole batch and updates its running statistics from them. With
N processes each holding a share, plain BatchNorm would use the share's
statistics: other outputs, other gradients, other running statistics on every
process. :func:`over_processes` replaces a model's BatchNorm layers so that they
use the global batch's statistics:

* on GPUs (NCCL): ``torch.nn.SyncBatchNorm``;
* on CPU (gloo, where SyncBatchNorm does not run): :class:`GlobalBatchNorm`.
  Each process sums its share's values and squared values per channel (in
  float64) and counts them; one all-reduce gives every process the global
  sums, and the mean and biased variance follow. The all-reduce is
  differentiable (:class:`_SummedOverProcesses`): its backward pass sums every
  process's gradient of the statistics, so each
  share's input gradient is the one the whole batch gives in one process. The
  affine weight and bias get their share's gradient, summed over the processes
  by :func:`dcml.algorithm.distributed.all_reduce_gradients` like every
  parameter. The running mean and (unbiased) variance are updated from the
  global statistics, so they are the same on every process and equal one
  process's up to float rounding.

The replacement keeps the parameters, buffers and state_dict keys, so
checkpoints are unchanged. BatchNorm inside DFML's routed units is left as it
is (a sub-block that no sample of a process's share is routed to does not run
there, so a collective in it would wait forever). Outside training mode, or with no process group,
:class:`GlobalBatchNorm` is plain BatchNorm (rank 0 alone validating in eval
mode runs no collective).
"""

from __future__ import annotations

import torch
from torch import nn

from dcml.algorithm import distributed


class _SummedOverProcesses(torch.autograd.Function):
    """``x`` summed over the processes; the gradient of each process's ``x`` is the sum of
    every process's gradient of the result (each process's loss reaches the global sums
    only through its own share's outputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum_(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum_(grad.clone())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any input ``[N, C, ...]``) whose training statistics are the global batch's."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.active()):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        wide = x.double()
        count = torch.tensor([x.numel() // channels], dtype=torch.float64, device=x.device)
        total = _SummedOverProcesses.apply(torch.cat([wide.sum(dims), (wide * wide).sum(dims), count]))
        n = float(total[-1].item())
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), n)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        inv_std = torch.rsqrt(var + self.eps)
        y = (x - mean.to(x.dtype).view(shape)) * inv_std.to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """As BatchNorm does: momentum (or the cumulative average when None), unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlobalBatchNorm` that shares
    its parameters and buffers (the state_dict is unchanged)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new
    if hasattr(module, "router") and hasattr(module, "sub_blocks"):
        # A routed unit (DFML): a sub-block may get no sample of some process's share and not
        # run there, so a collective inside it could wait forever; its BatchNorm keeps per-share
        # statistics.
        return module
    for name, child in module.named_children():
        new_child = convert(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def over_processes(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` with BatchNorm computing its training statistics over every process's share:
    SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` elsewhere (gloo)."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert(model)
