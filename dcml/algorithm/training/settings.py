"""What decides what a training run computes: :class:`TrainSettings`, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dcml.algorithm.clustering import GROUPINGS
from dcml.contracts.errors import DcmlError
from dcml.contracts.params import PARAMS

CLUSTER_INPUTS = ("features", "embedding")
HEAD_INITS = PARAMS["head_init"].choices
SCHEDULES = PARAMS["schedule"].choices
SELECT_ON = PARAMS["select_on"].choices


def _default(name: str):
    return PARAMS[name].default


@dataclass
class TrainSettings:
    """Everything that decides what a training run computes.

    Defaults are the parameter table's (dcml.contracts.params); ``margin`` and
    ``lr_loss`` None mean the loss's own margin and 100 x lr_embedding.
    """

    epochs: int = _default("epochs")
    classes_per_batch: int = _default("classes_per_batch")  # P
    images_per_class: int = _default("images_per_class")  # M
    lr_backbone: float = _default("lr_backbone")
    lr_embedding: float = _default("lr_embedding")
    lr_loss: float | None = None  # proxies / learnable beta; None = 100 x lr_embedding
    weight_decay: float = _default("weight_decay")
    loss: str = _default("loss")
    margin: float | None = None
    loss_options: dict = field(default_factory=dict)  # extra PML keyword arguments
    miner: str = _default("miner")
    recluster_every: int = _default("recluster_every")  # R; 0 = never re-cluster
    whole_embedding_after: float = _default("whole_embedding_after")  # share of the epochs before F: slices alone
    grouping: str = _default("cluster_grouping")  # kmeans clusters, or random class groups (a control)
    mask_orthogonality: float = _default("mask_orthogonality")  # learned masks (MaskedTrainer): penalty weight
    distill: float = 0.0  # DistillTrainer: weight of the pretrained features' similarity structure (0 = off)
    num_groups: int = 0  # clusters the batches come from; 0 = the model's slices (more: the no-slices control)
    cluster_on: str = "features"  # "features" (the reference code) or "embedding" (the paper text)
    kmeans_niter: int = _default("niter")
    kmeans_nredo: int = _default("nredo")
    finetune_epoch: int | None = None  # F: from this epoch on, K=1 on all data
    eval_every: int = _default("eval_every")  # test metrics every N epochs (curves only; never used for a choice)
    eval_batch_size: int = 128
    freeze_backbone: bool = False
    head_init: str = _default("head_init")  # fresh heads only; auto = pca for pretrained backbones
    warmup_epochs: int = _default("warmup_epochs")  # first epochs train the head only
    schedule: str = _default("schedule")  # per step, after the warm-up
    select_on: str = _default("select_on")  # validation metric that picks the epoch kept
    patience: int = _default("patience")  # 0 = never stop early
    batches_per_epoch: int = _default("batches_per_epoch")  # 0 = the sampler's natural epoch
    seed: int = _default("seed")
    num_workers: int = _default("num_workers")

    def __post_init__(self):
        if self.epochs < 0:
            raise DcmlError(f"epochs={self.epochs}: must be >= 0")
        if self.cluster_on not in CLUSTER_INPUTS:
            raise DcmlError(f"cluster_on={self.cluster_on!r}: use one of {', '.join(CLUSTER_INPUTS)}")
        for name in ("lr_backbone", "lr_embedding", "weight_decay", "distill"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise DcmlError(f"{name}={value}: must be a finite number >= 0")
        if self.recluster_every < 0 or self.eval_every < 0:
            raise DcmlError("recluster_every and eval_every must be >= 0 (0 = never)")
        if self.head_init not in HEAD_INITS:
            raise DcmlError(f"head_init={self.head_init!r}: use one of {', '.join(HEAD_INITS)}")
        if self.schedule not in SCHEDULES:
            raise DcmlError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.select_on not in SELECT_ON:
            raise DcmlError(f"select_on={self.select_on!r}: use one of {', '.join(SELECT_ON)}")
        if self.warmup_epochs < 0 or self.patience < 0 or self.batches_per_epoch < 0:
            raise DcmlError("warmup_epochs, patience and batches_per_epoch must be >= 0")
        if not 0.0 <= self.whole_embedding_after <= 1.0:
            raise DcmlError(f"whole_embedding_after={self.whole_embedding_after}: use a share between 0 and 1")
        if self.grouping not in GROUPINGS:
            raise DcmlError(f"grouping={self.grouping!r}: use one of {', '.join(GROUPINGS)}")
        if self.num_groups < 0:
            raise DcmlError(f"num_groups={self.num_groups}: must be >= 0 (0 = one group per slice)")

    @property
    def loss_lr(self) -> float:
        return self.lr_loss if self.lr_loss is not None else 100 * self.lr_embedding


def resolved_head_init(choice: str, weights, fresh_head: bool) -> str | None:
    """"pca" / "random" for a fresh head, None for a loaded one (left as it is); auto = pca for
    pretrained backbones."""
    if not fresh_head:
        return None
    if choice == "auto":
        choice = "pca" if weights != "none" else "random"
    return choice
