"""Re-ranking by query expansion: α-query expansion (αQE) and database-side augmentation (DBA).

αQE (Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human
annotation", 2018): a query's ``n`` nearest gallery vectors, weighted by their
cosine similarity to the power ``alpha``, are added to it; the normalised sum is
searched again. DBA applies the same to every gallery vector against the rest of
the gallery (done once, offline). Both work on L2-normalised vectors and inner
products, as the gallery index does. Cost per query: a second search plus ``n``
stored vectors read back (bench/bench_rerank.py measures it and the gain).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from dcml.contracts.errors import DcmlError

METHODS = ("none", "aqe")
N = 2  # neighbours added to a query (bench_rerank: see BENCHMARKS.md, "Re-ranking")
ALPHA = 3.0  # weight = similarity ** alpha
DEFAULT = "none"  # off unless it wins on both benchmark data sets (bench_rerank; BENCHMARKS.md)
HELP = (f"Re-rank by α-query expansion: none, aqe (n={N} neighbours, alpha={ALPHA:g}), aqe:N or aqe:N:ALPHA "
        "(the query plus its N nearest gallery vectors weighted by similarity**ALPHA, searched again; "
        "2 to 3 times the search time; measured in BENCHMARKS.md, Re-ranking).")


@dataclass(frozen=True)
class QueryExpansion:
    """αQE with ``n`` neighbours weighted by similarity ** ``alpha``."""

    n: int = N
    alpha: float = ALPHA

    def __post_init__(self):
        if int(self.n) < 1 or not np.isfinite(self.alpha) or self.alpha < 0:
            raise DcmlError(f"re-rank: n={self.n}, alpha={self.alpha}; choose n >= 1 and alpha >= 0 (e.g. aqe:{N}:{ALPHA:g})")

    @classmethod
    def parse(cls, text: str | None, option: str = "--rerank") -> "QueryExpansion | None":
        """``none`` (or empty) -> None; ``aqe``, ``aqe:N`` or ``aqe:N:ALPHA`` -> a QueryExpansion."""
        text = (text or "none").strip().lower()
        name, _, rest = text.partition(":")
        if name == "none" and not rest:
            return None
        fields = rest.split(":") if rest else []
        if name != "aqe" or len(fields) > 2:
            raise DcmlError(f"{option} {text!r}: use none, aqe, aqe:N or aqe:N:ALPHA (e.g. aqe:{N}:{ALPHA:g})")
        try:
            n = int(fields[0]) if fields else N
            alpha = float(fields[1]) if len(fields) > 1 else ALPHA
        except ValueError:
            raise DcmlError(f"{option} {text!r}: N must be an integer and ALPHA a number (e.g. aqe:{N}:{ALPHA:g})") from None
        return cls(n, alpha)

    def describe(self) -> str:
        return f"aqe:{self.n}:{self.alpha:g}"

    def combine(self, queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """normalise(q + sum_i max(s_i, 0) ** alpha * x_i); ``neighbours`` [q, n, d], ``scores`` [q, n]
        (a missing neighbour: score -inf or NaN, weight 0)."""
        weights = np.where(np.isfinite(scores), np.clip(scores, 0.0, None), 0.0) ** float(self.alpha)
        out = np.asarray(queries, dtype=np.float32) + np.einsum("qn,qnd->qd", weights.astype(np.float32),
                                                                 np.asarray(neighbours, dtype=np.float32))
        out = np.ascontiguousarray(out, dtype=np.float32)
        faiss.normalize_L2(out)
        return out

    def expand_in_set(self, vectors: np.ndarray, reference: np.ndarray | None = None, *,
                      same_rows: bool = False) -> np.ndarray:
        """Expanded ``vectors`` from their ``n`` nearest rows of ``reference`` (exact inner product);
        ``reference=None``: the set itself, each row's own left out (evaluation; DBA); ``same_rows``:
        row i of ``reference`` is row i's own (e.g. augmented by DBA), also left out."""
        vectors = _unit(vectors)
        own = reference is None or same_rows
        reference = vectors if reference is None else _unit(reference)
        n = min(int(self.n), len(reference) - int(own))
        if n < 1:
            return vectors
        scores, ids = faiss.knn(vectors, reference, n + int(own), metric=faiss.METRIC_INNER_PRODUCT)
        scores, ids = np.asarray(scores), np.asarray(ids)
        if own:
            scores, ids = _drop_own(scores, ids)
        return self.combine(vectors, reference[ids], scores)

    def expand_with_index(self, index: faiss.Index, queries: np.ndarray) -> np.ndarray:
        """Expanded ``queries`` from their ``n`` nearest vectors in a gallery ``index`` (its own search
        and the vectors it stores)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = min(int(self.n), int(index.ntotal))
        if n < 1 or len(queries) == 0:
            return queries
        scores, ids = index.search(queries, n)
        scores, ids = np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        scores = np.where(ids >= 0, scores, np.nan)  # an approximate index may find fewer than n
        return self.combine(queries, stored(index, np.where(ids >= 0, ids, ids.max(initial=0))), scores)


def augment_database(vectors: np.ndarray, n: int = N, alpha: float = ALPHA) -> np.ndarray:
    """DBA: every vector expanded from its ``n`` nearest others (the gallery side of αQE)."""
    return QueryExpansion(n, alpha).expand_in_set(vectors)


def stored(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The vectors an index stores under ``ids`` (any shape), shaped ids.shape + (d,).

    Flat, HNSW and id-mapped indexes reconstruct directly; an IVF index first gets
    a hash-table direct map (once; its ids are arbitrary); a compressed one hands back
    its exact vectors (ids are held in ascending order: found by bisection).
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    if type(index) is faiss.IndexIDMap:  # a compressed index: ids held in ascending order, its exact vectors by position
        held = faiss.vector_to_array(index.id_map)
        rows = faiss.downcast_index(index.index).reconstruct_batch(np.searchsorted(held, flat).clip(0, len(held) - 1))
        return np.asarray(rows, dtype=np.float32).reshape(*ids.shape, int(index.d))
    try:
        rows = index.reconstruct_batch(flat)
    except RuntimeError:
        base = faiss.extract_index_ivf(index) if _is_ivf(index) else None
        if base is None:
            raise DcmlError(f"this {type(index).__name__} index cannot hand back its vectors; "
                            "re-ranking needs a flat, HNSW or IVF index (rebuild it with `dcml index`)") from None
        base.set_direct_map_type(faiss.DirectMap.Hashtable)
        rows = index.reconstruct_batch(flat)
    return np.asarray(rows, dtype=np.float32).reshape(*ids.shape, int(index.d))


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def _drop_own(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (rows without it lose their last column)."""
    is_own = ids == np.arange(len(ids))[:, None]
    is_own[~is_own.any(axis=1), -1] = True
    keep = ~is_own
    return scores[keep].reshape(len(ids), -1), ids[keep].reshape(len(ids), -1)
