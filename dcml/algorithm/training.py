"""The training loop: K learners over one backbone, re-clustering, fine-tuning.

One :class:`Trainer` serves every training mode:

* **shared** (the paper): the model has K slices; each batch comes from one
  cluster k (:class:`dcml.algorithm.samplers.ClusterBatchSampler`) and learner k's loss
  sees only slice k of the embedding (``model(x, learner=k)``), so the backbone
  is shared by all learners. Every ``recluster_every`` epochs the training
  images are re-clustered (faiss k-means on the L2-normalised backbone
  features, or on the embedding), the new clusters are matched to the old
  learners (Hungarian), and classes with a single image in a cluster are left
  out of it. From ``finetune_epoch`` on, K is set to 1 and the whole
  embedding trains on all data.
* **worker** (``only_learner=k``): only cluster k's rows and only slice k are
  trained; the head rows of the other slices are kept exactly as they were,
  and with ``freeze_backbone`` the backbone (BatchNorm statistics included)
  does not change either.
* **fine-tune**: a K=1 model on all data (``clusters=None``).

After every epoch the trainer writes a resume checkpoint (atomically): model,
optimiser, loss parameters, cluster state, sampler position, history and the
torch / numpy / python RNG states, all as tensors and primitives so
``torch.load(weights_only=True)`` reads it. A run killed at any moment restarts
from the last finished epoch and, on the same device and thread count, ends
with exactly the weights an uninterrupted run of the same seed ends with: the
batches of an epoch are a pure function of (seed, epoch), data-loader workers
are seeded from a per-epoch generator, and the RNG states are restored.

**Data parallel** (a stage started with ``--nproc N``; :mod:`dcml.algorithm.distributed`):
every process runs this loop on the same batches. Each global batch (the
sampler's, a pure function of seed and epoch whatever N) is cut into N
contiguous shares; process r embeds share r, the shares' embeddings are
gathered so the loss and the miner see the whole batch in its order, and the
gradients are summed over the processes before the (identical) optimiser
step: up to float summation order, N processes compute what one process
computes on the same batches. An image's augmentation is drawn from a seed
fixed by its place in the epoch (seed, epoch, batch, position), not from a
process's RNG stream, and a random miner draws from a per-batch seed, so both
are the same whatever N. Rank 0 alone re-clusters (then broadcasts the
clusters), initialises the head, validates, evaluates and writes the resume
checkpoint (with every process's RNG state); all processes resume from it.
BatchNorm layers that train use the whole global batch's statistics
(:mod:`dcml.algorithm.batchnorm`: SyncBatchNorm on GPUs, an all-reduce of the
shares' sums on CPU). What still differs with N: dropout and drop-connect
masks (each process draws its own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dcml.contracts import checkpoint
from dcml.algorithm import batchnorm, distributed, resume_lock
from dcml.algorithm.clustering import cluster_sizes, drop_singletons, kmeans, match_to_previous
from dcml.contracts.errors import DcmlError
from dcml.contracts.events import progress
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
        for name in ("lr_backbone", "lr_embedding", "weight_decay"):
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

    @property
    def loss_lr(self) -> float:
        return self.lr_loss if self.lr_loss is not None else 100 * self.lr_embedding


# -- RNG state as tensors and primitives (weights_only-loadable) ----------------

def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (and python's random) from the loader's generator; numpy too:
    np.random.seed(torch.initial_seed() % 2**32)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _mined_counts(pairs) -> tuple[int, int]:
    """(positive, negative) pairs or triplets a miner returned."""
    if pairs is None:
        return 0, 0
    if len(pairs) == 4:
        return len(pairs[0]), len(pairs[2])
    return len(pairs[0]), len(pairs[0])


def _nonzero_terms(loss_fn) -> int | None:
    """Non-zero loss terms of the last call, when the PML reducer records them."""
    reducers = getattr(loss_fn.reducer, "reducers", {"": loss_fn.reducer})
    for reducer in reducers.values():
        divisor = getattr(reducer, "divisor", None)
        if divisor is not None:
            return int(divisor)
    return None


def dense_labels(labels: Sequence[int]) -> np.ndarray:
    """Labels renumbered 0..C-1 (proxy losses index their proxies by label)."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].reshape(-1).astype(np.int64)


