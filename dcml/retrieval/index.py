"""Gallery indexes: faiss over L2-normalised embeddings, and the index folder format.

Vectors are L2-normalised before they enter the index, so the inner product
is the cosine similarity (the ``score`` of a hit, in [-1, 1]). dcml's
embeddings all have the same norm (sqrt of the number of slices), so this
ranks neighbours exactly as evaluation's L2 search does.

Index types (``choose_type``):

* ``flat``: exact inner product (``IndexFlatIP``); the default below
  :data:`AUTO_APPROXIMATE_FROM` vectors;
* ``ivf``: ``IndexIVFFlat`` with about sqrt(n) lists, trained on a sample of
  :data:`IVF_TRAIN_PER_LIST` vectors per list; ``auto`` picks it from
  :data:`AUTO_APPROXIMATE_FROM` vectors on;
* ``hnsw``: ``IndexHNSWFlat`` (M = :data:`HNSW_M`);
* ``ivfpq``: the compressed index: IVF lists as above holding
  product-quantised residuals of :data:`PQ_BYTES` bytes a vector
  (``IndexIVFPQ``) find a short list of :data:`REFINE_FACTOR` x k candidates,
  re-ranked by their exact inner products (``IndexRefineFlat``). The exact
  vectors sit in the same ``index.faiss`` file, which an opened index maps
  from disk (``IO_FLAG_MMAP_IFC``) instead of reading it: the codes, lists
  and ids are 1/10 of ``flat``'s bytes at 128-d, and a search reads its
  lists and its short list's exact vectors (pages the kernel caches, and
  drops when memory is short).

An approximate index is calibrated when built (:func:`calibrate`): its search
knob (IVF ``nprobe``, HNSW ``efSearch``) doubles until recall@10 against the
exact search reaches :data:`TARGET_RECALL` on up to :data:`RECALL_QUERIES`
gallery vectors used as queries (each query's own row left out of both
lists); the knob and the recall reached are stored with the index. Appending
vectors (:func:`append`) adds them to the trained structure and measures the
recall again.

Every vector has a stable id (an ``int64`` the index returns): an exact or
HNSW index sits in a ``faiss.IndexIDMap2``, an IVF index stores the ids in
its lists, a compressed one sits in a ``faiss.IndexIDMap`` (ids in
ascending order; no hash table in memory). Ids are given in order (0, 1,
...) and never reused: removing items (:func:`remove`; faiss
``remove_ids``, HNSW and compressed indexes re-filled without them) leaves
the other ids as they were, and appended vectors continue after the largest
id ever given (``next_id`` in ``index.json``).

An index folder (:class:`GalleryIndex`) holds ``index.faiss``,
``items.parquet`` (faiss id -> image_id, path, image_bytes, label,
class_name, split), ``model.pt`` (the model that embedded the gallery:
queries go through it and its preprocessing) and ``index.json`` (format,
type, knobs, recall, dimension, the match threshold, lineage and the stage
record), and, when a match threshold was chosen, ``validation.parquet`` (the
labelled embeddings it was chosen on: ``dcml threshold`` chooses again from
them). Folders of the first format (``dcml.index/1``, ids 0..n-1 in faiss's
order) open as well and are written in the current one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa

from dcml.contracts.errors import DcmlError
from dcml.contracts.io import atomic_dir, read_vectors, write_json, write_parquet, write_vectors
from dcml.contracts.params import INDEX_TYPES, PARAMS
from dcml.retrieval import index_lock

FORMAT = "dcml.index/2"
FORMATS = ("dcml.index/1", FORMAT)  # what opens
INDEX_FILE, ITEMS_FILE, MODEL_FILE, META_FILE = "index.faiss", "items.parquet", "model.pt", "index.json"
VALIDATION_FILE = "validation.parquet"  # the labelled embeddings the match threshold was chosen on (optional)
AUTO_APPROXIMATE_FROM = 100_000
RECALL_K = 10
RECALL_QUERIES = 1000
TARGET_RECALL = PARAMS["index_target_recall"].default
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
IVF_TRAIN_PER_LIST = 64
PQ_BYTES = 32  # compressed index: bytes of code per vector (sub-quantisers of 8 bits)
REFINE_FACTOR = 10  # compressed index: exact re-ranking of k x this many candidates
PQ_MIN_VECTORS = 39 * 16  # the fewest a compressed index trains on (16 centroids per sub-quantiser)
ITEM_COLUMNS = ("id", "image_id", "path", "image_bytes", "label", "class_name", "split")
ITEMS_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.string()), ("path", pa.string()),
                          ("image_bytes", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()),
                          ("split", pa.string())])
# The search knob of each approximate type: (name, first value, largest value for n vectors / nlist).
_KNOBS = {"ivf": ("nprobe", 8), "ivfpq": ("nprobe", 8), "hnsw": ("efSearch", 16)}
MAPPED_TYPES = ("ivfpq",)  # opened with its exact vectors mapped from disk, not read into memory


def choose_type(index_type: str, n: int, target_recall: float = TARGET_RECALL) -> str:
    """The concrete type for ``index_type`` (``auto``: :func:`auto_choice`)."""
    if index_type not in INDEX_TYPES:
        raise DcmlError(f"--index-type {index_type!r}: unknown; use one of {', '.join(INDEX_TYPES)}")
    if index_type == "auto":
        return auto_choice(n, target_recall)[0]
    if index_type == "ivfpq" and n < PQ_MIN_VECTORS:
        raise DcmlError(f"--index-type ivfpq: {n} vectors are too few to train its codebooks (it needs "
                        f"{PQ_MIN_VECTORS}); use --index-type flat (exact) for a gallery this small")
    return index_type


def auto_choice(n: int, target_recall: float = TARGET_RECALL) -> tuple[str, str]:
    """(type, why) that ``auto`` picks for n vectors and a recall@10 target (bench_retrieval's measurements:
    exact search is fast enough below AUTO_APPROXIMATE_FROM vectors; above, IVF reaches the usual targets at a
    fraction of the cost, while a target of 1 needs exact search)."""
    if target_recall >= 1.0:
        return "flat", f"recall target {target_recall:g} needs exact search"
    if n < AUTO_APPROXIMATE_FROM:
        return "flat", f"under {AUTO_APPROXIMATE_FROM:,} images exact search is fast enough"
    return "ivf", (f"{AUTO_APPROXIMATE_FROM:,} images or more: IVF, its nprobe raised until recall@10 reaches "
                   f"{target_recall:g}")


def gallery_splits(split: str, present: set[str], source: str) -> list[str]:
    """The splits to index: ``auto`` = gallery, else test; or comma-separated names; ``all`` = every split."""
    if split == "auto":
        for name in ("gallery", "test"):
            if name in present:
                return [name]
        raise DcmlError(f"{source}: no 'gallery' or 'test' split (has {', '.join(sorted(present))}); "
                        "pass --split NAME or --split all")
    if split == "all":
        return sorted(present)
    names = [part.strip() for part in split.split(",") if part.strip()]
    missing = [name for name in names if name not in present]
    if not names or missing:
        raise DcmlError(f"{source}: no rows in split(s) {', '.join(missing) or repr(split)} "
                        f"(has {', '.join(sorted(present))}); pick existing splits or --split all")
    return names


def normalized(vectors, source: str = "embeddings") -> np.ndarray:
    """float32 C-contiguous rows of unit L2 norm; zero, NaN or inf rows are a DcmlError."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2 or x.shape[1] == 0:
        raise DcmlError(f"{source}: expected a matrix [images, dim], got shape {x.shape}; embed the images first")
    norms = np.linalg.norm(x, axis=1)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise DcmlError(f"{source}: some embeddings are zero, NaN or inf; the model is broken, re-train or re-embed")
    faiss.normalize_L2(x)
    return x


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: about sqrt(n), at least 39 training vectors each (faiss's minimum)."""
    return max(1, min(int(round(math.sqrt(n))), n // 39))


def build(vectors: np.ndarray, index_type: str = "auto", seed: int = 0,
          target_recall: float = TARGET_RECALL, ids: np.ndarray | None = None) -> tuple[faiss.Index, dict]:
    """(index over ``vectors`` with ``ids`` (default 0..n-1), info) where info holds type, parameters,
    build seconds and recall@10.

    ``vectors`` must be normalised (:func:`normalized`).
    """
    n, d = vectors.shape
    if n == 0:
        raise DcmlError("index: no gallery images to index; pick a split that has images")
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    kind = choose_type(index_type, n, target_recall)
    t0 = time.perf_counter()
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "ivfpq":
        index, params = _ivfpq(vectors, seed)
    elif kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
        index.train(vectors[sample])
        params.update(nlist=nlist, train_vectors=len(sample))
    else:
        index = faiss.IndexIDMap2(_hnsw(d))
        params.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION)
    index.add_with_ids(vectors, ids)
    build_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    info = {"type": kind, "params": params, "build_seconds": round(build_seconds, 3)}
    if index_type == "auto":
        info["picked"] = auto_choice(n, target_recall)[1]
    info.update(calibrate(index, vectors, target_recall, seed, ids))
    info["calibration_seconds"] = round(time.perf_counter() - t1, 3)
    return index, info


def _ivfpq(vectors: np.ndarray, seed: int) -> tuple[faiss.Index, dict]:
    """A trained, empty compressed index for ``vectors`` (see the module's docstring) and its parameters."""
    n, d = vectors.shape
    nlist = ivf_lists(n)
    m = max(m for m in range(1, min(PQ_BYTES, d) + 1) if d % m == 0)  # sub-quantisers: a divisor of d
    nbits = int(min(8, math.log2(n // 39)))  # 8-bit codes from 9,984 training vectors on; fewer below
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    refine = faiss.IndexRefineFlat(ivf)
    refine.k_factor = REFINE_FACTOR
    index = faiss.IndexIDMap(refine)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max(IVF_TRAIN_PER_LIST * nlist, 39 * 2 ** nbits)), replace=False))
    index.train(vectors[sample])
    return index, {"nlist": nlist, "pq_m": m, "pq_nbits": nbits, "refine_factor": REFINE_FACTOR,
                   "train_vectors": len(sample)}


def _hnsw(d: int) -> faiss.Index:
    index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def base_of(index: faiss.Index) -> faiss.Index:
    """The index under an id map (or the index itself)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def kind_of(index: faiss.Index) -> str:
    base = base_of(index)
    if isinstance(base, faiss.IndexRefine):
        return "ivfpq"
    if isinstance(base, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(base, faiss.IndexIVF):
        return "ivf"
    return "flat"


def set_knob(index: faiss.Index, value: int) -> None:
    """Set the search knob of an approximate index (IVF nprobe, HNSW efSearch)."""
    base = base_of(index)
    if kind_of(base) == "ivfpq":
        faiss.extract_index_ivf(base).nprobe = int(value)
    elif kind_of(base) == "ivf":
        base.nprobe = int(value)
    elif kind_of(base) == "hnsw":
        base.hnsw.efSearch = int(value)


def contents(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], vectors float32 [n, d]) of everything an index holds.

    Always numpy arrays: once ``faiss.contrib.torch_utils`` is imported (by
    pytorch-metric-learning, for one) faiss may hand back torch tensors.
    """
    n, d = int(index.ntotal), int(index.d)
    if isinstance(index, faiss.IndexIDMap):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vectors = np.asarray(base_of(index).reconstruct_n(0, n), dtype=np.float32) if n else np.empty((0, d), np.float32)
        return ids, vectors.reshape(n, d)
    if kind_of(index) == "ivf":  # ids live in the inverted lists; IVFFlat codes are the raw float32 vectors
        from faiss.contrib.inspect_tools import get_invlist

        parts = [get_invlist(index.invlists, lst) for lst in range(index.nlist)]
        ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in parts]) if parts else np.empty(0, np.int64)
        codes = [np.asarray(c).view(np.float32).reshape(-1, d) for _, c in parts]
        vectors = np.concatenate(codes) if codes else np.empty((0, d), np.float32)
        order = np.argsort(ids, kind="stable")
        return ids[order], np.ascontiguousarray(vectors[order])
    # A plain index of the first format: ids are positions.
    return np.arange(n, dtype=np.int64), np.asarray(index.reconstruct_n(0, n), dtype=np.float32).reshape(n, d)


