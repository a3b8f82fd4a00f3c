"""Batches that each come from one cluster: P classes x M images, resumable.

Epoch layout (what ``ClusterBatchSampler`` yields):

* Every cluster is split into *passes*. In a pass, each class of the cluster
  is shuffled and cut into chunks of M images, so an image appears once per
  pass; a class's last short chunk is topped up with other images of the same
  class, and a class with fewer than M images is drawn with replacement (as
  the reference code's class-balanced sampler does). A batch takes one chunk
  from each of P distinct classes, the classes drawn with probability
  proportional to their remaining chunks so large classes are used up along
  with small ones. The pass ends when fewer than P classes still have chunks.
* Clusters are interleaved round-robin in increasing cluster id. A cluster
  whose pass ends restarts with a freshly shuffled pass; the epoch ends when
  the pass of the largest cluster (most batches per pass) is used up. Every
  cluster therefore gets the same number of batches per epoch:
  ``len(sampler) == num_clusters * max(batches per pass)``.
* A class with a single image in a cluster is left out of that cluster (it
  cannot form a positive pair); rows with cluster -1 are ignored. A cluster
  with fewer than P usable classes uses all of them (smaller batches); one with
  fewer than two usable classes yields no batches (a warning says so).

The batches of an epoch are a pure function of (labels, clusters, P, M, seed,
epoch), so the state needed to resume is just (epoch, position): a resumed
sampler regenerates the epoch and skips the batches already taken.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Iterator, Sequence

import numpy as np

from dcml.contracts.errors import DcmlError


def usable_members(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Mask of rows that a cluster can use: cluster != -1 and the row's class has
    at least two rows in that cluster."""
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    keep = clusters >= 0
    if not keep.any():
        return keep
    pairs = np.stack([clusters[keep], labels[keep]], axis=1)
    _, inverse, counts = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
    usable = keep.copy()
    usable[np.flatnonzero(keep)] = counts[inverse.reshape(-1)] >= 2
    return usable


