"""Faiss k-means on all points, Hungarian re-matching of clusters to learners, and
random class groups (the control without cluster structure)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment

from dcml.contracts.errors import DcmlError


@dataclass
class KMeansResult:
    assignments: np.ndarray  # int64 [n], cluster of every point
    centroids: np.ndarray  # float32 [k, d]
    inertia: float  # sum of squared L2 distances of points to their centroid
    iterations: int = 0  # Lloyd iterations run (of the best restart)


# Stop when one iteration changes the k-means objective by less than this fraction
# (faiss's own rule, ClusteringParameters.early_stop_threshold, kept here so that
# every faiss build, CPU or GPU, stops the same way). bench/bench_speed.py measured
# it against scikit-learn (BENCHMARKS.md, "Speed against the alternatives").
TOL = 1e-4


def use_gpu(gpu: bool | str = "auto") -> bool:
    """Whether faiss should run on GPU: "auto" = when this faiss build sees one."""
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if gpu == "auto":
        return available
    if gpu and not available:
        raise DcmlError("gpu=True but this faiss build sees no GPU; install faiss-gpu or pass gpu=auto")
    return bool(gpu)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def kmeans(x: np.ndarray, k: int, *, niter: int = 100, nredo: int = 1, seed: int = 0,
           normalize: bool = True, spherical: bool = False, gpu: bool | str = "auto",
           tol: float = TOL, verbose: bool = False) -> KMeansResult:
    """Faiss k-means of the rows of ``x`` into ``k`` clusters, on every point.

    faiss subsamples to ``max_points_per_centroid * k`` points (default 256 * k)
    before training; the reference code raises that limit so the centroids see
    the whole data set, and so does this. ``normalize`` L2-normalises the rows
    first (the reference clusters normalised backbone features); ``spherical``
    also re-normalises the centroids after each iteration.

    Seeded by k-means++ (faiss's own, where the faiss build has it; else
    faiss's random points), then at most ``niter`` Lloyd iterations: it stops
    earlier once an iteration changes the objective by less than ``tol`` of its
    value (0: only when it no longer changes). ``nredo`` restarts with seeds
    ``seed``, ``seed + 1``, ...; the lowest inertia is kept.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise DcmlError(f"k-means input has shape {x.shape}; expected a matrix [points, dim]")
    n, d = x.shape
    if k < 1 or n < k:
        raise DcmlError(f"cannot make {k} clusters from {n} points; choose 1 <= k <= {n}")
    if not 0 <= tol < 1:
        raise DcmlError(f"k-means tol={tol}; choose 0 <= tol < 1 (a relative change of the objective)")
    if not np.isfinite(x).all():
        raise DcmlError("k-means input contains NaN or inf; recompute the features")
    x = l2_normalize(x) if normalize else np.ascontiguousarray(x, dtype=np.float32)
    if k == 1:
        centroid = x.mean(axis=0, keepdims=True)
        if spherical:
            centroid = l2_normalize(centroid)
        inertia = float(((x - centroid) ** 2).sum())
        return KMeansResult(np.zeros(n, dtype=np.int64), centroid.astype(np.float32), inertia)
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    if use_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    best = None
    for redo in range(max(1, int(nredo))):
        centroids, iterations = _lloyd(x, k, index, niter=niter, seed=seed + redo, spherical=spherical,
                                       tol=tol, verbose=verbose)
        result = _assign(x, centroids, index, spherical, iterations)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def _lloyd(x: np.ndarray, k: int, index, *, niter: int, seed: int, spherical: bool, tol: float,
           verbose: bool) -> tuple[np.ndarray, int]:
    """Centroids after faiss Lloyd iterations, one ``Clustering.train`` call each.

    Each call starts from the centroids the previous one left (faiss uses
    centroids already present as its initialisation), so the run is faiss's
    own, checked for convergence between iterations.
    """
    n, d = x.shape
    cp = faiss.ClusteringParameters()
    cp.niter, cp.seed, cp.spherical, cp.verbose = 1, int(seed), bool(spherical), bool(verbose)
    cp.max_points_per_centroid = max(256, math.ceil(n / k))  # never subsample
    cp.min_points_per_centroid = 1  # small data sets are fine; don't warn
    if hasattr(cp, "check_input_data_for_NaNs"):
        cp.check_input_data_for_NaNs = False  # checked above, once
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):  # k-means++ seeding where the build has it (1.15 does)
        cp.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    clus = faiss.Clustering(d, k, cp)
    previous = None
    iterations = 0
    for iterations in range(1, max(1, int(niter)) + 1):
        clus.train(x, index)
        stats = clus.iteration_stats
        objective = stats.at(stats.size() - 1).obj
        if previous is not None and abs(previous - objective) <= tol * abs(previous):
            break
        previous = objective
    return faiss.vector_float_to_array(clus.centroids).reshape(k, d).astype(np.float32), iterations