def with_ids(index: faiss.Index) -> faiss.Index:
    """An index of the first format (positions as ids) in the current one (an id map; IVF as it is)."""
    if isinstance(index, faiss.IndexIDMap) or kind_of(index) == "ivf":
        return index
    ids, vectors = contents(index)
    fresh = faiss.IndexIDMap2(_hnsw(index.d) if kind_of(index) == "hnsw" else faiss.IndexFlatIP(index.d))
    if kind_of(index) == "hnsw":
        set_knob(fresh, index.hnsw.efSearch)
    fresh.add_with_ids(vectors, ids)
    return fresh


def remove(index: faiss.Index, ids) -> tuple[faiss.Index, int]:
    """(the index without ``ids``, how many were removed); the other ids stay as they were.

    Exact and IVF indexes remove in place (faiss ``remove_ids``); an HNSW graph
    cannot drop nodes, so it is rebuilt from the remaining vectors (same
    parameters, same search knob); a compressed index is emptied and re-filled
    with them (its training kept).
    """
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    kind = kind_of(index)
    if kind not in ("hnsw", "ivfpq"):
        return index, int(index.remove_ids(ids))
    held, vectors = contents(index)
    keep = ~np.isin(held, ids)
    if kind == "hnsw":
        fresh = faiss.IndexIDMap2(_hnsw(index.d))
        set_knob(fresh, base_of(index).hnsw.efSearch)
    else:  # the trained structure (lists, codebooks) re-filled with the vectors that stay
        fresh = faiss.clone_index(index)
        fresh.reset()
    fresh.add_with_ids(vectors[keep], held[keep])
    return fresh, int((~keep).sum())


