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
* ``hnsw``: ``IndexHNSWFlat`` (M = :data:`HNSW_M`).

An approximate index is calibrated when built (:func:`calibrate`): its search
knob (IVF ``nprobe``, HNSW ``efSearch``) doubles until recall@10 against the
exact search reaches :data:`TARGET_RECALL` on up to :data:`RECALL_QUERIES`
gallery vectors used as queries (each query's own row left out of both
lists); the knob and the recall reached are stored with the index. Appending
vectors (:func:`append`) adds them to the trained structure and measures the
recall again.

An index folder (:class:`GalleryIndex`) holds ``index.faiss``,
``items.parquet`` (faiss id -> image_id, path, image_bytes, label,
class_name, split; ids are 0..n-1 in faiss's order), ``model.pt`` (the model
that embedded the gallery: queries go through it and its preprocessing) and
``index.json`` (format, type, knobs, recall, dimension, lineage and the stage
record).
"""

from __future__ import annotations

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
from dcml.contracts.io import atomic_dir, write_json, write_parquet
from dcml.contracts.params import INDEX_TYPES, PARAMS

FORMAT = "dcml.index/1"
INDEX_FILE, ITEMS_FILE, MODEL_FILE, META_FILE = "index.faiss", "items.parquet", "model.pt", "index.json"
AUTO_APPROXIMATE_FROM = 100_000
RECALL_K = 10
RECALL_QUERIES = 1000
TARGET_RECALL = PARAMS["index_target_recall"].default
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
IVF_TRAIN_PER_LIST = 64
ITEM_COLUMNS = ("id", "image_id", "path", "image_bytes", "label", "class_name", "split")
ITEMS_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.string()), ("path", pa.string()),
                          ("image_bytes", pa.binary()), ("label", pa.int64()), ("class_name", pa.string()),
                          ("split", pa.string())])
# The search knob of each approximate type: (name, first value, largest value for n vectors / nlist).
_KNOBS = {"ivf": ("nprobe", 8), "hnsw": ("efSearch", 16)}


def choose_type(index_type: str, n: int) -> str:
    """The concrete type for ``index_type`` (``auto``: exact below AUTO_APPROXIMATE_FROM vectors, else IVF)."""
    if index_type not in INDEX_TYPES:
        raise DcmlError(f"--index-type {index_type!r}: unknown; use one of {', '.join(INDEX_TYPES)}")
    if index_type == "auto":
        return "flat" if n < AUTO_APPROXIMATE_FROM else "ivf"
    return index_type


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
          target_recall: float = TARGET_RECALL) -> tuple[faiss.Index, dict]:
    """(index over ``vectors``, info) where info holds type, parameters, build seconds and recall@10.

    ``vectors`` must be normalised (:func:`normalized`).
    """
    n, d = vectors.shape
    if n == 0:
        raise DcmlError("index: no gallery images to index; pick a split that has images")
    kind = choose_type(index_type, n)
    t0 = time.perf_counter()
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
        index.train(vectors[sample])
        params.update(nlist=nlist, train_vectors=len(sample))
    else:
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION)
    index.add(vectors)
    build_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    info = {"type": kind, "params": params, "build_seconds": round(build_seconds, 3)}
    info.update(calibrate(index, vectors, target_recall, seed))
    info["calibration_seconds"] = round(time.perf_counter() - t1, 3)
    return index, info


def kind_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat"


def set_knob(index: faiss.Index, value: int) -> None:
    """Set the search knob of an approximate index (IVF nprobe, HNSW efSearch)."""
    if kind_of(index) == "ivf":
        index.nprobe = int(value)
    elif kind_of(index) == "hnsw":
        index.hnsw.efSearch = int(value)


def exact_neighbours(vectors: np.ndarray, rows: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """ids [len(rows), k] of the exact top-k of ``vectors[rows]`` among ``vectors``, each row's own id left out."""
    _, ids = faiss.knn(vectors[rows], vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return _without_own(ids, rows)


def recall_at_k(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k (``truth``) that ``index`` returns for the queries ``vectors[rows]``."""
    k = truth.shape[1]
    _, ids = index.search(vectors[rows], k + 1)
    found = _without_own(ids, rows)
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).sum() / truth.size)


def _without_own(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Drop each row's own id (or its last column when the own id is not among them)."""
    drop = ids == rows[:, None]  # a row holds its own id at most once
    drop[~drop.any(axis=1), -1] = True
    return ids[~drop].reshape(len(ids), ids.shape[1] - 1)


def calibrate(index: faiss.Index, vectors: np.ndarray, target_recall: float = TARGET_RECALL, seed: int = 0) -> dict:
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
    name, value = _KNOBS[kind]
    largest = index.nlist if kind == "ivf" else max(value, 2048)
    curve = []
    while True:
        set_knob(index, value)
        recall = recall_at_k(index, vectors, rows, truth)
        curve.append([value, round(recall, 4)])
        if recall >= target_recall or value >= largest:
            break
        value = min(value * 2, largest)
    return {"exact": False, "recall@10": round(recall, 4), name: value, "target_recall": target_recall,
            "recall_queries": len(rows), "recall_k": k, "calibration": curve}


def stored_vectors(index: faiss.Index) -> np.ndarray:
    """Every vector an index holds, in id order (an IVF index gets a direct map for it).

    Always a numpy array: once ``faiss.contrib.torch_utils`` is imported (by
    pytorch-metric-learning, for one) faiss may hand back torch tensors.
    """
    if kind_of(index) == "ivf":
        index.make_direct_map()
        try:
            return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
        finally:
            index.make_direct_map(False)
    return np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def append(index: faiss.Index, vectors: np.ndarray, target_recall: float = TARGET_RECALL,
           seed: int = 0) -> dict:
    """Add normalised ``vectors`` (ids continue after the last one) without retraining or rebuilding;
    an approximate index is calibrated again over all its vectors. Returns the new calibration."""
    t0 = time.perf_counter()
    index.add(vectors)
    seconds = time.perf_counter() - t0
    # An exact index has nothing to calibrate (calibrate does not look at the vectors then).
    everything = vectors if kind_of(index) == "flat" else stored_vectors(index)
    return {**calibrate(index, everything, target_recall, seed), "append_seconds": round(seconds, 3)}


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
    """An index folder, opened: the faiss index, the items table and the metadata."""

    path: Path
    index: faiss.Index
    items: pd.DataFrame
    meta: dict

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

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
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DcmlError(f"{path / META_FILE}: format {found!r}, expected {FORMAT!r}; {fix}")
        try:
            index = faiss.read_index(str(path / INDEX_FILE))
        except RuntimeError as exc:
            raise DcmlError(f"{path / INDEX_FILE}: not a readable faiss index ({str(exc).splitlines()[0][:160]}); "
                            f"{fix}") from None
        items = pd.read_parquet(path / ITEMS_FILE)
        if list(items.columns) != list(ITEM_COLUMNS) or len(items) != index.ntotal \
                or not np.array_equal(items["id"].to_numpy(), np.arange(len(items))):
            raise DcmlError(f"{path}: items.parquet does not match the index ({len(items)} items, "
                            f"{index.ntotal} vectors); {fix}")
        for value in meta.get("search", {}).values():  # the calibrated nprobe / efSearch
            set_knob(index, value)
        return cls(path, index, items, meta)

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        """Top-k hits per normalised query vector: id, image_id, path, label, class_name, score."""
        k = max(1, min(int(k), self.size))
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, item_id in zip(row_scores, row_ids):
                if item_id < 0:  # an approximate index found fewer than k
                    continue
                item = self.items.iloc[int(item_id)]
                hits.append({"id": int(item_id), "image_id": item["image_id"],
                             "path": item["path"] if isinstance(item["path"], str) else None,
                             "label": int(item["label"]), "class_name": item["class_name"],
                             "score": round(float(score), 6)})
            out.append(hits)
        return out

    def image_source(self, item_id: int):
        """What to decode for item ``item_id``: its file path or a file object over its embedded bytes."""
        item = self.items.iloc[int(item_id)]
        if isinstance(item["path"], str) and item["path"]:
            return item["path"]
        return io.BytesIO(item["image_bytes"])


def write(dest: str | os.PathLike, index: faiss.Index, items: pd.DataFrame, meta: dict, model_file) -> None:
    """Write an index folder atomically (a reader sees the old folder or the new one, never a mix)."""
    table = pa.Table.from_pandas(items[list(ITEM_COLUMNS)], schema=ITEMS_SCHEMA, preserve_index=False)
    with atomic_dir(dest) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_parquet(tmp / ITEMS_FILE, table, {"format": FORMAT})
        shutil.copyfile(model_file, tmp / MODEL_FILE)
        write_json(tmp / META_FILE, {"format": FORMAT, **meta})
