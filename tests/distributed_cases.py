"""Trainer runs the data-parallel tests start in torchrun processes (dcml.launch targets).

Not a test module: tests/test_distributed.py calls ``dcml.launch.run_processes("tests.distributed_cases:fit", ...)``.
"""

from __future__ import annotations

import torch

from dcml import stagekit
from dcml.algorithm.models import build_model
from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError


def settings(**overrides) -> TrainSettings:
    base = dict(epochs=3, classes_per_batch=4, images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3,
                miner="none", recluster_every=1, kmeans_niter=10, eval_every=0, seed=3)
    return TrainSettings(**{**base, **overrides})


def fit(manifest, resume_path, out, crash_after=None, settings_overrides=None, dropout=0.0):
    """Shared mode, K=2, re-clustering every epoch; rank 0 saves the final state_dict to ``out``.

    ``crash_after``: every process stops with an error once that many epochs are done
    (their resume checkpoint is written by then), as a run killed there would.
    """
    man = manifest_mod.read(manifest)
    train = man.split("train")
    model = initial_model({"num_slices": 2, "freeze_bn": True, "dropout": dropout})

    def crash(trainer, entry):
        if crash_after is not None and trainer.epoch == crash_after:
            raise DcmlError(f"stopped after epoch {crash_after}")

    with stagekit.processes("cpu") as device:
        trainer = Trainer(model, man, train, settings(**(settings_overrides or {})), resume_path=resume_path,
                          device=device)
        trainer.fit(callbacks=[crash])
        if stagekit.is_main():
            torch.save(model.state_dict(), out)
    return {"epoch": trainer.epoch, "resumed_from": trainer.resumed_from,
            "clusters": trainer.clusters.tolist(), "world_size": trainer.world_size}