def exact_neighbours(vectors: np.ndarray, rows: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """Positions [len(rows), k] of the exact top-k of ``vectors[rows]`` among ``vectors``, each row's own left out."""
    _, ids = faiss.knn(vectors[rows], vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _without_own(np.asarray(ids), rows)


def recall_at_k(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray,
                ids: np.ndarray | None = None) -> float:
    """Share of the exact top-k (``truth``, ids) that ``index`` returns for the queries ``vectors[rows]``
    (``ids``: the id of each row of ``vectors``; default its position)."""
    k = truth.shape[1]
    own = rows if ids is None else ids[rows]
    _, found = index.search(vectors[rows], k + 1)
    found = _without_own(np.asarray(found), own)
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).sum() / truth.size)


def _without_own(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Drop each row's own id (or its last column when the own id is not among them)."""
    drop = ids == rows[:, None]  # a row holds its own id at most once
    drop[~drop.any(axis=1), -1] = True
    return ids[~drop].reshape(len(ids), ids.shape[1] - 1)


def calibrate(index: faiss.Index, vectors: np.ndarray, target_recall: float = TARGET_RECALL, seed: int = 0,
              ids: np.ndarray | None = None) -> dict:
    """Set an approximate index's search knob to the smallest power of two whose recall@10 vs exact
    reaches ``target_recall`` (or its largest useful value); return the knob, the recall and the curve.

    An exact index reports recall 1.0 without measuring.
    """
    kind = kind_of(index)
    n = index.ntotal
    if kind == "flat" or n < 2:
        return {"exact": kind == "flat", "recall@10": 1.0}
    k = min(RECALL_K, n - 1)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, RECALL_QUERIES), replace=False)).astype(np.int64)
    truth = exact_neighbours(vectors, rows, k)
    if ids is not None:
        truth = ids[truth]
    name, value = _KNOBS[kind]
    largest = faiss.extract_index_ivf(index).nlist if kind in ("ivf", "ivfpq") else max(value, 2048)
    curve = []
    while True:
        set_knob(index, value)
        recall = recall_at_k(index, vectors, rows, truth, ids)
        curve.append([value, round(recall, 4)])
        if recall >= target_recall or value >= largest:
            break
        value = min(value * 2, largest)
    return {"exact": False, "recall@10": round(recall, 4), name: value, "target_recall": target_recall,
            "recall_queries": len(rows), "recall_k": k, "calibration": curve}


