"""dcml's Python API: a trained model that embeds images, and a searchable gallery index.

>>> import dcml
>>> model = dcml.load_model("model.pt")
>>> vectors = model.embed("photos/")                    # numpy [n, dim], unit length
>>> index = dcml.Index.build(model, manifest="manifest.parquet", path="gallery-index")
>>> index.search("query.jpg", k=5)                      # pandas DataFrame, one row per hit
>>> index.add(["new1.jpg", "new2.jpg"]); index.remove([3]); index.save()

``dcml index``, ``dcml search``, ``dcml embed`` and ``dcml serve`` are this
API's command lines. Inputs named ``images`` may be a PIL image, an image
file, a folder (its image files, subfolders included), or a list of those.
Bad input raises :class:`dcml.DcmlError` with a one-line message.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from dcml.contracts.errors import DcmlError
from dcml.retrieval import index as index_lib
from dcml.retrieval import index_lock, verify
from dcml.retrieval.embedder import BATCH, Embedded, Embedder, image_files
from dcml.retrieval.search import MAX_K

__all__ = ["Model", "Index", "load_model", "rethreshold", "MAX_K"]
DECISION_COLUMNS = ("threshold", "false_match_rate", "true_match_rate")  # what match means, on every hit


def _files_and_images(images, recursive: bool = True) -> list:
    """``images`` as a flat list of PIL images and file paths (folders expanded)."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(item)
        elif not isinstance(item, (str, os.PathLike)):
            raise DcmlError(f"images: item {len(out)} is a {type(item).__module__}.{type(item).__name__}; pass "
                            "PIL images, image files or folders (embeddings go to Index.search_vectors)")
        elif Path(item).is_dir():
            out += image_files(item, recursive)
        else:
            out.append(Path(item))
    return out


class Model:
    """A trained dcml model (a checkpoint file): embeds images as its gallery was embedded."""

    def __init__(self, embedder: Embedder, path: str | os.PathLike):
        self.embedder, self.path = embedder, Path(path)

    @property
    def dim(self) -> int:
        """The embedding's dimension."""
        return self.embedder.dim

    @property
    def config(self) -> dict:
        """The model's configuration (backbone, image size, slices, ...)."""
        return dict(self.embedder.net.config)

    def embed(self, images, normalize: bool = True, recursive: bool = True, progress: bool = True) -> np.ndarray:
        """float32 [n, dim] embeddings of ``images`` (PIL images, files, folders), in order.

        ``normalize``: unit length (the dot product is the cosine score search
        reports). An unreadable image raises DcmlError; :meth:`embed_files`
        skips and reports instead. ``progress``: a tqdm bar when there is more
        than one batch, on a terminal or in Jupyter (quiet in a pipe or a file).
        Images are decoded batch by batch.
        """
        items = _files_and_images(images, recursive)
        named = [(str(item), (lambda p=item: self.embedder.read(p)) if isinstance(item, Path) else (lambda i=item: i))
                 for item in items]
        desc = f"embed {len(items)} images" if progress and len(items) > BATCH else None
        return self.embedder.embed_each(named, strict=True, normalize=normalize, desc=desc).vectors

    def embed_files(self, images, strict: bool = False, normalize: bool = True, recursive: bool = True,
                    progress: bool = False) -> Embedded:
        """Embed image files (or folders of them): ``.paths`` that worked, their ``.vectors``, and
        ``.failed`` = [(path, reason)] for files skipped (``strict``: the first bad file raises)."""
        paths = [p for p in _files_and_images(images, recursive) if isinstance(p, Path)]
        return self.embedder.embed_files(paths, strict, normalize, f"embed {len(paths)} images" if progress else None)

    def __repr__(self) -> str:
        return f"dcml.Model({str(self.path)!r}, dim={self.dim}, backbone={self.config.get('backbone')!r})"


def load_model(path: str | os.PathLike, device: str | None = None) -> Model:
    """A dcml checkpoint (``model.pt`` of a run, of an index folder, or a compressed one) as a :class:`Model`.

    ``device``: cpu, cuda, cuda:N (default: CUDA when available, else CPU).
    """
    return Model(Embedder.load(path, device), path)


