"""Data parallelism for the one training loop: ranks, the few collectives it needs, a
single-process fallback.

A training stage started with N processes (``--nproc N``: torchrun on one node,
or a Kubeflow TrainJob over several nodes, see :mod:`dcml.launch`) runs the
same :class:`dcml.algorithm.training.Trainer` in every process. This module is
all the Trainer knows about that:

* :func:`setup` joins the process group torchrun describes in the environment
  (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL with
  one GPU per process (``cuda:LOCAL_RANK``) on GPUs, gloo on CPU. Started
  without torchrun, nothing is set up and every helper below is the identity.
* A global batch (the sampler's P x M images) is cut into N contiguous shares
  (:func:`share_bounds`); process r computes the embeddings of share r and
  :func:`gather_batch` puts the N shares back together in batch order, the
  own share keeping its autograd graph. Every process then evaluates the pair
  loss and the miner on the whole batch -- the same tensor, in the same order,
  as one process would -- and back-propagates into its own share only.
* :func:`all_reduce_gradients` sums the model's gradients over the processes
  (the sum of the shares' contributions is the whole batch's gradient) and
  averages the gradients of parameters every process computes in full (the
  loss's own parameters: proxies, a learnable beta). Every process then takes
  the same optimiser step and the weights stay identical everywhere.

Why not pytorch-metric-learning's ``DistributedLossWrapper``: it puts the own
share first (each process sees the batch in another order, so miner ties and
reduction order differ between processes), and it scales the loss by N for
DistributedDataParallel's gradient averaging, which would also scale the
replicated loss parameters' gradients. The gather here does the same job (every
process's loss and miner see all embeddings; the others' are constants) with
the batch order of one process; tests/test_distributed.py checks on two gloo
processes that it gives the wrappers' loss and gradients
(``test_the_gathered_loss_and_miner_are_pml_distributed_wrappers``).
"""

from __future__ import annotations

import datetime
import os
import pickle
from typing import Any, Iterable, Sequence

import torch

TIMEOUT_ENV = "DCML_DIST_TIMEOUT_S"
# Rank 0 alone validates, re-clusters and writes checkpoints while the others
# wait in a collective; on big data sets that can take far longer than the
# NCCL default of 10 minutes.
DEFAULT_TIMEOUT_S = 4 * 3600


def launched() -> bool:
    """This process was started as one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def active() -> bool:
    """A process group of more than one process is set up."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that validates, re-clusters, writes outputs and records."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def setup(device: str | torch.device) -> torch.device:
    """Join the process group when launched as one of several; returns this process's device.

    ``device`` is the stage's device ("cuda", "cuda:0", "cpu"). Under torchrun
    a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process) and the
    backend NCCL; on CPU the backend is gloo.
    """
    device = torch.device(device)
    if not launched():
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank():
            from dcml.contracts.errors import DcmlError

            raise DcmlError(f"process {local_rank()} of this node has no GPU: {torch.cuda.device_count()} visible for "
                            f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes; request as many GPUs as processes "
                            "(gpus_per_task) or pass --device cpu")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def shutdown() -> None:
    """Leave the process group (no-op when none is set up)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (pickled); the identity in one process."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every process's ``obj``, in rank order; ``[obj]`` in one process."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. a state_dict's values)."""
    if not active():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


# -- batches ----------------------------------------------------------------------

def share_bounds(n: int, world: int | None = None) -> list[tuple[int, int]]:
    """Contiguous shares ``[start, stop)`` of a batch of ``n`` for each rank (the first n % N ranks take one more)."""
    from dcml.algorithm.models import slice_bounds  # the same even contiguous split as the embedding's slices

    return slice_bounds(int(n), world_size() if world is None else int(world))


def gather_batch(local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The whole batch from every process's share (``sizes``: the shares' lengths, in rank order).

    The other processes' rows are constants here; the own share keeps its
    graph, so a loss of the result back-propagates into this process's share
    only (:func:`all_reduce_gradients` then adds the shares up). One process:
    ``local`` itself.
    """
    if not active():
        return local
    import torch.distributed as dist

    me, sizes = rank(), [int(s) for s in sizes]
    if local.shape[0] != sizes[me]:
        raise RuntimeError(f"rank {me}: share of {local.shape[0]} rows, expected {sizes[me]}")
    width = max(sizes)
    padded = local.detach()
    if padded.shape[0] < width:
        padded = torch.cat([padded, padded.new_zeros((width - padded.shape[0],) + tuple(padded.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([local if r == me else parts[r][:sizes[r]] for r in range(len(sizes))])


# -- gradients ----------------------------------------------------------------------

def all_reduce_gradients(summed: Sequence[torch.nn.Parameter], replicated: Sequence[torch.nn.Parameter] = ()) -> None:
    """Make every process's gradients the whole batch's: ``summed`` parameters add up the
    processes' gradients (each holds its share's contribution), ``replicated`` ones
    average them (each process computed the full gradient).

    A parameter some process left without a gradient (a sub-block no sample of
    its share was routed to) gets zeros there, and keeps None only when no
    process has one -- as the optimiser would see it in one process. Gradients
    of one dtype and device travel in one flat buffer: one all-reduce per step
    (plus a small one agreeing on which parameters have gradients).
    """
    if not active():
        return
    import torch.distributed as dist

    params = list(summed) + list(replicated)
    if not params:
        return
    averaged = {id(p) for p in replicated}
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(params, has.tolist()) if flag]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list] = {}
    for p in used:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    world = world_size()
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            if id(p) in averaged:
                p.grad.div_(world)
            offset += n


def check_identical(tensors, what: str = "weights") -> None:
    """Raise a one-line DcmlError on every process unless all hold the same ``tensors`` (a float64
    checksum each; a dict names them in the message): the data-parallel processes must end with one model."""
    if not active():
        return
    names = list(tensors) if isinstance(tensors, dict) else None
    tensors = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    sums = [float(t.detach().double().sum()) for t in tensors]
    everyone = [pickle.loads(e) for e in all_gather_object(pickle.dumps(sums))]
    differ = [i for i in range(len(sums)) if any(e[i] != everyone[0][i] for e in everyone)]
    if differ:
        from dcml.contracts.errors import DcmlError

        gap = max(abs(e[i] - everyone[0][i]) for e in everyone for i in differ)
        first = f", e.g. {names[differ[0]]}" if names else ""
        raise DcmlError(f"data-parallel training: the {world_size()} processes ended with different {what} "
                        f"({len(differ)} of {len(sums)} tensors{first}, checksums up to {gap:.3g} apart), no model written; "
                        "train with nproc=1 and report this with the command line")
