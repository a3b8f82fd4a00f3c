"""Tiny Fashion-MNIST manifests for the training tests (real images, few of them).

Not a test module: the conftest files and tests/test_training.py load it by path.
"""

from __future__ import annotations

import gzip
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dcml.contracts import manifest as manifest_mod

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@lru_cache(maxsize=1)
def t10k() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 Fashion-MNIST test images [N, 28, 28] and labels."""
    images_file = FMNIST / "t10k-images-idx3-ubyte.gz"
    if not images_file.is_file():
        pytest.skip(f"{FMNIST}: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    images = np.frombuffer(gzip.decompress(images_file.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    return images, labels.astype(np.int64)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_manifest(dest, per_class: int = 20, train_classes=(0, 1, 2, 3, 4, 5), test_classes=(6, 7, 8, 9),
                  test_per_class: int | None = None) -> Path:
    """A class-disjoint manifest of real Fashion-MNIST images embedded as PNG bytes."""
    images, labels = t10k()
    rows = []
    for split, classes, count in (("train", train_classes, per_class), ("test", test_classes, test_per_class or per_class)):
        for c in classes:
            for i in np.flatnonzero(labels == c)[:count]:
                rows.append({"image_id": f"fm{i:05d}", "path": None, "image_bytes": png(images[i]),
                             "label": int(c), "class_name": f"class{c}", "split": split})
    dest = Path(dest)
    manifest_mod.write(dest, pd.DataFrame(rows), {"dataset": "fashion-mnist-tiny", "root": str(dest.parent.resolve()),
                                                 "fingerprint": f"tiny-{per_class}-{len(rows)}", "split_mode": "class-disjoint"})
    return dest