class Index:
    """A gallery index: embeddings of gallery images in faiss, their table, the model, the match threshold.

    Build one with :meth:`build` or open a folder with :meth:`open`; :meth:`add`
    / :meth:`remove` change it in memory, :meth:`save` writes the folder
    (atomically: a running ``dcml serve`` picks the new folder up).

    One writer at a time (:mod:`dcml.retrieval.index_lock`): an opened index
    takes the folder's write lock at its first change and holds it until
    :meth:`save` (or until the process ends); another writer waits meanwhile
    and then works on the folder as this one left it.
    """

    def __init__(self, gallery: index_lib.GalleryIndex, model: Model):
        self.gallery, self.model = gallery, model
        self._path_set = True  # built without path=: save() needs one
        self._writer = index_lock.Writer()  # the folder it was read from, its write lock, unsaved changes
        # (vectors, labels, about) the match threshold was chosen on: kept in the folder to choose it again
        self._validation = index_lib.read_validation(gallery.path) if gallery.meta.get("verification") else None

    # ---- opening and building
    @classmethod
    def open(cls, path: str | os.PathLike, device: str | None = None) -> "Index":
        """An index folder written by ``dcml index`` or :meth:`save`, with its own model."""
        gallery = index_lib.GalleryIndex.open(path)
        model = load_model(gallery.model_file, device)
        if model.dim != int(gallery.index.d):
            raise DcmlError(f"{gallery.path}: its model embeds into {model.dim} dimensions but the index holds "
                            f"{gallery.index.d}; rebuild it with `dcml index`")
        index = cls(gallery, model)
        index._writer = index_lock.Writer(gallery.path)
        return index

    @classmethod
    def build(cls, model: Model, images=None, *, manifest=None, split: str = "auto", labels=None,
              class_names=None, path: str | os.PathLike | None = None, index_type: str = "auto",
              target_recall: float = index_lib.TARGET_RECALL, seed: int = 0,
              false_match_rate: float | None = verify.DEFAULT_FALSE_MATCH_RATE, batch_size: int = 128,
              num_workers: int = 0) -> "Index":
        """An index of ``images`` (with optional ``labels``) or of a manifest's ``split`` (auto = gallery, else
        test; or names, or ``all``). With a manifest that has a ``val`` split, the match threshold is chosen on
        it at ``false_match_rate`` (None: no threshold). ``path``: where :meth:`save` writes by default.
        ``class_names``: one per image (default: each file's folder name)."""
        if false_match_rate is not None:
            verify.check_rate(false_match_rate)
        vectors, items, source = _gallery(model, images, manifest, split, labels, batch_size, num_workers,
                                          class_names=class_names)
        if not len(vectors):
            raise DcmlError(f"{source['manifest'] or 'index'}: no gallery images to index; pick a split or "
                            "images that exist")
        faiss_index, info = index_lib.build(vectors, index_type, seed, target_recall)
        items = items.assign(id=np.arange(len(items), dtype=np.int64))[list(index_lib.ITEM_COLUMNS)]
        meta = {"type": info["type"], "dim": int(faiss_index.d), "count": int(faiss_index.ntotal),
                "metric": "inner product of L2-normalised embeddings (cosine)",
                "search": {name: info[name] for name in ("nprobe", "efSearch") if name in info},
                "recall@10": info["recall@10"], "exact": info["exact"], "build": info,
                "model": {"sha256": index_lib.file_sha256(model.path), "config": model.config},
                "sources": [{**source, "added": len(items), "ids": [0, len(items) - 1]}], "next_id": len(items)}
        index = cls(index_lib.GalleryIndex(Path(path) if path else Path("."), faiss_index, items, meta), model)
        index._path_set = path is not None
        if manifest is not None and false_match_rate is not None:
            chosen = _verification(model, manifest, false_match_rate, seed, batch_size, num_workers)
            if chosen is not None:
                index.gallery.meta["verification"], index._validation = chosen
        return index

    # ---- changing
    def add(self, images=None, *, manifest=None, split: str = "auto", labels=None, class_names=None,
            skip_known: bool = True, batch_size: int = 128, num_workers: int = 0, seed: int = 0) -> np.ndarray:
        """Add images (or a manifest's split; with ``skip_known`` its image_ids already held are left out);
        return the new ids (ids continue after the largest ever given). ``class_names`` (one per image;
        default: each file's folder name) without ``labels``: a class the index holds keeps its label, a new
        one gets the next free label."""
        self._changing()
        if class_names is not None and labels is None:
            labels = _labels_for(self.gallery.items, class_names)
        vectors, items, source = _gallery(self.model, images, manifest, split, labels, batch_size, num_workers,
                                          known=set(self.gallery.items["image_id"]) if skip_known else None,
                                          class_names=class_names)
        target = self.gallery.meta.get("build", {}).get("target_recall", index_lib.TARGET_RECALL)
        ids = self.gallery.add(vectors, items, target, seed)
        self.gallery.meta.setdefault("sources", []).append(
            {**source, "added": len(ids), "ids": [int(ids[0]), int(ids[-1])] if len(ids) else []})
        self._writer.dirty = True
        return ids

    def remove(self, ids) -> int:
        """Remove items by id (as :meth:`search` returns them); return how many. Ids are never reused."""
        self._changing()
        removed = self.gallery.remove(np.atleast_1d(np.asarray(ids, dtype=np.int64)))
        self._writer.dirty = True
        return removed

    def choose_threshold(self, images=None, *, labels=None, manifest=None, split: str = "val",
                         false_match_rate: float = verify.DEFAULT_FALSE_MATCH_RATE, seed: int = 0) -> dict:
        """Choose (and store) the match threshold at ``false_match_rate`` on labelled held-out images
        (``images`` + ``labels``, or a manifest's ``split``; neither: the embeddings the current threshold
        was chosen on, nothing embedded again); returns the ``verification`` entry."""
        self._changing()
        if manifest is not None:
            chosen = _verification(self.model, manifest, false_match_rate, seed, split=split)
            if chosen is None:
                raise DcmlError(f"{manifest}: no rows in split {split!r}; pass the split of held-out labelled images")
        elif images is None:
            chosen = rechoose(self._validation, false_match_rate, self.path), self._validation
        else:
            if labels is None:
                raise DcmlError("choose_threshold: pass labels= for the images (one per image), or manifest=")
            vectors = self.model.embed(images)
            if len(labels) != len(vectors):
                raise DcmlError(f"choose_threshold: {len(labels)} labels for {len(vectors)} images; pass one each")
            chosen = _chosen(vectors, np.asarray(labels), false_match_rate, seed, "images")
        self.gallery.meta["verification"], self._validation = chosen
        self._writer.dirty = True
        return chosen[0]

    def save(self, path: str | os.PathLike | None = None, exclusive: bool = False, **meta) -> Path:
        """Write the index folder (atomically) to ``path`` or where it was opened / built; return the path.
        ``exclusive``: only where no index is (checked under the folder's write lock: of two builds into one new
        folder at once, the second is refused instead of replacing the first)."""
        if path is None and not self._path_set:
            raise DcmlError("Index.save: this index was built without path=; pass save(path)")
        dest = Path(path) if path is not None else self.gallery.path
        self._changing(dest)
        if exclusive and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            self._writer.release()
            raise DcmlError(f"{dest}: another process wrote an index there while this one was built; nothing "
                            "written: pass --overwrite to replace it, or --append to add to it")
        try:
            self.gallery.meta.update(meta)
            written = index_lib.write(dest, self.gallery.index, self.gallery.items, self.gallery.meta,
                                      self.model.path,
                                      self._validation if self.gallery.meta.get("verification") else None)
        finally:
            self._writer.release()  # a failed write keeps the changes (dirty); a retry checks the folder again
        self.gallery.meta["write_id"] = written["write_id"]
        self._writer.saved(dest)
        self.gallery.path, self._path_set = dest, True
        return dest

    def _changing(self, dest: str | os.PathLike | None = None) -> None:
        """Before a change or a write: hold the write lock of ``dest`` (default: the folder this index was read
        from; none for one built in memory), so no other process writes it meanwhile. An index that another
        process wrote since it was read is read again first -- it holds no change of this one yet, since every
        change takes the lock first -- so ids are never handed out twice and no update is lost."""
        dest = dest if dest is not None else self._writer.opened_from
        if dest is None:
            return
        self._writer.hold(dest)
        if not self._writer.stale(dest, self.gallery.meta.get("write_id")):
            return
        if self._writer.dirty:
            self._writer.release()
            raise DcmlError(f"{dest}: another process wrote this index after this one's unsaved changes (its "
                            "last save failed); open it again and redo them")
        fresh = index_lib.GalleryIndex.open(dest)
        if (fresh.meta.get("model") or {}).get("sha256") != (self.gallery.meta.get("model") or {}).get("sha256"):
            self._writer.release()
            raise DcmlError(f"{dest}: another process rebuilt this index with another model since it was opened; "
                            "open it again")
        self.gallery = fresh
        self._validation = index_lib.read_validation(dest) if fresh.meta.get("verification") else None

    # ---- searching
    def search(self, images, k: int = 10) -> pd.DataFrame:
        """Top-k gallery items of each query image: one row per hit with query (its position, or its
        path), rank, id, image_id, label, class_name, score (cosine), match, path, and what match means:
        threshold (match = score >= threshold) with the false_match_rate and true_match_rate measured when it
        was chosen (all three None when the index has no threshold)."""
        items = _files_and_images(images)
        names = [str(item) if isinstance(item, Path) else i for i, item in enumerate(items)]
        return self.search_vectors(self.model.embed(items), k, names)

    def search_vectors(self, vectors, k: int = 10, queries=None) -> pd.DataFrame:
        """Like :meth:`search` for embeddings (normalised here)."""
        k = _check_k(k)
        vectors = index_lib.normalized(vectors, "query vectors")
        queries = range(len(vectors)) if queries is None else queries
        rule = {name: (self.decision or {}).get(name) for name in DECISION_COLUMNS}
        rows = [{"query": q, "rank": rank, **hit, **rule}
                for q, hits in zip(queries, self.gallery.search(vectors, k)) for rank, hit in enumerate(hits, 1)]
        columns = ["query", "rank", "id", "image_id", "label", "class_name", "score", "match", "path"]
        return pd.DataFrame(rows, columns=columns + list(DECISION_COLUMNS))

    # ---- what it holds
    @property
    def items(self) -> pd.DataFrame:
        """id, image_id, path, label, class_name, split of every item (no image bytes)."""
        return self.gallery.items.drop(columns=["image_bytes"])

    @property
    def threshold(self) -> float | None:
        """The score from which a hit is a match, or None when none was chosen."""
        return self.gallery.threshold

    @property
    def decision(self) -> dict | None:
        """What a hit's ``match`` means: threshold, measured false- and true-match rates, pairs, source."""
        return verify.decision(self.gallery.meta.get("verification"))

    @property
    def path(self) -> Path:
        return self.gallery.path

    def __len__(self) -> int:
        return self.gallery.size

    def __repr__(self) -> str:
        return (f"dcml.Index({str(self.path)!r}, {len(self)} images, {self.gallery.meta.get('type')}, "
                f"threshold={self.threshold})")