def append(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, target_recall: float = TARGET_RECALL,
           seed: int = 0) -> dict:
    """Add normalised ``vectors`` with ``ids`` without retraining or rebuilding; an approximate index is
    calibrated again over all its vectors. Returns the new calibration."""
    t0 = time.perf_counter()
    index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    seconds = time.perf_counter() - t0
    # An exact index has nothing to calibrate (calibrate does not look at the vectors then).
    if kind_of(index) == "flat":
        return {**calibrate(index, vectors, target_recall, seed), "append_seconds": round(seconds, 3)}
    held, everything = contents(index)
    return {**calibrate(index, everything, target_recall, seed, held), "append_seconds": round(seconds, 3)}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def items_from_manifest(rows: pd.DataFrame, root: Path, first_id: int = 0) -> pd.DataFrame:
    """The items table of manifest ``rows``: ids from ``first_id``, paths made absolute (or the embedded bytes)."""
    def absolute(path):
        return str(Path(root) / path) if isinstance(path, str) and path else None

    blobs = rows["image_bytes"] if "image_bytes" in rows.columns else pd.Series([None] * len(rows))
    return pd.DataFrame({
        "id": np.arange(first_id, first_id + len(rows), dtype=np.int64),
        "image_id": rows["image_id"].astype(str).to_numpy(),
        "path": [absolute(p) for p in rows["path"]],
        "image_bytes": [b if isinstance(b, (bytes, bytearray)) and len(b) else None for b in blobs],
        "label": rows["label"].to_numpy(dtype=np.int64),
        "class_name": rows["class_name"].astype(str).to_numpy(),
        "split": rows["split"].astype(str).to_numpy(),
    })


