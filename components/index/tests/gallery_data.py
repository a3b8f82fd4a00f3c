"""Real tiny galleries and models for the retrieval tests (not a test module: loaded by path).

* :func:`fm_manifest`: Fashion-MNIST images embedded as PNG bytes (train classes 0-5, test 6-9);
* :func:`jpeg_manifest`: Fashion-MNIST images written as RGB JPEG files of 40 x 30 pixels (so
  resizing, cropping and JPEG draft decoding all apply), referenced by path, split ``test``;
* :func:`checkpoint_file`: a seeded, untrained dcml model (small_cnn or efficientnet_lite0).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dcml.algorithm.models import build_model, default_config
from dcml.contracts import checkpoint
from dcml.contracts import manifest as manifest_lib

_spec = importlib.util.spec_from_file_location("fmnist_data", Path(__file__).resolve().parents[2] / "train" / "tests"
                                               / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)


def fm_manifest(dest: Path, per_class: int = 8, test_per_class: int = 12) -> Path:
    return fmnist_data.make_manifest(dest, per_class=per_class, test_per_class=test_per_class)


def jpeg_manifest(folder: Path, classes=(0, 1, 7, 8), per_class: int = 10) -> Path:
    images, labels = fmnist_data.t10k()
    root = folder / "images"
    rows = []
    for c in classes:
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            rel = f"class{c}/fm{i:05d}.jpg"
            rgb = np.stack([images[i], images[i] // 2, 255 - images[i]], axis=-1)
            Image.fromarray(rgb).resize((40, 30), Image.Resampling.BILINEAR).save(root / rel, quality=90)
            rows.append({"image_id": f"fm{i:05d}", "path": rel, "image_bytes": None, "label": int(c),
                         "class_name": f"class{c}", "split": "test"})
    dest = folder / "jpeg-manifest.parquet"
    manifest_lib.write(dest, pd.DataFrame(rows), {"dataset": "fashion-mnist-jpeg", "root": str(root),
                                                  "fingerprint": f"jpeg-{len(rows)}"})
    return dest


def checkpoint_file(dest: Path, backbone: str = "small_cnn", seed: int = 0, **config) -> Path:
    torch.manual_seed(seed)
    net = build_model(default_config(backbone=backbone, **config), load_weights=False)
    checkpoint.save(dest, {"model_config": net.config, "model": net.state_dict(), "record": "{}"})
    return dest


def indexed_jpeg_gallery(folder: Path) -> tuple[Path, Path, Path]:
    """(JPEG-file manifest, small_cnn checkpoint with 2 slices, the index `dcml index` built of them) in ``folder``."""
    from components.index.stage import run as index_stage

    torch.set_num_threads(1)
    manifest = jpeg_manifest(folder)
    model = checkpoint_file(folder / "model.pt", embedding_dim=16, num_slices=2)
    index_stage(out=folder / "index", manifest=manifest, model=model)
    return manifest, model, folder / "index"
