"""The training loop: K learners over one backbone, re-clustering, fine-tuning.

One :class:`Trainer` serves every training mode:

* **shared** (the paper): the model has K slices; each batch comes from one
  cluster k (:class:`dcml.samplers.ClusterBatchSampler`) and learner k's loss
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
"""

from __future__ import annotations

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
from tqdm.auto import tqdm

from dcml import checkpoint
from dcml.clustering import cluster_sizes, drop_singletons, kmeans, match_to_previous
from dcml.errors import DcmlError

CLUSTER_INPUTS = ("features", "embedding")


@dataclass
class TrainSettings:
    """Everything that decides what a training run computes."""

    epochs: int = 10
    classes_per_batch: int = 20  # P
    images_per_class: int = 4  # M
    lr_backbone: float = 1e-5
    lr_embedding: float = 1e-5
    lr_loss: float | None = None  # proxies / learnable beta; None = 100 x lr_embedding
    weight_decay: float = 1e-4
    loss: str = "margin"
    margin: float | None = None
    loss_options: dict = field(default_factory=dict)  # extra PML keyword arguments
    miner: str = "reference"
    recluster_every: int = 2  # R; 0 = never re-cluster
    cluster_on: str = "features"  # "features" (the reference code) or "embedding" (the paper text)
    kmeans_niter: int = 100
    kmeans_nredo: int = 1
    finetune_epoch: int | None = None  # F: from this epoch on, K=1 on all data
    eval_every: int = 0  # 0 = no R@1 during training
    eval_batch_size: int = 128
    freeze_backbone: bool = False
    seed: int = 0
    num_workers: int = 0

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


