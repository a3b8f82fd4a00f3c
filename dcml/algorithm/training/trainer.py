"""The training loop (:class:`Trainer`): its hooks, and the pieces it calls for everything else."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from dcml.algorithm import batchnorm, distributed, noise
from dcml.algorithm.clustering import cluster_sizes
from dcml.algorithm.training import optimisation, resume
from dcml.algorithm.training.batches import BatchSource, Silent, dense_labels
from dcml.algorithm.training.grouping import Grouping
from dcml.algorithm.training.hooks import TrainingHooks
from dcml.algorithm.training.resume import share_start
from dcml.algorithm.training.rng import NOISE_STREAM, batch_seed, seed_everything
from dcml.algorithm.training.scoring import Scorer
from dcml.algorithm.training import selection
from dcml.algorithm.training.selection import EpochSelector
from dcml.algorithm.training.settings import TrainSettings, resolved_head_init
from dcml.contracts.events import progress


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer(TrainingHooks):
    """Train ``model`` on ``train_rows`` of ``manifest`` (the loop; its arguments: the package docstring).

    Subclasses change one step, not the loop (:class:`TrainingHooks`).
    """

    def __init__(self, model, manifest, train_rows: pd.DataFrame, settings: TrainSettings, *,
                 clusters: Sequence[int] | None = None, only_learner: int | None = None,
                 eval_rows: pd.DataFrame | None = None, val_rows: pd.DataFrame | None = None,
                 activations=None, fresh_head: bool = False, resume_path: str | Path | None = None,
                 resume_dir: str | Path | None = None, device=None, fingerprint_extra=None):
        self.model, self.manifest, self.settings = model, manifest, settings
        self.device = torch.device(device) if device is not None else default_device()
        self.train_rows = train_rows.reset_index(drop=True)
        self.labels = dense_labels(self.train_rows["label"].to_numpy())
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.num_learners = int(model.num_slices)
        self.grouping = Grouping(settings, self.labels, self.num_learners, only_learner, clusters)
        self.only_learner = only_learner
        self.eval_rows = eval_rows if eval_rows is not None and len(eval_rows) else None
        self.val_rows = val_rows.reset_index(drop=True) if val_rows is not None and len(val_rows) else None
        self.activations = activations
        self.history: list[dict] = []
        self.epoch = 0  # epochs finished
        self.selector = EpochSelector(settings.select_on, settings.patience)
        self.stopped_early = False
        self.initial: dict = {}  # test scores of the model training starts from (with eval_every)
        self.head_init = resolved_head_init(settings.head_init, model.config["weights"], fresh_head)
        # Data parallel: this process's rank among world_size (1 and 0 alone).
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        self.source = BatchSource(model, manifest, self.train_rows, self.labels, settings, self.device,
                                  activations, self.rank, self.world_size)
        self.scorer = Scorer(manifest, self.device, settings.eval_batch_size, settings.num_workers, activations)
        self.model.to(self.device)
        if self.world_size > 1 and not self.model.config.get("freeze_bn", True):
            # BatchNorm that trains normalises over the whole batch, as in one process.
            self.model = self.source.model = batchnorm.over_processes(self.model, self.device)
        if settings.freeze_backbone:
            for p in self.model.backbone.parameters():
                p.requires_grad_(False)
        self.losses, self.miner, self._random_miner = optimisation.build_losses(
            settings, self.model, self.num_classes, self.device)
        self.optimizer = torch.optim.Adam(self.param_groups(), weight_decay=settings.weight_decay)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if only_learner is not None:
            # Worker: the other slices' head rows must come out untouched.
            start, stop = self.model.slice_bounds(only_learner)
            self._keep_rows = torch.ones(self.model.embedding_dim, dtype=torch.bool, device=self.device)
            self._keep_rows[start:stop] = False
            self._kept_weight = self.model.head.weight.detach()[self._keep_rows].clone()
            self._kept_bias = self.model.head.bias.detach()[self._keep_rows].clone()
        self.fingerprint = resume.fingerprint(self, fingerprint_extra)
        if resume_path is None and resume_dir is not None:
            resume_path = Path(resume_dir) / f"{self.fingerprint[:40]}.resume.pt"
        self.store = resume.ResumeStore(Path(resume_path) if resume_path else None, self.rank, self.world_size)
        self.resumed_from: int | None = None  # the epoch a resumed run continued after
        self._epoch_now = self._batch_now = 0
        self._share_sizes: list[int] | None = None  # the processes' shares of the current batch

    # -- the pieces' state, as attributes of the trainer ----------------------------------
    clusters = property(lambda self: self.grouping.clusters, lambda self, v: setattr(self.grouping, "clusters", v))
    clustered_at = property(lambda self: self.grouping.clustered_at)
    num_groups = property(lambda self: self.grouping.num_groups)
    whole_from = property(lambda self: self.grouping.whole_from)
    best = property(lambda self: self.selector.best)
    best_epoch = property(lambda self: self.selector.best_epoch)
    resume_path = property(lambda self: self.store.path)

    def cluster_state(self) -> dict:
        return self.grouping.state(self.train_rows["image_id"].astype(str).tolist())

    def save_resume(self) -> None:
        self.store.save(lambda: resume.snapshot(self))

    def try_resume(self) -> bool:
        """Load the resume checkpoint if there is one for this run; True when loaded."""
        state = self.store.read(self.fingerprint)
        if state is not None:
            resume.restore(self, state)
        return state is not None

    # -- phases ----------------------------------------------------------------------
    def finetuning(self, epoch: int) -> bool:
        f = self.settings.finetune_epoch
        return f is not None and epoch >= f

    def warming_up(self, epoch: int) -> bool:
        return epoch < self.settings.warmup_epochs

    def whole_embedding(self, epoch: int) -> bool:
        """Whether the loss of ``epoch`` sees the whole embedding (else each batch's cluster's slice)."""
        return self.model.num_slices == 1 or (self.whole_from is not None and epoch >= self.whole_from)

    def recluster(self, epoch: int) -> np.ndarray:
        """New cluster per train row from the current model, matched to the learners
        (computed once, by rank 0, and broadcast to every process)."""
        desc = f"re-clustering: {self.settings.cluster_on} of {len(self.train_rows)} images"
        assignments = (self.grouping.regroup(epoch, lambda kind: self.vectors(self.train_rows, kind, desc))
                       if self.is_main else None)
        return distributed.broadcast_object(assignments)

    def _sampler(self, epoch: int):
        one_group = self.finetuning(epoch) or self.num_groups == 1
        return self.source.sampler(epoch, None if one_group and self.only_learner is None else self.clusters)

    # -- the loop --------------------------------------------------------------------
    def fit(self, callbacks: Sequence[Callable[["Trainer", dict], None]] = (), resume: bool = True) -> list[dict]:
        """Train up to ``settings.epochs``; returns the per-epoch history.

        With validation rows the model ends with the weights of its best
        validated epoch (``best_epoch``; 0 = the initial model) and training
        stops early after ``patience`` epochs without improvement.
        """
        with self.store.lock():
            return self._fit(callbacks, resume)

    def _fit(self, callbacks, resume: bool) -> list[dict]:
        s = self.settings
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        if not (resume and self.try_resume()):
            seed_everything(s.seed)
            self.start()
        share_start(self)
        while self.epoch < s.epochs and not self.stopped_early:
            entry = self._run_epoch(self.epoch)
            self.epoch += 1
            self.history.append(entry)
            self.save_resume()
            for callback in callbacks:
                callback(self, entry)
        distributed.check_identical(self.model.state_dict())
        self.selector.restore(self.model)
        return self.history

    def start(self) -> None:
        """Before epoch 1: the initial clustering, the head init, the initial model's scores.

        The initial model is validated (a candidate for the epoch kept, epoch
        0 of the history) and, with ``eval_every``, scored on the test rows
        (``initial``: what training started from, for the record).
        """
        if self.grouping.clustering and self.clusters is None:
            self.grouping.clusters = self.recluster(0)
            self.grouping.clustered_at = 0
        if self.head_init in ("pca", "pca-shared", "whiten"):
            self.initialise_head()
        if not self.is_main:  # rank 0 alone scores (and keeps the best weights)
            return
        if self.eval_rows is not None and self.settings.eval_every:
            self.initial = self.evaluate()
        if self.val_rows is not None:
            entry = {"epoch": 0, "phase": "initial", **self.validate(), **self.initial}
            self.selector.consider(0, entry, self.model)
            self.history.append(entry)

    def _phase(self, epoch: int, entry: dict) -> None:
        """The epoch's phase, and the groups drawn again when due."""
        if self.finetuning(epoch):
            if self.model.num_slices != 1:
                self.model.set_num_slices(1)
            entry["phase"] = "finetune"
            return
        g = self.grouping
        entry["phase"] = "worker" if self.only_learner is not None else ("clusters" if g.num_groups > 1 else "plain")
        if g.clustering:
            entry["loss_on"] = "whole" if self.whole_embedding(epoch) else "slice"
        if g.due(epoch):
            t0 = time.perf_counter()
            g.clusters = self.recluster(epoch)
            g.clustered_at = epoch
            entry["clustering_s"] = round(time.perf_counter() - t0, 3)
            entry["cluster_sizes"] = cluster_sizes(g.clusters, g.num_groups)
        elif epoch == 0 and g.clusters is not None:
            entry["cluster_sizes"] = cluster_sizes(g.clusters, g.num_groups)

    def _run_epoch(self, epoch: int) -> dict:
        s = self.settings
        entry: dict = {"epoch": epoch + 1}
        self._phase(epoch, entry)
        if self.warming_up(epoch):
            entry["warmup"] = True
        self.epoch_started(epoch, entry)
        sampler = self._sampler(epoch)
        global_batches = sampler.epoch_batches()[sampler.position:]  # what every process's shares add up to
        loader = self.source.loader(sampler, epoch)
        self.model.train()
        frozen = s.freeze_backbone or self.warming_up(epoch)
        if frozen:
            self.model.backbone.eval()  # no BatchNorm statistics updates either
        backbone = self.backbone_parameters()
        for p in backbone:
            p.requires_grad_(not frozen)
        whole = self.whole_embedding(epoch)
        sums: dict[str, float] = {}
        images, batches = 0, 0
        steps = len(sampler)
        t0 = time.perf_counter()
        self._epoch_now = epoch
        bar = (progress(loader, total=steps, desc=f"epoch {epoch + 1}/{s.epochs}", unit="batch") if self.is_main
               else Silent(loader))
        try:
            for inputs, _, _ in bar:
                batch = global_batches[batches]
                self._batch_now = batches
                shares = distributed.share_bounds(len(batch), self.world_size)
                self._share_sizes = [b - a for a, b in shares]
                optimisation.set_learning_rates(self.optimizer, self._base_lrs, s, epoch, batches, steps,
                                                self.warming_up(epoch))
                inputs = inputs.to(self.device, non_blocking=True)
                labels = torch.from_numpy(self.labels[batch]).to(self.device)  # the whole batch's
                learner = None if whole else int(self.clusters[batch[0]])
                seed = batch_seed(s.seed, epoch, batches, NOISE_STREAM)
                with noise.global_batch(seed, len(batch), shares[self.rank]):  # dropout masks per global sample
                    numbers = self.train_step(inputs, labels, learner)
                if self.only_learner is not None:
                    with torch.no_grad():
                        self.model.head.weight[self._keep_rows] = self._kept_weight
                        self.model.head.bias[self._keep_rows] = self._kept_bias
                for key, value in numbers.items():
                    sums[key] = sums.get(key, 0.0) + value
                images += len(batch)
                batches += 1
                bar.set_postfix(loss=f"{sums['loss'] / batches:.4f}", refresh=False)
        finally:
            bar.close()
            for p in backbone:
                p.requires_grad_(True)
        seconds = time.perf_counter() - t0
        entry.update({key: value / max(batches, 1) for key, value in sums.items()})
        entry.setdefault("loss", 0.0)
        entry.update({
            "batches": batches,
            "images": images,
            "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
            "num_slices": int(self.model.num_slices),
        })
        self.epoch_finished(epoch, entry)
        selection.after_epoch(self, epoch, entry)
        return entry
