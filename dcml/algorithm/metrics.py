"""Retrieval and clustering metrics of embeddings, equal to pytorch-metric-learning.

``evaluate_embeddings`` returns Recall@K (any K), R-Precision, MAP@R, NMI and
AMI with the semantics of PML's ``AccuracyCalculator`` (k="max_bin_count" or
larger), value for value:

* One exact faiss kNN search (``IndexFlatL2``, like PML's ``FaissKNN``) with
  k = max(largest class count, largest K) serves every retrieval metric. Only
  per-query scalars are kept, so memory is O(N * k) per chunk of queries and
  never O(N^2).
* When the reference is the query set itself, k + 1 neighbours are searched
  and the neighbour whose *index* is the query's own is dropped (or the last
  one when the query is not among them: exact duplicates can push it out).
* R = number of same-label references (minus the query itself). Queries with
  R = 0 are left out of every retrieval metric, as in PML.
* NMI / AMI: PML's k-means call (``faiss.Kmeans(d, n_classes, niter=20)``,
  faiss's default seed and subsampling) on the query embeddings, then
  scikit-learn's NMI. AMI is scikit-learn's formula, with the expected mutual
  information summed over distinct (class size, cluster size) pairs instead of
  every (class, cluster) pair: the same sum, in milliseconds instead of tens of
  seconds for 11,000 classes.
* No normalisation is applied here (PML doesn't either).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

import faiss
import numpy as np
from scipy.special import gammaln
from tqdm import tqdm  # not tqdm.auto: see dcml.contracts.events.progress

from dcml.contracts.errors import DcmlError

RETRIEVAL_METRICS = ("recall", "r_precision", "map@r")
CLUSTERING_METRICS = ("nmi", "ami")
METRICS = RETRIEVAL_METRICS + CLUSTERING_METRICS

# PML's FaissKMeans: faiss.Kmeans(d, k, niter=20); everything else faiss's default.
PML_KMEANS_NITER = 20

# Bytes held per (query, neighbour) cell while a chunk is scored: distances,
# indices, gathered labels, masks and the MAP@R running sums.
_BYTES_PER_CELL = 40
CHUNK_MEMORY_BYTES = 256 << 20
# Upper bound on queries per search call (keeps the progress bar moving).
MAX_CHUNK_ROWS = 16384
# Faiss's GPU flat index handles k <= 2048.
_GPU_MAX_K = 2048


def evaluate_embeddings(query, query_labels, reference=None, reference_labels=None,
                        ks: Iterable[int] = (1, 2, 4, 8), include: Iterable[str] | None = None,
                        gpu: bool | str = "auto", *, details: dict | None = None, search_query=None) -> dict:
    """Metrics of ``query`` embeddings retrieved from ``reference`` embeddings.

    ``reference=None``: the query set is its own reference (every dataset but
    In-Shop) and each query's own row is excluded from its neighbours.
    ``include`` picks metric families from ``METRICS`` (default: all); the
    result has keys ``recall@K`` for each K, ``r_precision``, ``map@r``,
    ``nmi``, ``ami``. ``gpu``: "auto" (use a GPU when faiss sees one), True or
    False. ``details``, when a dict, receives counts and timings (and, when it holds
    ``per_query=True``, each query's R@1 hit and AP@R under ``per_query``).
    ``search_query``: vectors searched in place of ``query`` row for row (e.g. re-ranked by query
    expansion, dcml.retrieval.rerank); labels, the reference and the own-row exclusion stay ``query``'s.
    """
    include = check_include(include)
    ks = check_ks(ks)
    query, query_labels = _as_matrix(query, "query"), np.asarray(query_labels).reshape(-1)
    if len(query) != len(query_labels):
        raise DcmlError(f"query: {len(query)} embeddings but {len(query_labels)} labels; pass one label per row")
    if len(query) == 0:
        raise DcmlError("query: no embeddings to evaluate; check the split you selected")
    ref_includes_query = reference is None
    if ref_includes_query:
        if reference_labels is not None:
            raise DcmlError("reference_labels given without reference embeddings; pass both or neither")
        reference, reference_labels = query, query_labels
    else:
        reference = _as_matrix(reference, "reference")
        reference_labels = np.asarray(reference_labels).reshape(-1)
        if len(reference) != len(reference_labels):
            raise DcmlError(f"reference: {len(reference)} embeddings but {len(reference_labels)} labels; pass one label per row")
        if len(reference) == 0:
            raise DcmlError("reference: no embeddings to search; check the gallery split")
        if reference.shape[1] != query.shape[1]:
            raise DcmlError(f"reference: dimension {reference.shape[1]} differs from the query's {query.shape[1]}; "
                            "embed both with the same model")

    query_codes, reference_codes, num_labels = _label_codes(query_labels, reference_labels, ref_includes_query)
    if num_labels < 2:
        raise DcmlError("labels: every row has the same label; retrieval metrics need at least two classes")

    info = details if details is not None else {}
    info.update(num_queries=len(query), num_reference=len(reference), ref_includes_query=ref_includes_query,
                num_classes=int(num_labels))
    metrics: dict[str, float] = {}

    if any(m in include for m in RETRIEVAL_METRICS):
        searched = query if search_query is None else _as_matrix(search_query, "search_query")
        if searched.shape != query.shape:
            raise DcmlError(f"search_query: shape {searched.shape} differs from the query's {query.shape}; one row per query")
        metrics.update(_retrieval_metrics(searched, query_codes, reference, reference_codes, ref_includes_query,
                                          ks, include, gpu, info))
    if any(m in include for m in CLUSTERING_METRICS):
        t0, c0 = time.perf_counter(), time.process_time()
        clusters = pml_kmeans_assignments(query, len(np.unique(query_codes)), gpu=gpu)
        info.update(seconds_kmeans=time.perf_counter() - t0, cpu_seconds_kmeans=time.process_time() - c0)
        t0 = time.perf_counter()
        if "nmi" in include:
            from sklearn.metrics import normalized_mutual_info_score

            metrics["nmi"] = float(normalized_mutual_info_score(query_codes, clusters))
        if "ami" in include:
            metrics["ami"] = adjusted_mutual_info(query_codes, clusters)
        info["seconds_nmi_ami"] = time.perf_counter() - t0
    return metrics


def _retrieval_metrics(query, query_codes, reference, reference_codes, ref_includes_query, ks, include, gpu,
                       info) -> dict:
    self_count = int(ref_includes_query)
    label_counts = np.bincount(reference_codes, minlength=max(query_codes.max(), reference_codes.max()) + 1)
    # R: same-label references of each query, not counting itself.
    r_per_query = label_counts[query_codes] - self_count
    scored = r_per_query > 0
    num_scored = int(scored.sum())
    info.update(num_scored_queries=num_scored, num_lone_queries=int(len(query) - num_scored))
    if num_scored == 0:
        raise DcmlError("labels: no query has another item of its class in the reference; "
                        "each class needs at least two images (or a gallery image per query class)")
    # PML's k="max_bin_count": the largest class among the query labels; more when a larger K is asked for.
    max_bin_count = int(label_counts[np.unique(query_codes)].max())
    k = max(max_bin_count - self_count, max(ks))
    k = min(k, len(reference) - self_count)
    info["k"] = k

    first_hit = np.empty(len(query), dtype=np.int64)  # rank of the first same-label neighbour (k: none)
    r_precision = np.empty(len(query), dtype=np.float64)
    average_precision = np.empty(len(query), dtype=np.float64)
    t0, c0 = time.perf_counter(), time.process_time()
    # (with ref_includes_query, ``reference`` holds the query rows as given, ``query`` may be their expansion)
    for start, indices in iter_nearest_neighbors(query, k, reference, gpu=gpu, reference_is_query=ref_includes_query):
        stop = start + len(indices)
        same = reference_codes[indices] == query_codes[start:stop, None]
        any_hit = same.any(axis=1)
        first_hit[start:stop] = np.where(any_hit, same.argmax(axis=1), k)
        r = r_per_query[start:stop]
        cols = min(k, int(r.max())) if len(r) else 0
        if cols == 0:
            r_precision[start:stop] = 0.0
            average_precision[start:stop] = 0.0
            continue
        # Same-label hits among the first R neighbours.
        hits = same[:, :cols] & (np.arange(cols) < r[:, None])
        hit_count = np.cumsum(hits, axis=1, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            r_precision[start:stop] = hit_count[:, -1] / r
            precision_at_hits = np.where(hits, hit_count / np.arange(1, cols + 1, dtype=np.float64), 0.0)
            average_precision[start:stop] = precision_at_hits.sum(axis=1) / r
    info.update(seconds_knn=time.perf_counter() - t0, cpu_seconds_knn=time.process_time() - c0)
    # Asked for with details={"per_query": True}: each scored query's own R@1 hit and AP@R (the means
    # below are their averages), for statistics over queries (dcml.algorithm.choice).
    if info.get("per_query") is True:
        info["per_query"] = {"scored": scored, "recall@1": (first_hit < 1).astype(np.float64),
                             "map@r": average_precision.copy()}

    out = {}
    if "recall" in include:
        for kk in ks:
            out[f"recall@{kk}"] = float(np.mean(first_hit[scored] < kk))
    if "r_precision" in include:
        out["r_precision"] = float(np.mean(r_precision[scored]))
    if "map@r" in include:
        out["map@r"] = float(np.mean(average_precision[scored]))
    return out


def iter_nearest_neighbors(query, k: int, reference=None, gpu: bool | str = "auto",
                           reference_is_query: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, indices[rows, k])``: the k nearest references (L2) of
    successive chunks of queries, nearest first.

    ``reference=None`` searches the query set itself and drops each query's own
    index (by index, so exact duplicates are handled as PML does);
    ``reference_is_query``: ``reference`` holds the query rows (row i is query i's
    own, e.g. before query expansion): own rows are dropped the same way.
    Chunks are multiples of faiss's BLAS query block, and the last chunk takes
    the remainder, so the distances are bit-identical to one big search.
    """
    query = _as_matrix(query, "query")
    exclude_self = reference is None or reference_is_query
    reference = query if reference is None else _as_matrix(reference, "reference")
    search_k = k + int(exclude_self)
    if search_k > len(reference):
        raise DcmlError(f"cannot return {k} neighbours from {len(reference) - int(exclude_self)} references; lower k")
    index = faiss.IndexFlatL2(query.shape[1])
    index.add(reference)
    if _use_gpu(gpu) and search_k <= _GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)

    pieces = _chunks(len(query), search_k)
    with tqdm(total=len(query), desc=f"kNN search (k={k})", unit="query", disable=None if len(pieces) > 1 else True,
              leave=False) as progress:
        for start, stop in pieces:
            _, found = index.search(query[start:stop], search_k)
            if exclude_self:
                found = _drop_self(found, start)
            yield start, found
            progress.update(stop - start)