def pml_wrappers(loss="multi_similarity", miner="multi_similarity", n=16, dim=8, seed=0):
    """One batch, its shares on the processes: dcml's gathered loss and miner against
    pytorch-metric-learning's DistributedLossWrapper / DistributedMinerWrapper and
    against one process on the whole batch. Rank 0 returns the largest differences
    over all processes (loss value, gradient of each process's share)."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.utils import distributed as pml_dist

    from dcml.algorithm import distributed

    make_loss = {"multi_similarity": losses.MultiSimilarityLoss, "contrastive": losses.ContrastiveLoss,
                 "triplet": losses.TripletMarginLoss, "margin": losses.MarginLoss}[loss]
    make_miner = {"multi_similarity": miners.MultiSimilarityMiner, "triplet": miners.TripletMarginMiner}[miner]
    torch.manual_seed(seed)
    batch = torch.nn.functional.normalize(torch.randn(n, dim), dim=1)
    labels = torch.arange(n) // 4
    with stagekit.processes("cpu"):
        world, rank = distributed.world_size(), distributed.rank()
        bounds = distributed.share_bounds(n, world)
        start, stop = bounds[rank]
        sizes = [b - a for a, b in bounds]

        # One process, the whole batch.
        whole = batch.clone().requires_grad_()
        loss_fn, miner_fn = make_loss(), make_miner()
        reference = loss_fn(whole, labels, miner_fn(whole, labels))
        reference.backward()

        # dcml: the share's embeddings gathered in batch order, the loss on the whole batch.
        mine = batch[start:stop].clone().requires_grad_()
        gathered = distributed.gather_batch(mine, sizes)
        ours = loss_fn(gathered, labels, miner_fn(gathered, labels))
        ours.backward()

        # pytorch-metric-learning's wrappers: the own share first, the loss times N (for DDP's averaging).
        theirs_in = batch[start:stop].clone().requires_grad_()
        own = labels[start:stop]
        pairs = pml_dist.DistributedMinerWrapper(make_miner())(theirs_in, own)
        theirs = pml_dist.DistributedLossWrapper(make_loss())(theirs_in, own, pairs) / world
        (theirs * world).backward()
        theirs_grad = theirs_in.grad / world

        numbers = {
            "ours_vs_one_loss": abs(ours.item() - reference.item()),
            "ours_vs_pml_loss": abs(ours.item() - theirs.item()),
            "ours_vs_one_grad": float((mine.grad - whole.grad[start:stop]).abs().max()),
            "ours_vs_pml_grad": float((mine.grad - theirs_grad).abs().max()),
            "grad_scale": float(whole.grad.abs().max()),
            "loss": reference.item(),
        }
        everyone = distributed.all_gather_object(numbers)
    return {"world_size": world, **{k: max(e[k] for e in everyone) for k in numbers}}


def batchnorm_shares(n=10, channels=3, seed=0):
    """Three batches through a small conv + BatchNorm + linear + BatchNorm model (no optimiser
    step): one process on the whole batch with torch's BatchNorm against N processes on their
    shares with dcml.algorithm.batchnorm. Rank 0 returns the largest differences over all
    processes: the share's outputs and input gradient, the summed parameter gradients (and
    their scale) and the running statistics after the three forward/backward passes."""
    import copy

    from dcml.algorithm import batchnorm, distributed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, channels, 3, padding=1), torch.nn.BatchNorm2d(channels),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(channels * 16, 4),
                                torch.nn.BatchNorm1d(4))
    batches = [torch.randn(n, 2, 4, 4) * 3 + 1 for _ in range(3)]
    target = torch.randn(n, 4)
    with stagekit.processes("cpu"):
        world, rank = distributed.world_size(), distributed.rank()
        start, stop = distributed.share_bounds(n, world)[rank]
        sizes = [b - a for a, b in distributed.share_bounds(n, world)]
        one = copy.deepcopy(model)
        many = batchnorm.over_processes(copy.deepcopy(model), "cpu")
        worst = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0, "running": 0.0, "param_grad_scale": 0.0}
        for x in batches:
            whole = x.clone().requires_grad_()
            out_one = one(whole)
            ((out_one - target) ** 2).sum().backward()
            mine = x[start:stop].clone().requires_grad_()
            out_many = many(mine)
            gathered = distributed.gather_batch(out_many, sizes)
            ((gathered - target) ** 2).sum().backward()
            distributed.all_reduce_gradients(list(many.parameters()))
            worst["output"] = max(worst["output"], float((out_many - out_one[start:stop]).detach().abs().max()))
            worst["input_grad"] = max(worst["input_grad"], float((mine.grad - whole.grad[start:stop]).abs().max()))
            for p, q in zip(one.parameters(), many.parameters()):
                worst["param_grad"] = max(worst["param_grad"], float((p.grad - q.grad).abs().max()))
                worst["param_grad_scale"] = max(worst["param_grad_scale"], float(p.grad.abs().max()))
                p.grad, q.grad = None, None
        a, b = one.state_dict(), many.state_dict()
        assert a.keys() == b.keys()
        worst["running"] = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        worst["batches_tracked"] = int(b["1.num_batches_tracked"])
        worst["kinds"] = sorted({type(m).__name__ for m in many.modules()})
        everyone = distributed.all_gather_object(worst)
    return {"world_size": world, "kinds": worst["kinds"], "batches_tracked": worst["batches_tracked"],
            **{k: max(e[k] for e in everyone) for k in ("output", "input_grad", "param_grad", "running", "param_grad_scale")}}


def router_data_init_shares(n=11, features=6, groups=3, seed=0):
    """A DFML router's data initialisation: N processes on their shares of a batch against one
    process on the whole batch. Rank 0 returns the largest weight difference over the processes
    and between them, and how far the initialisation moved the weights."""
    import copy

    from dcml.algorithm import distributed
    from dcml.methods.dfml.router import Router

    torch.manual_seed(seed)
    router = Router(features, groups, data_init=True)
    x = torch.rand(n, features) * 2 + 1  # all positive with a common component, like pooled ReLU6 activations
    with stagekit.processes("cpu"):
        world, rank = distributed.world_size(), distributed.rank()
        start, stop = distributed.share_bounds(n, world)[rank]
        one, many = copy.deepcopy(router), copy.deepcopy(router)
        one._data_init_local(x)
        many.train()
        many(x[start:stop])  # the first training forward initialises from the data
        numbers = {"vs_one": float((many.linear.weight - one.linear.weight).abs().max()),
                   "moved": float((one.linear.weight - router.linear.weight).abs().max()),
                   "pending": bool(many.init_pending)}
        everyone = distributed.all_gather_object({**numbers, "weight": many.linear.weight.tolist()})
    first = torch.tensor(everyone[0]["weight"])
    between = max(float((torch.tensor(e["weight"]) - first).abs().max()) for e in everyone)
    return {"world_size": world, "between": between, "vs_one": max(e["vs_one"] for e in everyone),
            "moved": everyone[0]["moved"], "pending": any(e["pending"] for e in everyone)}


def initial_model(overrides=None):
    """The small CNN :func:`train` starts from (seed 3; dropout at its default unless ``overrides`` say)."""
    seed_everything(3)
    return build_model({"backbone": "small_cnn", "weights": "none", "embedding_dim": 16, **(overrides or {})})


def train(manifest, out, model=None, settings_overrides=None, threads=1, nudge=False):
    """One training (the Trainer, as the train stage runs it) on ``threads`` CPU threads; rank 0 saves the
    final state_dict to ``out``. ``model``: build_model overrides of a small CNN (dropout at its default).
    ``nudge``: every initial weight moved by one float32 ulp (``torch.nextafter``), a perturbation of the
    size rounding makes. Returns the epochs' losses, non-zero loss terms and cluster sizes."""
    man = manifest_mod.read(manifest)
    torch.set_num_threads(int(threads))
    net = initial_model(model)
    if nudge:
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    with stagekit.processes("cpu") as device:
        trainer = Trainer(net, man, man.split("train"), settings(**(settings_overrides or {})), device=device)
        trainer.fit()
        if stagekit.is_main():
            torch.save(net.state_dict(), out)
    return {"world_size": trainer.world_size, "loss": [h["loss"] for h in trainer.history],
            "terms": [h["nonzero_terms"] for h in trainer.history],
            "cluster_sizes": [h.get("cluster_sizes") for h in trainer.history]}