def _check_k(k) -> int:
    if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
        raise DcmlError(f"k={k!r}: must be a whole number from 1 to {MAX_K}")
    return int(k)


def _gallery(model: Model, images, manifest, split, labels, batch_size, num_workers, known=None, class_names=None):
    """(normalised vectors, items rows without ids, source entry) of images or a manifest's split."""
    if (images is None) == (manifest is None):
        raise DcmlError("index: pass gallery images (files, a folder) or manifest=, not both")
    if manifest is not None:
        from dcml.contracts import manifest as manifest_lib

        man = manifest_lib.read(manifest)
        splits = index_lib.gallery_splits(split, set(man.df["split"]), str(manifest))
        rows = man.split(*splits)
        skipped = 0
        if known is not None:
            held = rows["image_id"].astype(str).isin(known)
            skipped, rows = int(held.sum()), rows[~held].reset_index(drop=True)
        vectors = model.embedder.embed_manifest(man, rows, batch_size, num_workers,
                                                f"index: embed {len(rows)} images")
        source = {"manifest": str(manifest), "dataset": man.dataset, "manifest_fingerprint": man.meta["fingerprint"],
                  "splits": splits, "skipped_already_indexed": skipped}
        return vectors, index_lib.items_from_manifest(rows, man.root), source
    files = _files_and_images(images)
    if any(not isinstance(f, Path) for f in files):
        raise DcmlError("index: gallery images must be files or folders (the index keeps their paths)")
    for given, what in ((labels, "labels"), (class_names, "class names")):
        if given is not None and len(given) != len(files):
            raise DcmlError(f"index: {len(given)} {what} for {len(files)} images; pass one per image")
    rows = pd.DataFrame({"image_id": [str(p) for p in files], "path": [str(p.resolve()) for p in files],
                         "image_bytes": None,
                         "label": np.asarray(labels if labels is not None else [-1] * len(files), dtype=np.int64),
                         "class_name": list(class_names) if class_names is not None else [p.parent.name for p in files],
                         "split": "gallery"})
    skipped = 0
    if known is not None:  # left out before embedding: appending a folder again embeds only what is new
        held = rows["image_id"].isin(known).to_numpy()
        skipped, rows = int(held.sum()), rows[~held].reset_index(drop=True)
    done = model.embed_files([Path(p) for p in rows["image_id"]], strict=True)
    return done.vectors, rows, {"manifest": None, "files": len(files), "skipped_already_indexed": skipped}