class ShareSampler:
    """The batch sampler a process iterates: its share of every batch of ``sampler``.

    ``sampler`` yields the global batches (:class:`dcml.algorithm.samplers.ClusterBatchSampler`);
    rank r of N takes the r-th contiguous share of each (the whole batch when
    N = 1). With ``seeds=(seed, epoch)`` each item becomes ``(index, item_seed)``
    with a seed fixed by its place in the epoch (:class:`SeededItems` draws the
    image's augmentation from it), so a batch's images are the same whatever N.
    """

    def __init__(self, sampler, rank: int = 0, world_size: int = 1, seeds: tuple[int, int] | None = None):
        self.sampler, self.rank, self.world_size, self.seeds = sampler, int(rank), int(world_size), seeds

    def __iter__(self):
        for b, batch in enumerate(self.sampler, self.sampler.position):
            if len(batch) < self.world_size:
                raise DcmlError(f"a batch of {len(batch)} images cannot be split over {self.world_size} processes; "
                                "raise classes_per_batch x images_per_class or use fewer processes")
            start, stop = distributed.share_bounds(len(batch), self.world_size)[self.rank]
            if self.seeds is None:
                yield batch[start:stop]
            else:
                yield [(i, item_seed(*self.seeds, b, start + j)) for j, i in enumerate(batch[start:stop])]

    def __len__(self) -> int:
        return len(self.sampler)