class ClusterBatchSampler:
    """A batch sampler (for ``DataLoader(batch_sampler=...)``) over dataset
    indices ``0..len(labels)-1``.

    Args:
        labels: class label of every dataset index.
        clusters: cluster id of every index (-1 = left out), or None for one
            cluster holding everything (the plain class-balanced K=1 sampler).
        classes_per_batch: P.
        images_per_class: M.
        seed: base seed; epoch e draws from ``numpy.random.default_rng([seed, e])``.
        epoch: the epoch to start in (the trainer passes its epoch counter when
            it rebuilds the sampler after re-clustering).
        length: batches per epoch instead of the natural count (clusters
            still take turns; a cluster whose pass ends starts a new one).
            Equal lengths give runs with different K equal images trained.
    """

    def __init__(self, labels: Sequence[int], clusters: Sequence[int] | None = None,
                 classes_per_batch: int = 20, images_per_class: int = 4, seed: int = 0,
                 epoch: int = 0, length: int | None = None):
        if classes_per_batch < 2:
            raise DcmlError(f"classes_per_batch={classes_per_batch}: a batch needs at least 2 classes; raise it")
        if images_per_class < 2:
            raise DcmlError(f"images_per_class={images_per_class}: a class needs at least 2 images per batch to form positives; raise it")
        self.labels = np.asarray(labels, dtype=np.int64)
        if clusters is None:
            self.clusters = np.zeros(len(self.labels), dtype=np.int64)
        else:
            self.clusters = np.asarray(clusters, dtype=np.int64)
            if self.clusters.shape != self.labels.shape:
                raise DcmlError(f"clusters has {len(self.clusters)} entries but labels has {len(self.labels)}; give one cluster id per row")
        self.classes_per_batch = int(classes_per_batch)
        self.images_per_class = int(images_per_class)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.position = 0

        usable = usable_members(self.labels, self.clusters)
        # cluster id -> list of index arrays, one per usable class (sorted for determinism)
        self._classes: dict[int, list[np.ndarray]] = {}
        self.skipped_clusters: list[int] = []
        for c in np.unique(self.clusters[self.clusters >= 0]):
            idx = np.flatnonzero(usable & (self.clusters == c))
            groups = [idx[self.labels[idx] == lab] for lab in np.unique(self.labels[idx])]
            if len(groups) < 2:
                self.skipped_clusters.append(int(c))
                continue
            self._classes[int(c)] = groups
        if not self._classes:
            raise DcmlError("no cluster has two classes with at least two images each; use fewer clusters or more data")
        if self.skipped_clusters:
            warnings.warn(f"clusters {self.skipped_clusters} have fewer than two classes with two images; they get no batches", stacklevel=2)
        self.cluster_ids = sorted(self._classes)
        # Batches per pass depend only on class sizes, so compute them once.
        self._pass_len = {c: self._count_pass(c) for c in self.cluster_ids}
        self._epoch_len = len(self.cluster_ids) * max(self._pass_len.values())
        if length:
            if int(length) < 1:
                raise DcmlError(f"batches_per_epoch={length}: must be >= 1 (0 = the sampler's natural epoch)")
            self._epoch_len = int(length)
        self._cache: tuple[int, list[list[int]]] | None = None

    # -- layout ---------------------------------------------------------------
    def _chunk_counts(self, c: int) -> np.ndarray:
        sizes = np.array([len(g) for g in self._classes[c]])
        return -(-sizes // self.images_per_class)  # ceil

    def _count_pass(self, c: int) -> int:
        # The most batches of p distinct classes the chunks allow: t batches are
        # possible iff sum(min(chunks_i, t)) >= p * t (a class gives at most one
        # chunk per batch). _one_pass reaches exactly this many.
        counts = self._chunk_counts(c)
        p = min(self.classes_per_batch, len(counts))
        lo, hi = 0, int(counts.sum()) // p
        while lo < hi:
            t = (lo + hi + 1) // 2
            if np.minimum(counts, t).sum() >= p * t:
                lo = t
            else:
                hi = t - 1
        return lo

    def _one_pass(self, c: int, rng: np.random.Generator) -> list[list[int]]:
        """The batches of one pass over cluster c (exactly ``_pass_len[c]`` of them)."""
        m = self.images_per_class
        chunks: list[list[np.ndarray]] = []
        for members in self._classes[c]:
            order = rng.permutation(members)
            n = len(order)
            if n < m:
                pieces = [np.concatenate([order, rng.choice(members, size=m - n, replace=True)])]
            else:
                pieces = [order[i:i + m] for i in range(0, n - n % m, m)]
                if n % m:
                    rest = order[n - n % m:]
                    fill = rng.choice(order[:n - n % m], size=m - len(rest), replace=False)
                    pieces.append(np.concatenate([rest, fill]))
            chunks.append(pieces)
        remaining = np.array([len(p) for p in chunks])
        p = min(self.classes_per_batch, len(chunks))
        batches = []
        for _ in range(self._pass_len[c]):
            # Drawing proportionally to remaining chunks, but always including the
            # classes that must be taken every round to reach the pass length,
            # keeps the pass as long as _count_pass promised.
            rounds_left = self._pass_len[c] - len(batches)
            forced = np.flatnonzero(remaining >= rounds_left)
            free = np.flatnonzero((remaining > 0) & (remaining < rounds_left))
            need = p - len(forced)
            if need < 0:
                picked = rng.choice(forced, size=p, replace=False)
            else:
                weights = remaining[free] / remaining[free].sum() if len(free) else None
                picked = np.concatenate([forced, rng.choice(free, size=need, replace=False, p=weights)]) if need else forced
            batch = []
            for k in np.sort(picked):
                remaining[k] -= 1
                batch.extend(int(i) for i in chunks[k][remaining[k]])
            batches.append(batch)
        return batches

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), round-robin over clusters."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        per_cluster = -(-self._epoch_len // len(self.cluster_ids))
        streams = {}
        for c in self.cluster_ids:
            out: list[list[int]] = []
            while len(out) < per_cluster:  # smaller clusters restart with a new pass
                out.extend(self._one_pass(c, rng))
            streams[c] = out[:per_cluster]
        batches = [streams[c][j] for j in range(per_cluster) for c in self.cluster_ids][:self._epoch_len]
        self._cache = (epoch, batches)
        return batches

    # -- batch sampler protocol -------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        """Batches left in the current epoch (the full epoch when not started)."""
        return self._epoch_len - self.position

    @property
    def batches_per_epoch(self) -> int:
        return self._epoch_len

    @property
    def num_clusters(self) -> int:
        return len(self.cluster_ids)

    def cluster_of(self, batch: Sequence[int]) -> int:
        return int(self.clusters[batch[0]])

    # -- resume -----------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self.labels, self.clusters):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(f"{self.classes_per_batch},{self.images_per_class},{self.seed},{self._epoch_len}".encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        """Position in the epoch stream (primitives only, safe for weights_only loads).

        The position counts batches this sampler has handed out. A DataLoader
        with workers prefetches ahead of the training loop, so mid-epoch a
        trainer should save the number of batches it has consumed instead
        (``{**state, "position": consumed}``); at an epoch boundary both agree.
        """
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise DcmlError("sampler state was saved for different labels, clusters, batch shape or seed; resume with the same data and settings or start afresh")
        position = int(state["position"])
        if not 0 <= position <= self._epoch_len:
            raise DcmlError(f"sampler state position {position} is outside an epoch of {self._epoch_len} batches")
        self.epoch = int(state["epoch"])
        self.position = position
