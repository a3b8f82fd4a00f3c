"""PKU VehicleID (Liu et al. 2016), official layout:

    train_test_split/train_list.txt          "<image name> <vehicle id>"
    train_test_split/test_list_{800,1600,2400}.txt
    image/<image name>.jpg

(the list files may also sit in the root). Vehicles are the classes; the
training and test vehicles are disjoint. One of the three test sets (800,
1,600 or 2,400 vehicles) becomes the test split.
"""

from __future__ import annotations

import pandas as pd

from dcml.contracts.errors import DcmlError
from data_prep import common

NAME = "vehicleid"
DEFAULT_SPLIT_MODE = common.OFFICIAL
TEST_SIZES = (800, 1600, 2400)
LIST_DIR = "train_test_split"


def read(root, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None, test_size: int = 800):
    """Read VehicleID with the ``test_size``-vehicle test set -> (manifest rows, metadata)."""
    common.check_split_mode(split_mode, NAME)
    if int(test_size) not in TEST_SIZES:
        raise DcmlError(f"--vehicleid-test-size {test_size}: VehicleID has test sets of {', '.join(map(str, TEST_SIZES))} vehicles; use one of those")
    given = common.require_root(root, NAME)
    root = common.find_marked_root(given, (f"{LIST_DIR}/train_list.txt",), ("train_list.txt",))
    if root is None:
        raise DcmlError(f"{given}: not a recognised vehicleid layout (expected {LIST_DIR}/train_list.txt, "
                        f"{LIST_DIR}/test_list_800.txt and image/); point --root at the VehicleID_V1.0 folder")
    list_dir = root / LIST_DIR if (root / LIST_DIR / "train_list.txt").is_file() else root
    files = {"train": list_dir / "train_list.txt", "test": list_dir / f"test_list_{int(test_size)}.txt"}
    if not files["test"].is_file():
        raise DcmlError(f"{files['test']}: missing; restore it from the VehicleID archive or choose another "
                        "--vehicleid-test-size")
    guard = common.RootGuard(root)
    rows, entries, class_files = [], [], {}
    for split, path in files.items():
        for lineno, line in common.read_lines(path):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise DcmlError(f"{path}:{lineno}: expected '<image name> <vehicle id>', got {line!r}; fix or remove the line")
            rel = guard.check_relative(f"image/{parts[0]}.jpg", path)
            entries.append((rel, guard.size(rel, path)))
            label = int(parts[1])
            class_files.setdefault(label, path)
            rows.append((parts[0], rel, label, f"vehicle_{label}", split))
    if not rows:
        raise DcmlError(f"{files['train']}: lists no images; restore the VehicleID list files")
    df = pd.DataFrame(rows, columns=["image_id", "path", "label", "class_name", "split"])
    return common.finish(df, dataset=NAME, root=root, split_mode=split_mode, max_per_class=max_per_class,
                         source=files["train"], fingerprint_value=common.content_fingerprint(root, entries, files.values()),
                         class_sources=class_files)