@dataclass
class GalleryIndex:
    """An index folder, opened: the faiss index, the items table (one row per id) and the metadata.

    ``add`` / ``remove`` change it in memory; ``write`` (below) stores it.
    """

    path: Path
    index: faiss.Index
    items: pd.DataFrame
    meta: dict
    rerank: object = None  # a dcml.retrieval.rerank.QueryExpansion that search applies (None: plain search)
    mapped: bool = False  # the faiss index's exact vectors are mapped from index.faiss (read-only until _own)

    def __post_init__(self):
        self.items = self.items.reset_index(drop=True)
        self._rows = pd.Index(self.items["id"].to_numpy(dtype=np.int64))

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def next_id(self) -> int:
        """The id the next added item gets: ids are never reused, even after a removal."""
        largest = int(self.items["id"].max()) + 1 if len(self.items) else 0
        return max(int(self.meta.get("next_id", 0)), largest)

    @property
    def threshold(self) -> float | None:
        """The score from which a hit is a match (``index.json`` ``verification``), if one was chosen."""
        return (self.meta.get("verification") or {}).get("threshold")

    def has(self, item_id: int) -> bool:
        return int(item_id) in self._rows

    def item(self, item_id: int) -> pd.Series:
        return self.items.iloc[int(self._rows.get_loc(int(item_id)))]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GalleryIndex":
        path = Path(path)
        fix = "build it with `dcml index`"
        if not path.is_dir():
            raise DcmlError(f"{path}: no such index folder; {fix}")
        missing = [name for name in (META_FILE, INDEX_FILE, ITEMS_FILE, MODEL_FILE) if not (path / name).is_file()]
        if missing:
            raise DcmlError(f"{path}: not a dcml index (missing {', '.join(missing)}); {fix}")
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DcmlError(f"{path / META_FILE}: not valid JSON ({exc}); {fix}") from None
        if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DcmlError(f"{path / META_FILE}: format {found!r}, expected {FORMAT!r}; {fix}")
        mapped = meta.get("type") in MAPPED_TYPES
        index = _read_faiss(path / INDEX_FILE, mapped, fix)
        items = pd.read_parquet(path / ITEMS_FILE)
        held, _ = contents(index) if kind_of(index) == "ivf" else (faiss.vector_to_array(index.id_map), None)
        if list(items.columns) != list(ITEM_COLUMNS) or len(items) != index.ntotal \
                or not np.array_equal(np.sort(items["id"].to_numpy()), np.sort(np.asarray(held, dtype=np.int64))):
            raise DcmlError(f"{path}: items.parquet does not match the index ({len(items)} items, "
                            f"{index.ntotal} vectors); {fix}")
        for value in meta.get("search", {}).values():  # the calibrated nprobe / efSearch
            set_knob(index, value)
        return cls(path, index, items, meta, mapped=mapped)

    def _own(self) -> None:
        """Before a change: an index mapped from its file is read into memory (a mapped one cannot grow)."""
        if self.mapped:
            self.index = _read_faiss(self.path / INDEX_FILE, False, "build it again with `dcml index`")
            for value in self.meta.get("search", {}).values():
                set_knob(self.index, value)
            self.mapped = False

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        """Top-k hits per normalised query vector: id, image_id, path, label, class_name, score, match
        (score >= the stored threshold; None when the index has none)."""
        width = np.shape(vectors)[1] if np.ndim(vectors) == 2 else None
        if width != int(self.index.d):
            raise DcmlError(f"{self.path}: the index holds {self.index.d}-d vectors, the queries are "
                            f"{'shaped ' + str(np.shape(vectors)) if width is None else str(width) + '-d'}; "
                            "embed them with the index's model")
        if self.size == 0:
            return [[] for _ in range(len(vectors))]
        k = max(1, min(int(k), self.size))
        if self.rerank is not None:
            vectors = self.rerank.expand_with_index(self.index, vectors)
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        threshold = self.threshold
        out = []
        for row_scores, row_ids in zip(np.asarray(scores), np.asarray(ids)):
            hits = []
            for score, item_id in zip(row_scores, row_ids):
                if item_id < 0:  # an approximate index found fewer than k
                    continue
                item = self.item(item_id)
                hits.append({"id": int(item_id), "image_id": item["image_id"],
                             "path": item["path"] if isinstance(item["path"], str) else None,
                             "label": int(item["label"]), "class_name": item["class_name"],
                             "score": round(float(score), 6),
                             "match": None if threshold is None else bool(score >= threshold)})
            out.append(hits)
        return out

    def add(self, vectors: np.ndarray, items: pd.DataFrame, target_recall: float = TARGET_RECALL,
            seed: int = 0) -> np.ndarray:
        """Add normalised ``vectors`` and their ``items`` rows (ids assigned here); return the new ids."""
        if int(self.index.d) != vectors.shape[1]:
            raise DcmlError(f"{self.path}: the index holds {self.index.d}-d vectors, these are {vectors.shape[1]}-d; "
                            "embed them with the index's model")
        ids = np.arange(self.next_id, self.next_id + len(vectors), dtype=np.int64)
        if len(ids):
            self._own()
            info = append(self.index, vectors, ids, target_recall, seed)
            self.meta["build"] = {**self.meta.get("build", {}), **info}
            self._calibrated(info)
        rows = items.reset_index(drop=True).assign(id=ids)[list(ITEM_COLUMNS)]
        self.items = pd.concat([self.items, rows], ignore_index=True) if len(self.items) else rows
        self.meta["next_id"] = int(ids[-1]) + 1 if len(ids) else self.next_id
        self.__post_init__()
        return ids

    def remove(self, ids) -> int:
        """Remove the items with these ids (unknown ids are a DcmlError); return how many were removed."""
        ids = np.unique(np.asarray(list(ids), dtype=np.int64))
        unknown = [int(i) for i in ids if not self.has(i)]
        if unknown:
            raise DcmlError(f"{self.path}: no item with id {', '.join(map(str, unknown[:5]))} in the index; "
                            "pass ids that `dcml search` returns")
        self.meta["next_id"] = self.next_id
        self._own()
        self.index, removed = remove(self.index, ids)
        self.items = self.items[~self.items["id"].isin(ids)]
        self.__post_init__()
        return removed

    def _calibrated(self, info: dict) -> None:
        self.meta["search"] = {name: info[name] for name in ("nprobe", "efSearch") if name in info}
        self.meta["recall@10"], self.meta["exact"] = info["recall@10"], info["exact"]

    def image_source(self, item_id: int):
        """What to decode for item ``item_id``: its file path or a file object over its embedded bytes."""
        item = self.item(item_id)
        if isinstance(item["path"], str) and item["path"]:
            return item["path"]
        return io.BytesIO(item["image_bytes"])