def _assign(x: np.ndarray, centroids: np.ndarray, index, spherical: bool, iterations: int) -> KMeansResult:
    """Nearest centroid of every row and the inertia (squared L2 distances) of that assignment."""
    index.reset()
    index.add(centroids)
    scores, labels = index.search(x, 1)
    scores = scores[:, 0].astype(np.float64)
    labels = labels[:, 0].astype(np.int64)
    if spherical:  # the index scores by inner product; turn it into squared distance
        x_sq = (x.astype(np.float64) ** 2).sum(axis=1)
        c_sq = (centroids.astype(np.float64) ** 2).sum(axis=1)[labels]
        scores = np.maximum(x_sq + c_sq - 2 * scores, 0)
    return KMeansResult(assignments=labels, centroids=centroids, inertia=float(scores.sum()), iterations=iterations)


def overlap(previous: np.ndarray, current: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts of points in previous cluster i and current cluster j (-1 ignored)."""
    previous = np.asarray(previous, dtype=np.int64)
    current = np.asarray(current, dtype=np.int64)
    if previous.shape != current.shape:
        raise DcmlError(f"cannot match clusterings of {len(previous)} and {len(current)} points; they must cover the same rows")
    both = (previous >= 0) & (current >= 0)
    if (previous[both] >= k).any() or (current[both] >= k).any():
        raise DcmlError(f"cluster ids must be below k={k}")
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (previous[both], current[both]), 1)
    return counts


def match_to_previous(previous: np.ndarray, current: np.ndarray, k: int) -> np.ndarray:
    """Relabel ``current`` so that cluster ids agree most with ``previous``.

    The Hungarian algorithm picks the one-to-one map new -> old cluster id that
    maximises the number of points keeping their id, so learner k keeps
    training on roughly the same data after re-clustering. -1 stays -1.
    """
    counts = overlap(previous, current, k)
    old_ids, new_ids = linear_sum_assignment(counts, maximize=True)
    mapping = np.empty(k, dtype=np.int64)
    mapping[new_ids] = old_ids
    current = np.asarray(current, dtype=np.int64)
    return np.where(current >= 0, mapping[np.clip(current, 0, k - 1)], -1)


GROUPINGS = ("kmeans", "random")


def random_class_groups(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Group id per row: whole classes dealt at random into ``k`` groups of equal class counts (+-1).

    A function of the set of labels and ``seed`` only, so the cluster stage and
    the trainer draw the same groups; a class never spans two groups.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if k < 1 or k > len(classes):
        raise DcmlError(f"k={k} random class groups need between 1 and {len(classes)} classes (the training classes); "
                        f"lower num_clusters")
    order = np.random.default_rng([int(seed), 7919]).permutation(len(classes))
    group_of_class = np.empty(len(classes), dtype=np.int64)
    group_of_class[order] = np.arange(len(classes)) % k
    return group_of_class[np.searchsorted(classes, labels)]


def drop_singletons(assignments: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Set to -1 the rows whose class has a single member in their cluster."""
    from dcml.algorithm.samplers import usable_members

    assignments = np.asarray(assignments, dtype=np.int64)
    return np.where(usable_members(labels, assignments), assignments, -1)


def cluster_sizes(assignments: np.ndarray, k: int) -> list[int]:
    assignments = np.asarray(assignments)
    return np.bincount(assignments[assignments >= 0], minlength=k).astype(int).tolist()
