import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dcml.contracts import manifest as manifest_lib

torch.set_num_threads(1)


@pytest.fixture
def tiny_manifest(tmp_path):
    """A manifest of 8 small JPEGs (4 classes) on disk: 6 train, 2 test."""
    root = tmp_path / "images"
    rows = []
    for i in range(8):
        label = i % 4
        rng = np.random.default_rng(i)
        arr = (rng.integers(0, 256, size=3) + rng.normal(0, 25, size=(36, 44, 3))).clip(0, 255).astype(np.uint8)
        rel = f"{label:03d}/img{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        (root / rel).write_bytes(buf.getvalue())
        rows.append({"image_id": f"img{i}", "path": rel, "label": label, "class_name": f"c{label}",
                     "split": "train" if i < 6 else "test"})
    dest = tmp_path / "manifest.parquet"
    manifest_lib.write(dest, pd.DataFrame(rows), {"dataset": "tiny", "root": str(root), "fingerprint": "ab" * 32})
    return dest