def _labels_for(items: pd.DataFrame, class_names) -> list[int]:
    """Labels of ``class_names``: the index's label of a class it holds, the next free label for a new one."""
    known = items[items["label"] >= 0].drop_duplicates("class_name", keep="last")
    labels = dict(zip(known["class_name"], known["label"].astype(int)))
    free = max(labels.values(), default=-1) + 1
    for name in sorted(set(class_names) - set(labels)):
        labels[name], free = free, free + 1
    return [labels[name] for name in class_names]


def _chosen(vectors, labels, rate: float, seed: int, source: str) -> tuple[dict, tuple]:
    """(the verification entry, the (vectors, labels, about) it was chosen on, to keep in the folder)."""
    vectors, labels = verify.sample(vectors, labels, seed)
    return verify.choose(vectors, labels, rate, seed, source), (vectors, labels, {"source": source, "seed": seed})


def rechoose(validation, rate: float, where) -> dict:
    """The verification entry at ``rate`` from the embeddings an index keeps (``validation``); nothing embedded."""
    if validation is None:
        raise DcmlError(f"{where}: keeps no validation embeddings to choose a threshold on (built without a 'val' "
                        "split, or by an older dcml); pass --manifest M with a 'val' split (or images and labels)")
    vectors, labels, about = validation
    return verify.choose(vectors, labels, rate, int(about.get("seed", 0)),
                         about.get("source", "the stored validation embeddings"))


