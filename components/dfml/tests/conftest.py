from pathlib import Path

import pandas as pd
import pytest
import torch

from dcml.contracts import manifest as manifest_lib

torch.set_num_threads(1)

CARS = Path("/work/shared/data/cars196")


@pytest.fixture(scope="module")
def cars_manifest(tmp_path_factory):
    """Real Cars196 photos: 4 training classes x 5 images, 3 test classes x 4 images."""
    if not CARS.is_dir():
        pytest.skip(f"{CARS}: Cars196 not available")
    folders = sorted(p for p in CARS.iterdir() if p.is_dir())[:7]
    rows = []
    for label, folder in enumerate(folders):
        split, count = ("train", 5) if label < 4 else ("test", 4)
        for image in sorted(folder.glob("*.jpg"))[:count]:
            rows.append({"image_id": f"{folder.name}/{image.name}", "path": f"{folder.name}/{image.name}",
                         "image_bytes": None, "label": label, "class_name": folder.name, "split": split})
    dest = tmp_path_factory.mktemp("dfml") / "manifest.parquet"
    manifest_lib.write(dest, pd.DataFrame(rows), {"dataset": "cars196-tiny", "root": str(CARS),
                                                 "fingerprint": manifest_lib.fingerprint(r["path"] for r in rows),
                                                 "split_mode": "class-disjoint"})
    return dest