def stored_vectors(index: faiss.Index) -> np.ndarray:
    """Every vector an index holds, in id order."""
    ids, vectors = contents(index)
    return vectors[np.argsort(ids, kind="stable")]


def read_validation(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(vectors, labels, metadata) of an index folder's :data:`VALIDATION_FILE`, or None when it has none."""
    if not (Path(path) / VALIDATION_FILE).is_file():
        return None
    rows, vectors, meta = read_vectors(Path(path) / VALIDATION_FILE, "embedding")
    return vectors, rows["label"].to_numpy(dtype=np.int64), meta


def write(dest: str | os.PathLike, index: faiss.Index, items: pd.DataFrame, meta: dict, model_file,
          validation: tuple[np.ndarray, np.ndarray, dict] | None = None) -> dict:
    """Write an index folder atomically (a reader sees the old folder or the new one, never a mix; the caller
    holds its write lock, :mod:`dcml.retrieval.index_lock`) and return the metadata written;
    ``validation`` = (vectors, labels, metadata) the match threshold was chosen on (:data:`VALIDATION_FILE`)."""
    table = pa.Table.from_pandas(items[list(ITEM_COLUMNS)], schema=ITEMS_SCHEMA, preserve_index=False)
    next_id = max(int(meta.get("next_id", 0)), int(items["id"].max()) + 1 if len(items) else 0)
    meta = {**meta, "format": FORMAT, "count": int(index.ntotal), "next_id": next_id,
            "write_id": index_lock.new_write_id()}  # tells a writer that opened it earlier to read it again
    with _no_traceback_on_full_disk(dest), atomic_dir(dest) as tmp:
        _write_faiss(index, tmp / INDEX_FILE)
        write_parquet(tmp / ITEMS_FILE, table, {"format": FORMAT})
        shutil.copyfile(model_file, tmp / MODEL_FILE)
        if validation is not None:
            vectors, labels, about = validation
            write_vectors(tmp / VALIDATION_FILE, pd.DataFrame({"label": np.asarray(labels, dtype=np.int64)}),
                          np.asarray(vectors, dtype=np.float32), "embedding", about)
        write_json(tmp / META_FILE, meta)
    return meta


def _read_faiss(path: Path, mapped: bool, fix: str) -> faiss.Index:
    """The faiss index in ``path`` (``mapped``: its flat vectors mapped from the file, not read)."""
    try:
        return with_ids(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0))
    except RuntimeError as exc:
        raise DcmlError(f"{path}: not a readable faiss index ({str(exc).splitlines()[0][:160]}); {fix}") from None


def _write_faiss(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index`` streamed through Python's file object, so a full disk is an OSError (ENOSPC)
    and not faiss's 30-line RuntimeError."""
    with open(path, "wb") as fh:
        faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))


@contextlib.contextmanager
def _no_traceback_on_full_disk(dest: str | os.PathLike):
    """A failed index write (full disk, quota, permissions) as one DcmlError naming the folder and the fix;
    the folder there before (if any) is unchanged (the write is atomic)."""
    from dcml.contracts.io import os_error_line

    existed = Path(dest).is_dir()
    try:
        yield
    except OSError as exc:
        exc.filename = str(dest)
        kept = "the index there is unchanged" if existed else "nothing was written"
        raise DcmlError(f"{os_error_line(exc)} ({kept})") from None