def item_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """The augmentation seed of the image at ``position`` of ``batch`` in ``epoch``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(batch), int(position)]).generate_state(1)[0])


class SeededItems(torch.utils.data.Dataset):
    """Items ``dataset[index]`` for keys ``(index, item_seed)``: the item's random transform is drawn
    from torch's CPU generator seeded with ``item_seed`` (the generator's state is put back after)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class _Silent:
    """A loader without a progress bar (processes other than rank 0)."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


class Trainer:
    """Train ``model`` on ``train_rows`` of ``manifest``; see the module docstring.

    Args:
        clusters: initial cluster id per train row (-1 = left out), or None.
            With a K>1 model and no clusters, the trainer clusters at epoch 0.
        only_learner: worker mode: train slice k on cluster k's rows only.
        eval_rows: rows for the periodic test R@1 / MAP@R curve ("test" rows,
            or "query" and "gallery" rows). Never used for any choice.
        val_rows: validation rows (classes disjoint from the training ones):
            scored before training and after every epoch; the best epoch
            (the initial model included) is the one ``fit`` leaves in the model.
        activations: a :class:`dcml.algorithm.activations.ActivationCache` of the
            model's frozen lower part: train the top on it (the fast mode).
        fresh_head: the head was just built (not loaded), so ``head_init``
            applies to it.
        resume_path: where the per-epoch resume checkpoint lives; an existing
            one written by the same settings is resumed.
        resume_dir: instead of ``resume_path``, a folder where the resume
            checkpoint is named by the run's fingerprint (its settings, data,
            clusters and initial weights): any later run of the same training,
            in another output folder or another pod, finds and resumes it.
        fingerprint_extra: anything else that makes this run distinct (e.g.
            the lineage of the input files), mixed into the resume check.

    Subclasses change one step, not the loop: ``param_groups`` (what the
    optimiser trains), ``train_step`` (one batch: forward, loss, backward,
    returns the numbers to average), ``epoch_started`` / ``epoch_finished``
    (per-epoch state and history fields), ``evaluate``.
    """

    def __init__(self, model, manifest, train_rows: pd.DataFrame, settings: TrainSettings, *,
                 clusters: Sequence[int] | None = None, only_learner: int | None = None,
                 eval_rows: pd.DataFrame | None = None, val_rows: pd.DataFrame | None = None,
                 activations=None, fresh_head: bool = False, resume_path: str | Path | None = None,
                 resume_dir: str | Path | None = None, device=None, fingerprint_extra=None):
        self.model = model
        self.manifest = manifest
        self.settings = settings
        self.device = torch.device(device) if device is not None else default_device()
        self.train_rows = train_rows.reset_index(drop=True)
        self.labels = dense_labels(self.train_rows["label"].to_numpy())
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.num_learners = int(model.num_slices)
        self.only_learner = only_learner
        self.eval_rows = eval_rows if eval_rows is not None and len(eval_rows) else None
        self.val_rows = val_rows.reset_index(drop=True) if val_rows is not None and len(val_rows) else None
        self.activations = activations
        self.resume_path = Path(resume_path) if resume_path else None
        self.history: list[dict] = []
        self.epoch = 0  # epochs finished
        self.best: dict | None = None  # {"epoch", "score", "state", "num_slices"} of the best validation score
        self.stopped_early = False
        self.initial: dict = {}  # test scores of the model training starts from (with eval_every)
        self.head_init = self._resolved_head_init(fresh_head)

        if only_learner is not None:
            if not 0 <= only_learner < self.num_learners:
                raise DcmlError(f"cluster_id={only_learner} is out of range for K={self.num_learners}; use 0..{self.num_learners - 1}")
            if clusters is None:
                raise DcmlError("worker mode needs cluster assignments; pass the clusters file")
        self.clusters = None if clusters is None else self._checked_clusters(clusters)
        self.clustered_at: int | None = 0 if clusters is not None else None
        if activations is not None:
            activations.check_model(model)
            self._cache_rows = activations.locate(self.train_rows["image_id"], "train")

        # Data parallel: this process's rank among world_size (1 and 0 alone).
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        self.model.to(self.device)
        if self.world_size > 1 and not self.model.config.get("freeze_bn", True):
            # BatchNorm that trains normalises over the whole batch, as in one process.
            self.model = batchnorm.over_processes(self.model, self.device)
        if settings.freeze_backbone:
            for p in self.model.backbone.parameters():
                p.requires_grad_(False)
        self._build_losses()
        self.optimizer = torch.optim.Adam(self.param_groups(), weight_decay=settings.weight_decay)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if only_learner is not None:
            # Worker: the other slices' head rows must come out untouched.
            start, stop = self.model.slice_bounds(only_learner)
            self._keep_rows = torch.ones(self.model.embedding_dim, dtype=torch.bool, device=self.device)
            self._keep_rows[start:stop] = False
            self._kept_weight = self.model.head.weight.detach()[self._keep_rows].clone()
            self._kept_bias = self.model.head.bias.detach()[self._keep_rows].clone()
        self.fingerprint = self._fingerprint(fingerprint_extra)
        if self.resume_path is None and resume_dir is not None:
            self.resume_path = Path(resume_dir) / f"{self.fingerprint[:40]}.resume.pt"
        self.resumed_from: int | None = None  # the epoch a resumed run continued after
        self._epoch_now = self._batch_now = 0
        self._share_sizes: list[int] | None = None  # the processes' shares of the current batch

    # -- setup -----------------------------------------------------------------
    def _resolved_head_init(self, fresh_head: bool) -> str | None:
        """"pca" / "random" for a fresh head, None for a loaded one (left as it is)."""
        if not fresh_head:
            return None
        choice = self.settings.head_init
        if choice == "auto":
            choice = "pca" if self.model.config["weights"] != "none" else "random"
        return choice

    def _checked_clusters(self, clusters) -> np.ndarray:
        clusters = np.asarray(clusters, dtype=np.int64)
        if clusters.shape != (len(self.train_rows),):
            raise DcmlError(f"{len(clusters)} cluster ids for {len(self.train_rows)} training rows; pass one per training row")
        if clusters.max(initial=-1) >= self.num_learners:
            raise DcmlError(f"cluster ids go up to {clusters.max()} but the model has K={self.num_learners} slices; "
                            "set num_slices to the clusters file's k")
        if self.only_learner is not None:
            clusters = np.where(clusters == self.only_learner, clusters, -1)
        return drop_singletons(clusters, self.labels)

    def _build_losses(self) -> None:
        from dcml.algorithm.losses import build_loss, build_miner

        s = self.settings

        def make(dim):
            return build_loss(s.loss, embedding_dim=dim, num_classes=self.num_classes, margin=s.margin, **s.loss_options)

        dims = [b - a for a, b in (self.model.slice_bounds(k) for k in range(self.num_learners))]
        losses = [make(d) for d in dims]
        if self.num_learners > 1:  # the fine-tuning phase trains the whole embedding as one
            losses.append(make(self.model.embedding_dim))
        self.losses = torch.nn.ModuleList(losses).to(self.device)
        self.miner = build_miner(s.miner, loss=s.loss)
        from pytorch_metric_learning.miners import DistanceWeightedMiner

        self._random_miner = isinstance(self.miner, DistanceWeightedMiner)

    def _loss_for(self, learner: int | None):
        return self.losses[-1] if learner is None else self.losses[learner]

    def backbone_parameters(self) -> list:
        return [p for p in self.model.backbone.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """Optimiser groups (hook): backbone, embedding head, loss parameters."""
        from dcml.algorithm.losses import loss_parameters

        s = self.settings
        groups = []
        backbone = self.backbone_parameters()
        if backbone:
            groups.append({"params": backbone, "lr": s.lr_backbone, "name": "backbone"})
        groups.append({"params": list(self.model.head.parameters()), "lr": s.lr_embedding, "name": "embedding"})
        extra = [p for loss in self.losses for p in loss_parameters(loss)]
        if extra:
            groups.append({"params": extra, "lr": s.loss_lr, "name": "loss"})
        return groups

    def _fingerprint(self, extra) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self.settings), sort_keys=True, default=str).encode())
        h.update(json.dumps(self.model.config, sort_keys=True).encode())
        h.update(json.dumps([self.only_learner, extra, self.head_init], sort_keys=True, default=str).encode())
        h.update("\0".join(self.train_rows["image_id"].astype(str)).encode())
        h.update(self.labels.tobytes())
        if self.val_rows is not None:
            h.update("\0".join(self.val_rows["image_id"].astype(str)).encode())
        if self.activations is not None:
            h.update(json.dumps({k: self.activations.meta.get(k) for k in ("views", "seed", "shape", "manifest_fingerprint")},
                                sort_keys=True).encode())
        if self.clusters is not None:
            h.update(self.clusters.tobytes())
        for key, tensor in self.model.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -- resume ----------------------------------------------------------------
    def state(self) -> dict:
        """The resume checkpoint after ``self.epoch`` finished epochs."""
        best = None
        if self.best is not None:
            best = {"epoch": int(self.best["epoch"]), "score": float(self.best["score"]),
                    "num_slices": int(self.best["num_slices"]), "state": self.best["state"]}
        return {
            "format": checkpoint.FORMAT,
            "model_config": dict(self.model.config),
            "model": self.model.state_dict(),
            "record": json.dumps({"stage": "train", "resume": True}),
            "optimizer": self.optimizer.state_dict(),
            "losses": self.losses.state_dict(),
            "epoch": self.epoch,
            "num_slices": int(self.model.num_slices),
            "cluster_state": self.cluster_state(),
            "sampler_state": {"epoch": self.epoch, "position": 0},
            "rng": rng_state(),
            "history": json.dumps(self.history),
            "best": best,
            "stopped_early": bool(self.stopped_early),
            "initial": json.dumps(self.initial),
            "fingerprint": self.fingerprint,
        }

    def cluster_state(self) -> dict:
        return {
            "k": self.num_learners,
            "assignments": None if self.clusters is None else torch.from_numpy(self.clusters.copy()),
            "clustered_at": -1 if self.clustered_at is None else int(self.clustered_at),
            "image_ids": self.train_rows["image_id"].astype(str).tolist(),
        }

    def save_resume(self) -> None:
        """Rank 0 writes the resume checkpoint (atomically), with every process's RNG state."""
        if self.resume_path is None:
            return
        rngs = distributed.all_gather_object(rng_state()) if self.world_size > 1 else None
        if self.is_main:
            state = self.state()
            if rngs is not None:
                state["rng_by_rank"] = rngs
            checkpoint.save(self.resume_path, state)

    def _readable_resume(self) -> dict | None:
        """The resume checkpoint of this run, or None (missing, unreadable, other settings)."""
        if self.resume_path is None or not self.resume_path.exists():
            return None
        try:
            state = checkpoint.load(self.resume_path)  # CPU: RNG states must stay there
        except DcmlError as exc:
            warnings.warn(f"ignoring unreadable resume file ({exc}); starting afresh", stacklevel=2)
            return None
        if state.get("fingerprint") != self.fingerprint:
            warnings.warn(f"{self.resume_path}: written by a run with other inputs or settings; starting afresh", stacklevel=2)
            return None
        return state

    def try_resume(self) -> bool:
        """Load the resume checkpoint if there is one for this run; True when loaded.

        Data parallel: rank 0 decides; every process then reads the same file
        (on a node's disk, or a volume all nodes mount) and takes its own RNG state.
        """
        state = self._readable_resume() if self.is_main else None
        if self.world_size > 1 and not distributed.broadcast_object(state is not None):
            return False
        if self.world_size > 1 and not self.is_main:
            if not self.resume_path.exists():
                raise DcmlError(f"{self.resume_path}: rank 0 resumes from this file but process {self.rank} cannot see it; "
                                "put the resume folder on a volume every node mounts (DCML_RESUME_ROOT or --work-dir)")
            state = checkpoint.load(self.resume_path)
        if state is None:
            return False
        if state["num_slices"] != self.model.num_slices:
            self.model.set_num_slices(state["num_slices"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.losses.load_state_dict(state["losses"])
        cs = state["cluster_state"]
        self.clusters = None if cs["assignments"] is None else cs["assignments"].cpu().numpy().astype(np.int64)
        self.clustered_at = None if cs["clustered_at"] < 0 else cs["clustered_at"]
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        self.best = state.get("best")
        self.stopped_early = bool(state.get("stopped_early", False))
        self.initial = json.loads(state.get("initial", "{}"))
        by_rank = state.get("rng_by_rank")
        if by_rank and len(by_rank) == self.world_size:
            set_rng_state(by_rank[self.rank])
        else:  # another number of processes than the run that wrote it: rank 0's stream, then each its own
            set_rng_state(state["rng"])
            self._seed_rank()
        self.resumed_from = self.epoch
        return True

    # -- vectors of rows (eval transform; cached activations in the fast mode) --
    def vectors(self, rows: pd.DataFrame, kind: str, desc: str) -> np.ndarray:
        """Features or embeddings of ``rows`` with the current model, in eval mode."""
        from dcml.algorithm.inference import compute_vectors

        s = self.settings
        if self.activations is None:
            return compute_vectors(self.model, self.manifest, rows.reset_index(drop=True), kind=kind,
                                   batch_size=s.eval_batch_size, device=self.device, num_workers=s.num_workers,
                                   desc=desc)
        array, positions, is_train = self.activations.array_of(rows["image_id"].astype(str).tolist())
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(positions), s.eval_batch_size):
                    chunk = positions[start:start + s.eval_batch_size]
                    order = np.argsort(chunk)  # memory-map reads in file order
                    block = array[chunk[order], 0] if is_train else array[chunk[order]]
                    a = torch.from_numpy(np.asarray(block, dtype=np.float32)).to(self.device)
                    f = self.model.features_from_lower(a)
                    v = f if kind == "features" else self.model.embed(f)
                    part = np.empty((len(chunk), v.shape[1]), dtype=np.float32)
                    part[order] = v.float().cpu().numpy()
                    out.append(part)
        finally:
            self.model.train(was_training)
        dim = self.model.backbone.out_features if kind == "features" else self.model.embedding_dim
        return np.concatenate(out) if out else np.empty((0, dim), dtype=np.float32)

    # -- phases ----------------------------------------------------------------
    def finetuning(self, epoch: int) -> bool:
        f = self.settings.finetune_epoch
        return f is not None and epoch >= f

    def warming_up(self, epoch: int) -> bool:
        return epoch < self.settings.warmup_epochs

    def initialise_head(self) -> None:
        """Head from principal components of the training images' backbone features (``head_init="pca"``).

        With K slices and clusters, slice k gets its own cluster's components.
        """
        if not self.is_main:  # rank 0's head reaches every process with the model state (_share_state)
            return
        features = self.vectors(self.train_rows, "features", f"head init: features of {len(self.train_rows)} images")
        groups = None
        if self.num_learners > 1 and self.clusters is not None:
            groups = [np.flatnonzero(self.clusters == k) for k in range(self.num_learners)]
        self.model.init_head_from_features(features, groups)
        if self.only_learner is not None:  # worker: only its own slice may change
            with torch.no_grad():
                self.model.head.weight[self._keep_rows] = self._kept_weight
                self.model.head.bias[self._keep_rows] = self._kept_bias

    def recluster(self, epoch: int) -> np.ndarray:
        """New cluster per train row from the current model, matched to the learners
        (computed once, by rank 0, and broadcast to every process)."""
        assignments = self._recluster(epoch) if self.is_main else None
        return distributed.broadcast_object(assignments)

    def _recluster(self, epoch: int) -> np.ndarray:
        s = self.settings
        vectors = self.vectors(self.train_rows, s.cluster_on,
                               f"re-clustering: {s.cluster_on} of {len(self.train_rows)} images")
        result = kmeans(vectors, self.num_learners, niter=s.kmeans_niter, nredo=s.kmeans_nredo,
                        seed=s.seed + epoch, normalize=True)
        assignments = result.assignments
        if self.clusters is not None:
            assignments = match_to_previous(self.clusters, assignments, self.num_learners)
        return drop_singletons(assignments, self.labels)

    def _score(self, rows: pd.DataFrame, desc: str) -> dict:
        """R@1 and MAP@R of ``rows`` (query vs gallery when both are there, else each row vs the rest).

        Scoring is an observation: it runs on a fork of the RNG (data loaders
        draw a seed from it), so how often a run validates or draws its test
        curve never changes the model it trains.
        """
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if self.device.type == "cuda" else []):
            return self._score_now(rows, desc)

    def _score_now(self, rows: pd.DataFrame, desc: str) -> dict:
        from dcml.algorithm.metrics import evaluate_embeddings

        splits = set(rows["split"])
        if "query" in splits and "gallery" in splits:
            query, gallery = rows[rows["split"] == "query"], rows[rows["split"] == "gallery"]
            metrics = evaluate_embeddings(self.vectors(query, "embedding", desc), query["label"].to_numpy(),
                                          self.vectors(gallery, "embedding", desc), gallery["label"].to_numpy(),
                                          ks=(1,), include=("recall", "map@r"))
        else:
            metrics = evaluate_embeddings(self.vectors(rows, "embedding", desc), rows["label"].to_numpy(),
                                          ks=(1,), include=("recall", "map@r"))
        return {"recall@1": float(metrics["recall@1"]), "map@r": float(metrics["map@r"])}

    def evaluate(self) -> dict:
        """Test R@1 and MAP@R of the current model on ``eval_rows`` (curves only)."""
        return self._score(self.eval_rows, f"test metrics on {len(self.eval_rows)} images")

    def validate(self) -> dict:
        """Validation R@1 and MAP@R (keys prefixed ``val_``)."""
        scores = self._score(self.val_rows, f"validation on {len(self.val_rows)} images")
        return {f"val_{k}": v for k, v in scores.items()}

    def _consider(self, epoch: int, scores: dict) -> None:
        """Keep the model when its validation score beats the best so far (ties keep the earlier)."""
        score = scores[f"val_{self.settings.select_on}"]
        if self.best is None or score > self.best["score"]:
            self.best = {"epoch": epoch, "score": score, "num_slices": int(self.model.num_slices),
                         "state": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}}

    def restore_best(self) -> None:
        """Put the best validated weights back in the model."""
        if self.best is None:
            return
        if self.best["num_slices"] != self.model.num_slices:
            self.model.set_num_slices(self.best["num_slices"])
        self.model.load_state_dict(self.best["state"])

    @property
    def best_epoch(self) -> int | None:
        return None if self.best is None else int(self.best["epoch"])

    def _sampler(self, epoch: int):
        from dcml.algorithm.samplers import ClusterBatchSampler

        s = self.settings
        clusters = None if self.model.num_slices == 1 and self.only_learner is None else self.clusters
        return ClusterBatchSampler(self.labels, clusters, classes_per_batch=s.classes_per_batch,
                                   images_per_class=s.images_per_class, seed=s.seed, epoch=epoch,
                                   length=s.batches_per_epoch or None)

    def _loader(self, sampler, epoch: int):
        """This process's share of every batch of ``sampler`` (the whole batch in one process)."""
        s = self.settings
        if self.activations is not None:  # the view of a row is a pure function of (seed, epoch, row)
            from dcml.algorithm.activations import TrainViews, batch_loader

            return batch_loader(TrainViews(self.activations, self._cache_rows, self.labels, s.seed, epoch),
                                ShareSampler(sampler, self.rank, self.world_size))
        from dcml.algorithm.data import ManifestImageDataset, build_transform

        rows = self.train_rows.assign(label=self.labels)
        dataset = ManifestImageDataset(self.manifest, rows, build_transform(self.model.config, train=True))
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        return DataLoader(SeededItems(dataset), batch_sampler=ShareSampler(sampler, self.rank, self.world_size,
                                                                           seeds=(s.seed, epoch)),
                          num_workers=s.num_workers, pin_memory=self.device.type == "cuda", generator=generator,
                          worker_init_fn=_seed_worker if s.num_workers else None)

    def _set_lr(self, epoch: int, step: int, steps: int) -> None:
        """Learning rates of this step: backbone off while warming up, then the schedule."""
        s = self.settings
        factor = 1.0
        if s.schedule == "cosine" and not self.warming_up(epoch):
            span = max(s.epochs - s.warmup_epochs, 1)
            progress = (epoch - s.warmup_epochs + step / max(steps, 1)) / span
            factor = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            off = group.get("name") == "backbone" and self.warming_up(epoch)
            group["lr"] = 0.0 if off else base * factor

    # -- the loop ----------------------------------------------------------------
    def fit(self, callbacks: Sequence[Callable[["Trainer", dict], None]] = (), resume: bool = True) -> list[dict]:
        """Train up to ``settings.epochs``; returns the per-epoch history.

        With validation rows the model ends with the weights of its best
        validated epoch (``best_epoch``; 0 = the initial model) and training
        stops early after ``patience`` epochs without improvement.
        """
        with self._resume_lock():
            return self._fit(callbacks, resume)

    @contextlib.contextmanager
    def _resume_lock(self):
        """Hold the resume file for this process; if another live process holds it
        (the same training running twice at once), use a private one instead."""
        if self.resume_path is None:
            yield
            return
        if not self.is_main:  # rank 0 holds the lock and says which file the run uses
            self.resume_path = Path(distributed.broadcast_object(None))
            yield
            return
        with resume_lock.hold(self.resume_path) as self.resume_path:  # the lock file goes with it
            distributed.broadcast_object(str(self.resume_path))
            yield

    def _fit(self, callbacks, resume: bool) -> list[dict]:
        s = self.settings
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        if not (resume and self.try_resume()):
            seed_everything(s.seed)
            self._seed_rank()
            self.start()
        self._share_state()
        while self.epoch < s.epochs and not self.stopped_early:
            entry = self._run_epoch(self.epoch)
            self.epoch += 1
            self.history.append(entry)
            self.save_resume()
            for callback in callbacks:
                callback(self, entry)
        distributed.check_identical(self.model.state_dict().values())
        self.restore_best()
        return self.history

    def _seed_rank(self) -> None:
        """Processes other than rank 0 continue on their own torch stream (dropout masks)."""
        if self.rank:
            torch.manual_seed(self.settings.seed * 1_000_003 + self.rank)

    def _share_state(self) -> None:
        """Data parallel: every process starts from rank 0's model (its head init) and clusters."""
        if self.world_size == 1:
            return
        distributed.broadcast_tensors(list(self.model.state_dict().values()) + list(self.losses.state_dict().values()))
        self.clusters, self.clustered_at = distributed.broadcast_object((self.clusters, self.clustered_at))

    def start(self) -> None:
        """Before epoch 1: the initial clustering, the head init, the initial model's scores.

        The initial model is validated (a candidate for the epoch kept, epoch
        0 of the history) and, with ``eval_every``, scored on the test rows
        (``initial``: what training started from, for the record).
        """
        if self.num_learners > 1 and self.only_learner is None and self.clusters is None:
            self.clusters = self.recluster(0)
            self.clustered_at = 0
        if self.head_init == "pca":
            self.initialise_head()
        if not self.is_main:  # rank 0 alone scores (and keeps the best weights)
            return
        if self.eval_rows is not None and self.settings.eval_every:
            self.initial = self.evaluate()
        if self.val_rows is not None:
            entry = {"epoch": 0, "phase": "initial", **self.validate(), **self.initial}
            self._consider(0, entry)
            self.history.append(entry)

    def epoch_started(self, epoch: int, entry: dict) -> None:
        """Hook: per-epoch state before the first batch."""

    def epoch_finished(self, epoch: int, entry: dict) -> None:
        """Hook: extra history fields after the last batch."""

    def forward(self, inputs: torch.Tensor, learner: int | None) -> torch.Tensor:
        """The embedding of a training batch: images, or cached activations in the fast mode."""
        if self.activations is not None:
            return self.model.forward_from_lower(inputs, learner=learner)
        return self.model(inputs, learner=learner)

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor, learner: int | None) -> dict:
        """One batch (hook): forward, loss, backward, optimiser step; returns numbers to average.

        ``inputs``: this process's share of the batch (all of it in one
        process); ``labels``: the labels of the whole batch. ``gather`` turns the
        share's embeddings into the whole batch's; ``step`` back-propagates,
        adds up the processes' gradients and steps the optimiser.
        """
        embeddings = self.gather(self.forward(inputs, learner))
        loss_fn = self._loss_for(learner)
        with self.batch_rng():
            pairs = self.miner(embeddings, labels) if self.miner is not None else None
            loss = loss_fn(embeddings, labels, pairs)
        self.check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # the same on every process: all compute the same loss
            self.step(loss)
        pos, neg = _mined_counts(pairs)
        return {"loss": float(loss.detach()), "mined_pos_pairs": pos, "mined_neg_pairs": neg,
                "nonzero_terms": _nonzero_terms(loss_fn) or 0}

    def gather(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The whole batch's embeddings from this process's share (itself in one process)."""
        return distributed.gather_batch(embeddings, self._share_sizes)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, the processes' gradients added up (loss parameters: averaged), optimiser step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            summed = [p for g in self.optimizer.param_groups if g.get("name") != "loss" for p in g["params"]]
            replicated = [p for g in self.optimizer.param_groups if g.get("name") == "loss" for p in g["params"]]
            distributed.all_reduce_gradients(summed, replicated)
        self.optimizer.step()

    @contextlib.contextmanager
    def batch_rng(self):
        """A random miner draws from a seed of (seed, epoch, batch): the same on every process and
        whatever their number (a deterministic miner: nothing changes)."""
        if not self._random_miner:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(np.random.SeedSequence([self.settings.seed, self._epoch_now, self._batch_now, 17])
                                  .generate_state(1)[0]))
            yield

    def check_finite(self, loss: torch.Tensor, detail: str = "") -> None:
        if not torch.isfinite(loss):
            s = self.settings
            raise DcmlError(
                f"training loss became {loss.item()} at epoch {self._epoch_now + 1}, batch {self._batch_now + 1}{detail}; "
                f"stopped without writing a model; lower the learning rates (lr_backbone={s.lr_backbone}, "
                f"lr_embedding={s.lr_embedding}) or check the input images")

    def _phase(self, epoch: int, entry: dict) -> None:
        s = self.settings
        if self.finetuning(epoch):
            if self.model.num_slices != 1:
                self.model.set_num_slices(1)
            entry["phase"] = "finetune"
            return
        entry["phase"] = "worker" if self.only_learner is not None else ("clusters" if self.num_learners > 1 else "plain")
        due = (self.clusters is None
               or (s.recluster_every and epoch > 0 and epoch % s.recluster_every == 0 and self.clustered_at != epoch))
        if self.num_learners > 1 and self.only_learner is None and due:
            t0 = time.perf_counter()
            self.clusters = self.recluster(epoch)
            self.clustered_at = epoch
            entry["clustering_s"] = round(time.perf_counter() - t0, 3)
            entry["cluster_sizes"] = cluster_sizes(self.clusters, self.num_learners)
        elif epoch == 0 and self.clusters is not None:
            entry["cluster_sizes"] = cluster_sizes(self.clusters, self.num_learners)

    def _run_epoch(self, epoch: int) -> dict:
        s = self.settings
        entry: dict = {"epoch": epoch + 1}
        self._phase(epoch, entry)
        if self.warming_up(epoch):
            entry["warmup"] = True
        self.epoch_started(epoch, entry)
        sampler = self._sampler(epoch)
        global_batches = sampler.epoch_batches()[sampler.position:]  # what every process's shares add up to
        loader = self._loader(sampler, epoch)
        self.model.train()
        frozen = s.freeze_backbone or self.warming_up(epoch)
        if frozen:
            self.model.backbone.eval()  # no BatchNorm statistics updates either
        backbone = self.backbone_parameters()
        for p in backbone:
            p.requires_grad_(not frozen)
        whole = self.model.num_slices == 1
        sums: dict[str, float] = {}
        images, batches = 0, 0
        steps = len(sampler)
        t0 = time.perf_counter()
        self._epoch_now = epoch
        bar = (progress(loader, total=steps, desc=f"epoch {epoch + 1}/{s.epochs}", unit="batch") if self.is_main
               else _Silent(loader))
        try:
            for inputs, _, _ in bar:
                batch = global_batches[batches]
                self._batch_now = batches
                self._share_sizes = [b - a for a, b in distributed.share_bounds(len(batch), self.world_size)]
                self._set_lr(epoch, batches, steps)
                inputs = inputs.to(self.device, non_blocking=True)
                labels = torch.from_numpy(self.labels[batch]).to(self.device)  # the whole batch's
                learner = None if whole else int(self.clusters[batch[0]])
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
        if not self.is_main:  # rank 0 validates, evaluates and decides on stopping early
            self.stopped_early = distributed.broadcast_object(None)
            return entry
        if self.val_rows is not None:
            t1 = time.perf_counter()
            entry.update(self.validate())
            entry["val_s"] = round(time.perf_counter() - t1, 3)
            self._consider(epoch + 1, entry)
            entry["best_epoch"] = self.best_epoch
            if s.patience and epoch + 1 - self.best_epoch >= s.patience:
                self.stopped_early = True
                entry["stopped_early"] = True
        if s.eval_every and self.eval_rows is not None and (
                (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs or self.stopped_early):
            t1 = time.perf_counter()
            entry.update(self.evaluate())
            entry["eval_s"] = round(time.perf_counter() - t1, 3)
        if self.world_size > 1:
            distributed.broadcast_object(self.stopped_early)
        return entry
