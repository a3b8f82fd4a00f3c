"""Divide and conquer's bookkeeping: which group (cluster) each training row is in, when the groups
are drawn again, and whether a K-slice model's loss sees one slice or the whole embedding.

* Groups are faiss k-means clusters of the L2-normalised backbone features (or
  embeddings), matched to the previous ones (Hungarian) so learner k keeps
  cluster k, or K random groups of whole classes (``grouping="random"``, a
  control). A class with a single image in a group is left out of it (-1).
* The reference code's schedule: slice k alone until ``whole_embedding_after``
  of the epochs before fine-tuning, the whole embedding (on one-cluster
  batches) after that. Workers (``only_learner``) always train their slice.
* ``num_groups`` > the model's slices: a one-slice model trained on batches
  from K groups (the control without slices).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dcml.algorithm.clustering import drop_singletons, kmeans, match_to_previous, random_class_groups
from dcml.contracts.errors import DcmlError


def switch_epoch(settings) -> int | None:
    """``whole_embedding_after`` x the epochs before fine-tuning, rounded up (None: never): the
    reference code's ``epoch >= finetune_epoch * 8 / 19`` (epoch 80 of 190)."""
    before = settings.finetune_epoch if settings.finetune_epoch is not None else settings.epochs
    first = math.ceil(settings.whole_embedding_after * before - 1e-9)
    return first if first < before else None


class Grouping:
    def __init__(self, settings, labels: np.ndarray, num_slices: int, only_learner: int | None = None,
                 clusters=None):
        self.settings, self.labels = settings, labels
        self.num_slices = int(num_slices)
        self.num_groups = int(settings.num_groups or self.num_slices)  # clusters the batches come from
        if self.num_groups != self.num_slices and self.num_slices != 1:
            raise DcmlError(f"num_groups={self.num_groups} with a K={self.num_slices} model: use one group per "
                            "slice, or a one-slice model on K groups")
        self.only_learner = only_learner
        if only_learner is not None:
            if not 0 <= only_learner < self.num_slices:
                raise DcmlError(f"cluster_id={only_learner} is out of range for K={self.num_slices}; use 0..{self.num_slices - 1}")
            if clusters is None:
                raise DcmlError("worker mode needs cluster assignments; pass the clusters file")
        self.clusters = None if clusters is None else self._checked(clusters)
        self.clustered_at: int | None = 0 if clusters is not None else None
        self.whole_from = self._whole_embedding_epoch()

    def _checked(self, clusters) -> np.ndarray:
        clusters = np.asarray(clusters, dtype=np.int64)
        if clusters.shape != (len(self.labels),):
            raise DcmlError(f"{len(clusters)} cluster ids for {len(self.labels)} training rows; pass one per training row")
        if clusters.max(initial=-1) >= self.num_groups:
            raise DcmlError(f"cluster ids go up to {clusters.max()} but the training has K={self.num_groups} groups; "
                            "set num_slices to the clusters file's k")
        if self.only_learner is not None:
            clusters = np.where(clusters == self.only_learner, clusters, -1)
        return drop_singletons(clusters, self.labels)

    # -- the schedule ------------------------------------------------------------
    def _whole_embedding_epoch(self) -> int | None:
        """The first epoch whose loss sees the whole embedding of a K-slice model (None: never)."""
        if self.num_slices == 1 or self.only_learner is not None:
            return None
        return switch_epoch(self.settings)

    @property
    def clustering(self) -> bool:
        """Whether this training draws groups itself (K>1 shared mode; not a worker)."""
        return self.num_groups > 1 and self.only_learner is None

    def due(self, epoch: int) -> bool:
        """Whether the groups are drawn (again) before ``epoch``."""
        every = self.settings.recluster_every
        return self.clustering and (self.clusters is None or (
            every and epoch > 0 and epoch % every == 0 and self.clustered_at != epoch))

    def regroup(self, epoch: int, vectors_of) -> np.ndarray:
        """New groups from the current model (``vectors_of(kind)``: features or embeddings of the rows)."""
        s = self.settings
        if s.grouping == "random":  # the same class groups every time: a function of the labels and the seed
            return drop_singletons(random_class_groups(self.labels, self.num_groups, s.seed), self.labels)
        result = kmeans(vectors_of(s.cluster_on), self.num_groups, niter=s.kmeans_niter, nredo=s.kmeans_nredo,
                        seed=s.seed + epoch, normalize=True)
        assignments = result.assignments
        if self.clusters is not None:
            assignments = match_to_previous(self.clusters, assignments, self.num_groups)
        return drop_singletons(assignments, self.labels)

    def state(self, image_ids: list[str]) -> dict:
        return {
            "k": self.num_groups,
            "assignments": None if self.clusters is None else torch.from_numpy(self.clusters.copy()),
            "clustered_at": -1 if self.clustered_at is None else int(self.clustered_at),
            "image_ids": image_ids,
        }

    def load(self, state: dict) -> None:
        self.clusters = None if state["assignments"] is None else state["assignments"].cpu().numpy().astype(np.int64)
        self.clustered_at = None if state["clustered_at"] < 0 else state["clustered_at"]
