"""A tiny grey-image manifest (embedded PNGs) and a small_cnn checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dcml.contracts import checkpoint, manifest
from dcml.algorithm.models import build_model


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory) -> str:
    """8 classes x 6 images of 28x28 noisy class-specific stripes; classes 0-5
    train, 6-7 test."""
    rng = np.random.default_rng(0)
    rows = []
    for label in range(8):
        base = np.zeros((28, 28))
        base[:, label * 3:label * 3 + 4] = 200.0  # a vertical band whose position is the class
        for i in range(6):
            img = np.clip(base + rng.normal(0, 30, (28, 28)), 0, 255).astype(np.uint8)
            rows.append({"image_id": f"c{label}_{i}", "path": None, "image_bytes": _png(img), "label": label,
                         "class_name": f"class{label}", "split": "train" if label < 6 else "test"})
    path = tmp_path_factory.mktemp("compress_data") / "manifest.parquet"
    manifest.write(path, pd.DataFrame(rows), {"dataset": "tiny", "root": str(path.parent), "fingerprint": "tiny"})
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model({"backbone": "small_cnn", "weights": "none", "embedding_dim": 16, "image_size": 28,
                         "in_channels": 1})
    path = tmp_path_factory.mktemp("compress_model") / "model.pt"
    checkpoint.save(path, {"model_config": model.config, "model": model.state_dict(),
                           "record": '{"stage": "finetune", "exec_id": "parent"}'})
    return str(path)