def _chunks(n: int, search_k: int) -> list[tuple[int, int]]:
    block = int(getattr(faiss.cvar, "distance_compute_blas_query_bs", 4096)) or 4096
    rows = CHUNK_MEMORY_BYTES // max(1, search_k * _BYTES_PER_CELL)
    rows = max(block, min(MAX_CHUNK_ROWS, rows) // block * block)
    starts = list(range(0, n, rows))
    # A short tail joins the previous chunk: faiss computes small searches
    # differently (another code path, other rounding), a tie could then flip.
    if len(starts) > 1 and n - starts[-1] < block:
        starts.pop()
    bounds = starts + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def _drop_self(found: np.ndarray, start: int) -> np.ndarray:
    """Remove each row's own index; rows without it lose their last column (PML)."""
    is_self = found == np.arange(start, start + len(found))[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # A row holds its own index at most once, so exactly one column goes per row.
    return found[~is_self].reshape(len(found), found.shape[1] - 1)


def pml_kmeans_assignments(x: np.ndarray, num_clusters: int, gpu: bool | str = "auto") -> np.ndarray:
    """Cluster of each row from the exact k-means PML's AccuracyCalculator runs for NMI/AMI.

    Unlike ``dcml.algorithm.clustering.kmeans`` (all points, 100 iterations), this keeps
    PML's choices (20 iterations, faiss's seed and its subsampling to 256
    points per centroid) so the numbers are comparable with published ones.
    """
    x = _as_matrix(x, "query")
    # min_points_per_centroid only silences faiss's "too few points" warning.
    km = faiss.Kmeans(x.shape[1], int(num_clusters), niter=PML_KMEANS_NITER, gpu=_use_gpu(gpu),
                      min_points_per_centroid=1)
    km.train(x)
    _, assignments = km.index.search(x, 1)
    return assignments[:, 0].astype(np.int64)


def adjusted_mutual_info(labels_true, labels_pred) -> float:
    """scikit-learn's ``adjusted_mutual_info_score`` (arithmetic mean), fast for many classes."""
    from sklearn.metrics import mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    _, true_codes = np.unique(np.asarray(labels_true), return_inverse=True)
    _, pred_codes = np.unique(np.asarray(labels_pred), return_inverse=True)
    n = len(true_codes)
    class_sizes, cluster_sizes = np.bincount(true_codes), np.bincount(pred_codes)
    if len(class_sizes) == len(cluster_sizes) == 1 or n == 0:
        return 1.0
    if len(class_sizes) == 1 or len(cluster_sizes) == 1:
        return 0.0
    contingency = contingency_matrix(true_codes, pred_codes, sparse=True)
    mi = mutual_info_score(None, None, contingency=contingency)
    emi = expected_mutual_info(class_sizes, cluster_sizes, n)
    normalizer = np.mean([_entropy(class_sizes), _entropy(cluster_sizes)])
    # sklearn's guard against 0/0 and sign flips from rounding.
    eps = np.finfo("float64").eps
    denominator = normalizer - emi
    denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
    numerator = mi - emi
    numerator = min(numerator, -eps) if numerator < 0 else max(numerator, eps)
    return float(numerator / denominator)


def expected_mutual_info(class_sizes, cluster_sizes, n: int) -> float:
    """E[MI] of two random labellings with these marginals (Vinh et al. 2010).

    The sum over (class, cluster) pairs depends only on the two sizes, so it
    runs over distinct size pairs weighted by how often each occurs.
    """
    class_sizes = np.asarray(class_sizes, dtype=np.int64)
    cluster_sizes = np.asarray(cluster_sizes, dtype=np.int64)
    if class_sizes.size == 1 or cluster_sizes.size == 1:
        return 0.0
    a_values, a_counts = np.unique(class_sizes, return_counts=True)
    b_values, b_counts = np.unique(cluster_sizes, return_counts=True)
    b_float = b_values.astype(np.float64)
    log_n, gln_n1 = np.log(n), gammaln(n + 1)
    emi = 0.0
    for a, a_count in zip(a_values.tolist(), a_counts.tolist()):
        lo = np.maximum(1, a - n + b_values)
        hi = np.minimum(a, b_values)  # inclusive
        lengths = np.maximum(hi - lo + 1, 0)
        total = int(lengths.sum())
        if total == 0:
            continue
        which = np.repeat(np.arange(len(b_values)), lengths)
        offsets = np.cumsum(lengths) - lengths
        nij = (np.arange(total) - np.repeat(offsets, lengths) + np.repeat(lo, lengths)).astype(np.float64)
        b = b_float[which]
        term1 = nij / n
        term2 = (log_n + np.log(nij)) - np.log(a) - np.log(b)
        gln = (gammaln(a + 1) + gammaln(b + 1) + gammaln(n - a + 1) + gammaln(n - b + 1)
               - (gammaln(nij + 1) + gln_n1) - gammaln(a - nij + 1) - gammaln(b - nij + 1)
               - gammaln(n - a - b + nij + 1))
        emi += a_count * float(np.sum(b_counts[which] * (term1 * term2 * np.exp(gln))))
    return emi


def _entropy(sizes: np.ndarray) -> float:
    sizes = np.asarray(sizes, dtype=np.float64)
    sizes = sizes[sizes > 0]
    if sizes.size <= 1:
        return 0.0
    total = sizes.sum()
    return float(-np.sum((sizes / total) * (np.log(sizes) - np.log(total))))


def _label_codes(query_labels, reference_labels, ref_includes_query):
    """Integer codes 0..L-1 shared by query and reference labels (any label type)."""
    if ref_includes_query:
        _, codes = np.unique(query_labels, return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
        return codes, codes, int(codes.max()) + 1
    both = np.concatenate([np.asarray(query_labels), np.asarray(reference_labels)])
    _, codes = np.unique(both, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    return codes[:len(query_labels)], codes[len(query_labels):], int(codes.max()) + 1


def _as_matrix(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DcmlError(f"{name}: embeddings have shape {x.shape}; expected a matrix [rows, dim]")
    if x.size and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise DcmlError(f"{name}: {bad} embedding(s) contain NaN or inf; recompute them (a diverged model?)")
    return x


def check_ks(ks) -> list[int]:
    if isinstance(ks, (int, np.integer)):
        ks = [ks]
    try:
        values = sorted({int(k) for k in ks})
    except (TypeError, ValueError):
        raise DcmlError(f"ks: {ks!r} is not a list of integers; pass e.g. 1,2,4,8") from None
    if not values or values[0] < 1:
        raise DcmlError(f"ks: {list(ks)!r}; every K must be a positive integer")
    return values


def check_include(include) -> tuple[str, ...]:
    if include is None:
        return METRICS
    if isinstance(include, str):
        include = [include]
    include = tuple(include)
    unknown = sorted(set(include) - set(METRICS))
    if unknown or not include:
        raise DcmlError(f"include: unknown metric(s) {unknown or '(none)'}; choose from {', '.join(METRICS)}")
    return include


def _use_gpu(gpu) -> bool:
    from dcml.algorithm.clustering import use_gpu

    return use_gpu(gpu)