def rethreshold(path: str | os.PathLike, false_match_rate: float) -> dict:
    """Choose an index folder's match threshold again at ``false_match_rate`` on the validation embeddings it
    keeps, and write the folder: nothing is embedded, the model is not even loaded. Returns the entry."""
    verify.check_rate(false_match_rate)
    if not Path(path).is_dir():
        index_lib.GalleryIndex.open(path)  # its one-line error, before a lock file is made beside the folder
    with index_lock.WriteLock(path):  # read, change and write it as one writer
        gallery = index_lib.GalleryIndex.open(path)
        validation = index_lib.read_validation(gallery.path)
        gallery.meta["verification"] = entry = rechoose(validation, false_match_rate, gallery.path)
        index_lib.write(gallery.path, gallery.index, gallery.items, gallery.meta, gallery.model_file, validation)
    return entry


def _verification(model: Model, manifest, rate: float, seed: int = 0, batch_size: int = 128, num_workers: int = 0,
                  split: str = "val") -> tuple[dict, tuple] | None:
    """(the match threshold chosen on a manifest's ``split``, its embeddings) (None when it has none)."""
    from dcml.contracts import manifest as manifest_lib

    man = manifest_lib.read(manifest)
    rows = man.split(split)
    if rows.empty:
        return None
    vectors = model.embedder.embed_manifest(man, rows, batch_size, num_workers, f"threshold: embed {len(rows)} images")
    return _chosen(vectors, rows["label"].to_numpy(), rate, seed, f"{manifest} split {split!r}")