class Trainer:
    """Train ``model`` on ``train_rows`` of ``manifest``; see the module docstring.

    Args:
        clusters: initial cluster id per train row (-1 = left out), or None.
            With a K>1 model and no clusters, the trainer clusters at epoch 0.
        only_learner: worker mode: train slice k on cluster k's rows only.
        eval_rows: rows for the periodic R@1 ("test" rows, or "query" and
            "gallery" rows for a query-vs-gallery protocol).
        resume_path: where the per-epoch resume checkpoint lives; an existing
            one written by the same settings is resumed.
        fingerprint_extra: anything else that makes this run distinct (e.g.
            the lineage of the input files), mixed into the resume check.
    """

    def __init__(self, model, manifest, train_rows: pd.DataFrame, settings: TrainSettings, *,
                 clusters: Sequence[int] | None = None, only_learner: int | None = None,
                 eval_rows: pd.DataFrame | None = None, resume_path: str | Path | None = None,
                 device=None, fingerprint_extra=None):
        self.model = model
        self.manifest = manifest
        self.settings = settings
        self.device = torch.device(device) if device is not None else default_device()
        self.train_rows = train_rows.reset_index(drop=True)
        self.labels = dense_labels(self.train_rows["label"].to_numpy())
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.num_learners = int(model.num_slices)
        self.only_learner = only_learner
        self.eval_rows = eval_rows
        self.resume_path = Path(resume_path) if resume_path else None
        self.history: list[dict] = []
        self.epoch = 0  # epochs finished

        if only_learner is not None:
            if not 0 <= only_learner < self.num_learners:
                raise DcmlError(f"cluster_id={only_learner} is out of range for K={self.num_learners}; use 0..{self.num_learners - 1}")
            if clusters is None:
                raise DcmlError("worker mode needs cluster assignments; pass the clusters file")
        self.clusters = None if clusters is None else self._checked_clusters(clusters)
        self.clustered_at: int | None = 0 if clusters is not None else None

        self.model.to(self.device)
        if settings.freeze_backbone:
            for p in self.model.backbone.parameters():
                p.requires_grad_(False)
        self._build_losses()
        self._build_optimizer()
        if only_learner is not None:
            # Worker: the other slices' head rows must come out untouched.
            start, stop = self.model.slice_bounds(only_learner)
            self._keep_rows = torch.ones(self.model.embedding_dim, dtype=torch.bool, device=self.device)
            self._keep_rows[start:stop] = False
            self._kept_weight = self.model.head.weight.detach()[self._keep_rows].clone()
            self._kept_bias = self.model.head.bias.detach()[self._keep_rows].clone()
        self.fingerprint = self._fingerprint(fingerprint_extra)

    # -- setup -----------------------------------------------------------------
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
        from dcml.losses import build_loss, build_miner

        s = self.settings

        def make(dim):
            return build_loss(s.loss, embedding_dim=dim, num_classes=self.num_classes, margin=s.margin, **s.loss_options)

        dims = [b - a for a, b in (self.model.slice_bounds(k) for k in range(self.num_learners))]
        losses = [make(d) for d in dims]
        if self.num_learners > 1:  # the fine-tuning phase trains the whole embedding as one
            losses.append(make(self.model.embedding_dim))
        self.losses = torch.nn.ModuleList(losses).to(self.device)
        self.miner = build_miner(s.miner)

    def _loss_for(self, learner: int | None):
        return self.losses[-1] if learner is None else self.losses[learner]

    def _build_optimizer(self) -> None:
        from dcml.losses import loss_parameters

        s = self.settings
        groups = []
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": s.lr_backbone, "name": "backbone"})
        groups.append({"params": list(self.model.head.parameters()), "lr": s.lr_embedding, "name": "embedding"})
        extra = [p for loss in self.losses for p in loss_parameters(loss)]
        if extra:
            groups.append({"params": extra, "lr": s.loss_lr, "name": "loss"})
        self.optimizer = torch.optim.Adam(groups, weight_decay=s.weight_decay)

    def _fingerprint(self, extra) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self.settings), sort_keys=True, default=str).encode())
        h.update(json.dumps(self.model.config, sort_keys=True).encode())
        h.update(json.dumps([self.only_learner, extra], sort_keys=True, default=str).encode())
        h.update("\0".join(self.train_rows["image_id"].astype(str)).encode())
        h.update(self.labels.tobytes())
        if self.clusters is not None:
            h.update(self.clusters.tobytes())
        for key, tensor in self.model.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -- resume ----------------------------------------------------------------
    def state(self) -> dict:
        """The resume checkpoint after ``self.epoch`` finished epochs."""
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
        if self.resume_path is not None:
            checkpoint.save(self.resume_path, self.state())

    def try_resume(self) -> bool:
        """Load the resume checkpoint if there is one for this run; True when loaded."""
        if self.resume_path is None or not self.resume_path.exists():
            return False
        try:
            state = checkpoint.load(self.resume_path)  # CPU: RNG states must stay there
        except DcmlError as exc:
            warnings.warn(f"ignoring unreadable resume file ({exc}); starting afresh", stacklevel=2)
            return False
        if state.get("fingerprint") != self.fingerprint:
            warnings.warn(f"{self.resume_path}: written by a run with other inputs or settings; starting afresh", stacklevel=2)
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
        set_rng_state(state["rng"])
        return True

    # -- phases ----------------------------------------------------------------
    def finetuning(self, epoch: int) -> bool:
        f = self.settings.finetune_epoch
        return f is not None and epoch >= f

    def recluster(self, epoch: int) -> np.ndarray:
        """New cluster per train row from the current model, matched to the learners."""
        from dcml.inference import compute_vectors

        s = self.settings
        vectors = compute_vectors(self.model, self.manifest, self.train_rows, kind=s.cluster_on,
                                  batch_size=s.eval_batch_size, device=self.device, num_workers=s.num_workers,
                                  desc=f"re-clustering: {s.cluster_on} of {len(self.train_rows)} images")
        result = kmeans(vectors, self.num_learners, niter=s.kmeans_niter, nredo=s.kmeans_nredo,
                        seed=s.seed + epoch, normalize=True)
        assignments = result.assignments
        if self.clusters is not None:
            assignments = match_to_previous(self.clusters, assignments, self.num_learners)
        return drop_singletons(assignments, self.labels)

    def evaluate(self) -> dict:
        """R@1 of the current model on ``eval_rows``."""
        from dcml.inference import compute_vectors
        from dcml.metrics import evaluate_embeddings

        s = self.settings
        rows = self.eval_rows
        splits = set(rows["split"])
        if "query" in splits and "gallery" in splits:
            query, gallery = rows[rows["split"] == "query"], rows[rows["split"] == "gallery"]
        else:
            query, gallery = rows, None

        def embed(part):
            return compute_vectors(self.model, self.manifest, part.reset_index(drop=True), kind="embedding",
                                   batch_size=s.eval_batch_size, device=self.device, num_workers=s.num_workers,
                                   desc=f"R@1 on {len(part)} images")

        q = embed(query)
        if gallery is None:
            metrics = evaluate_embeddings(q, query["label"].to_numpy(), ks=(1,), include=("recall",))
        else:
            metrics = evaluate_embeddings(q, query["label"].to_numpy(), embed(gallery), gallery["label"].to_numpy(),
                                          ks=(1,), include=("recall",))
        return {"recall@1": float(metrics["recall@1"])}

    def _sampler(self, epoch: int):
        from dcml.samplers import ClusterBatchSampler

        s = self.settings
        clusters = None if self.model.num_slices == 1 and self.only_learner is None else self.clusters
        return ClusterBatchSampler(self.labels, clusters, classes_per_batch=s.classes_per_batch,
                                   images_per_class=s.images_per_class, seed=s.seed, epoch=epoch)

    def _loader(self, sampler, epoch: int) -> DataLoader:
        from dcml.data import ManifestImageDataset, build_transform

        s = self.settings
        rows = self.train_rows.assign(label=self.labels)
        dataset = ManifestImageDataset(self.manifest, rows, build_transform(self.model.config, train=True))
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=s.num_workers,
                          pin_memory=self.device.type == "cuda", generator=generator,
                          worker_init_fn=_seed_worker if s.num_workers else None)

    # -- the loop ----------------------------------------------------------------
    def fit(self, callbacks: Sequence[Callable[["Trainer", dict], None]] = (), resume: bool = True) -> list[dict]:
        """Train up to ``settings.epochs``; returns the per-epoch history."""
        s = self.settings
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        if not (resume and self.try_resume()):
            seed_everything(s.seed)
        while self.epoch < s.epochs:
            entry = self._run_epoch(self.epoch)
            self.epoch += 1
            self.history.append(entry)
            self.save_resume()
            for callback in callbacks:
                callback(self, entry)
        return self.history

    def _run_epoch(self, epoch: int) -> dict:
        s = self.settings
        entry: dict = {"epoch": epoch + 1}
        if self.finetuning(epoch):
            if self.model.num_slices != 1:
                self.model.set_num_slices(1)
            entry["phase"] = "finetune"
        else:
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

        sampler = self._sampler(epoch)
        loader = self._loader(sampler, epoch)
        self.model.train()
        if s.freeze_backbone:
            self.model.backbone.eval()  # no BatchNorm statistics updates either
        whole = self.model.num_slices == 1
        total_loss, images, batches, positives, negatives, nonzero = 0.0, 0, 0, 0, 0, 0
        t0 = time.perf_counter()
        progress = tqdm(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{s.epochs}", unit="batch",
                        disable=None, leave=False)
        for images_batch, labels, index in progress:
            images_batch = images_batch.to(self.device, non_blocking=True)
            labels = labels.to(self.device)
            learner = None if whole else int(self.clusters[int(index[0])])
            embeddings = self.model(images_batch, learner=learner)
            loss_fn = self._loss_for(learner)
            pairs = self.miner(embeddings, labels) if self.miner is not None else None
            loss = loss_fn(embeddings, labels, pairs)
            if not torch.isfinite(loss):
                raise DcmlError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, batch {batches + 1}; stopped without "
                    f"writing a model; lower the learning rates (lr_backbone={s.lr_backbone}, lr_embedding={s.lr_embedding}) "
                    "or check the input images")
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                self.optimizer.step()
            if self.only_learner is not None:
                with torch.no_grad():
                    self.model.head.weight[self._keep_rows] = self._kept_weight
                    self.model.head.bias[self._keep_rows] = self._kept_bias
            total_loss += float(loss.detach())
            images += len(labels)
            batches += 1
            pos, neg = _mined_counts(pairs)
            positives, negatives = positives + pos, negatives + neg
            nonzero += _nonzero_terms(loss_fn) or 0
            progress.set_postfix(loss=f"{total_loss / batches:.4f}", refresh=False)
        progress.close()
        seconds = time.perf_counter() - t0
        entry.update({
            "loss": total_loss / max(batches, 1),
            "batches": batches,
            "images": images,
            "mined_pos_pairs": positives / max(batches, 1),
            "mined_neg_pairs": negatives / max(batches, 1),
            "nonzero_terms": nonzero / max(batches, 1),
            "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
            "num_slices": int(self.model.num_slices),
        })
        if s.eval_every and self.eval_rows is not None and len(self.eval_rows) and (
                (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs):
            t1 = time.perf_counter()
            entry.update(self.evaluate())
            entry["eval_s"] = round(time.perf_counter() - t1, 3)
        return entry
