"""The fast mode: the frozen lower part of the backbone, run once per image and view.

With ``train_blocks = t >= 0`` only the last t blocks (and the tail) of the
backbone train; everything below them is a fixed function of the image. A
training epoch through the whole network recomputes that function for every
image; the fast mode computes it once, for ``views`` augmented views of every
training image (train transform, seeded per image and view) plus its eval
view, and training runs only the trainable top on those stored activations.
Each epoch draws one of the augmented views per image (a pure function of
seed, epoch and row), so an epoch sees one view of each image, as it would
through the data loader, from a fixed pool of ``views`` crops per image.

A cache is a folder written atomically (see :func:`build`):

- ``train.npy``: float16 ``[N_train, 1 + views, *shape]``; view 0 is the eval
  transform (for head initialisation, re-clustering and features), views
  1..V the augmented ones;
- ``eval.npy``: float16 ``[N_eval, *shape]``: eval view of the validation and
  test rows (validation scores every epoch; test only for curves);
- ``rows.parquet``: ``image_id, label, split, array, index`` (which array and
  row of it holds the image), with the metadata: the backbone's model config
  (train_blocks included), ``split_unit``, ``shape``, ``views``, ``seed``, the
  manifest fingerprint and the stage record.

Evaluation and every stage after training run the whole network on images;
the cache only feeds training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from dcml.contracts.errors import DcmlError
from dcml.contracts.events import progress
from dcml.contracts.io import atomic_dir, read_parquet_meta, write_parquet

TRAIN_FILE, EVAL_FILE, ROWS_FILE = "train.npy", "eval.npy", "rows.parquet"
EVAL_SPLITS = ("val", "test", "query", "gallery")


class _Views(Dataset):
    """Item i: (stacked views [1 + V, C, S, S], row index); view 0 = eval transform."""

    def __init__(self, images, eval_transform, train_transform, views: int, seed: int):
        self.images, self.eval_transform, self.train_transform = images, eval_transform, train_transform
        self.views, self.seed = views, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images.load_image(i)
        out = [self.eval_transform(img)]
        for v in range(1, self.views + 1):
            # The crop of view v of row i depends on (seed, row, view) only.
            torch.manual_seed(self.seed * 1_000_003 + i * 1_009 + v)
            out.append(self.train_transform(img))
        return torch.stack(out), i


def _compute(model, manifest, rows: pd.DataFrame, views: int, seed: int, batch_size: int, device,
             num_workers: int, desc: str) -> np.ndarray | None:
    from dcml.algorithm.data import ManifestImageDataset, build_transform

    if rows.empty:
        return None
    images = ManifestImageDataset(manifest, rows, None)
    eval_t = build_transform(model.config, train=False)
    images.mode, images.draft_size = eval_t.mode, None if views else eval_t.draft_size
    dataset = _Views(images, eval_t, build_transform(model.config, train=True), views, seed)
    loader = DataLoader(dataset, batch_size=max(1, batch_size // (1 + views)), shuffle=False,
                        num_workers=num_workers)
    out = None
    with torch.inference_mode():
        for batch, index in progress(loader, total=len(loader), desc=desc, unit="batch"):
            n, v = batch.shape[:2]
            lower = model.lower(batch.flatten(0, 1).to(device)).float().cpu()
            lower = lower.reshape(n, v, *lower.shape[1:])
            if views == 0:
                lower = lower[:, 0]
            if out is None:
                out = np.empty((len(rows), *lower.shape[1:]), dtype=np.float16)
            out[index.numpy()] = lower.numpy().astype(np.float16)
    return out


def build(out_dir, model, manifest, *, views: int = 4, seed: int = 0, batch_size: int = 64, device="cpu",
          num_workers: int = 0, record: dict | None = None) -> dict:
    """Write the cache of ``model``'s frozen lower part for ``manifest`` into ``out_dir``.

    Train rows get the eval view and ``views`` augmented views; val / test /
    query / gallery rows their eval view. Returns the metadata written.
    """
    if not model.has_frozen_part:
        raise DcmlError("fast mode: the model trains its whole backbone (train_blocks=-1), so there is no frozen part "
                        "to cache; set train_blocks to the number of top blocks to train (e.g. 5)")
    if views < 1:
        raise DcmlError(f"fast mode: views={views}; cache at least one augmented view per training image")
    model.eval().to(device)
    df = manifest.df
    train_rows = df[df["split"] == "train"].reset_index(drop=True)
    eval_rows = df[df["split"].isin(EVAL_SPLITS)].reset_index(drop=True)
    if train_rows.empty:
        raise DcmlError(f"{manifest.path}: no 'train' rows to cache; ingest with a split mode that has a training split")
    t0 = time.perf_counter()
    train = _compute(model, manifest, train_rows, views, seed, batch_size, device, num_workers,
                     f"fast mode: {len(train_rows)} training images x {1 + views} views")
    evals = _compute(model, manifest, eval_rows, 0, seed, batch_size, device, num_workers,
                     f"fast mode: {len(eval_rows)} evaluation images")
    seconds = time.perf_counter() - t0
    table = pd.concat([
        train_rows[["image_id", "label", "split"]].assign(array="train", index=np.arange(len(train_rows))),
        eval_rows[["image_id", "label", "split"]].assign(array="eval", index=np.arange(len(eval_rows))),
    ], ignore_index=True)
    meta = {
        "model_config": dict(model.config), "split_unit": int(model.split), "shape": list(train.shape[2:]),
        "views": int(views), "seed": int(seed), "dtype": "float16",
        "manifest_fingerprint": manifest.meta.get("fingerprint"), "dataset": manifest.dataset,
        "bytes": int(train.nbytes + (evals.nbytes if evals is not None else 0)),
        "seconds": round(seconds, 3), "record": record,
    }
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / TRAIN_FILE, train)
        if evals is not None:
            np.save(tmp / EVAL_FILE, evals)
        write_parquet(tmp / ROWS_FILE, pa.Table.from_pandas(table, preserve_index=False), meta)
    return meta


def write_empty(out_dir) -> None:
    """An empty folder: the marker of "fast mode off" where a pipeline output must exist."""
    with atomic_dir(out_dir):
        pass


def is_cache(path) -> bool:
    """True when ``path`` holds a cache (the extract stage writes an empty folder when the fast mode is off)."""
    return (Path(path) / ROWS_FILE).is_file()


class ActivationCache:
    """A cache folder opened for reading (arrays memory-mapped)."""

    def __init__(self, path):
        self.path = Path(path)
        rows_file = self.path / ROWS_FILE
        if not rows_file.is_file():
            raise DcmlError(f"{self.path}: not a fast-mode cache (no {ROWS_FILE}); create it with `dcml extract --views N`")
        self.meta = read_parquet_meta(rows_file)
        self.rows = pd.read_parquet(rows_file)
        try:
            self.train = np.load(self.path / TRAIN_FILE, mmap_mode="r")
            self.eval = np.load(self.path / EVAL_FILE, mmap_mode="r") if (self.path / EVAL_FILE).is_file() else None
        except (OSError, ValueError) as exc:
            raise DcmlError(f"{self.path}: unreadable cache array ({exc}); re-create it with `dcml extract --views N`") from None
        self.views = int(self.meta["views"])
        self._where = {img: (arr, int(i)) for img, arr, i in
                       zip(self.rows["image_id"].astype(str), self.rows["array"], self.rows["index"])}

    def check_model(self, model, source: str = "model") -> None:
        """The cache must come from this backbone, image size and split point."""
        cached = self.meta["model_config"]
        for key in ("backbone", "weights", "image_size", "in_channels", "train_blocks"):
            if cached.get(key) != model.config.get(key):
                raise DcmlError(f"{self.path}: cached for {key}={cached.get(key)!r} but the {source} has "
                                f"{key}={model.config.get(key)!r}; extract the cache with the same settings")
        if int(self.meta["split_unit"]) != int(model.split):
            raise DcmlError(f"{self.path}: cached at unit {self.meta['split_unit']} but the {source} splits at {model.split}")

    def locate(self, image_ids, array: str | None = None) -> np.ndarray:
        """Row numbers in the cache array for ``image_ids`` (all in one array)."""
        out = np.empty(len(image_ids), dtype=np.int64)
        for n, img in enumerate(map(str, image_ids)):
            found = self._where.get(img)
            if found is None or (array is not None and found[0] != array):
                raise DcmlError(f"{self.path}: image {img!r} is not cached{f' in {array}' if array else ''}; "
                                "extract the cache from the same manifest")
            out[n] = found[1]
        return out

    def array_of(self, image_ids) -> tuple[np.ndarray, np.ndarray, bool]:
        """(array, row numbers, is_train_array) holding the eval view of ``image_ids``."""
        first = self._where.get(str(image_ids[0])) if len(image_ids) else ("train", 0)
        if first is None:
            self.locate(image_ids[:1])  # raises with the message
        name = first[0]
        return (self.train if name == "train" else self.eval), self.locate(image_ids, name), name == "train"


class TrainViews(Dataset):
    """Training items ``(activations, label, row)`` for one epoch: one augmented view per row."""

    def __init__(self, cache: ActivationCache, positions: np.ndarray, labels: np.ndarray, seed: int, epoch: int):
        self.cache, self.positions, self.labels = cache, positions, labels
        rng = np.random.default_rng([int(seed), int(epoch), 7919])
        self.view = rng.integers(1, cache.views + 1, size=len(positions))

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, i):
        a = torch.from_numpy(np.asarray(self.cache.train[self.positions[i], self.view[i]], dtype=np.float32))
        return a, int(self.labels[i]), i


def batch_loader(dataset: Dataset, batch_sampler) -> DataLoader:
    """Batches of cached activations (in-process: reading a memory map is cheap)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=0)


def remove(path) -> None:
    shutil.rmtree(path, ignore_errors=True)
