"""CUB-200-2011 (Wah et al. 2011), official layout:

    images.txt              "<image id> <path under images/>"
    image_class_labels.txt  "<image id> <class id 1..200>"
    classes.txt             "<class id> <NNN.Class_Name>"
    images/NNN.Class_Name/*.jpg

Metric learning splits by class: 1-100 train, 101-200 test (the
classification split in train_test_split.txt is not used).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dcml.contracts.errors import DcmlError
from data_prep import common

NAME = "cub200"
DEFAULT_SPLIT_MODE = common.OFFICIAL
LAST_TRAIN_CLASS = 100
MARKERS = ("images.txt", "image_class_labels.txt")


def _pairs(path: Path, what: str) -> dict[str, str]:
    """``<id> <value>`` lines as a dict; a malformed line is a DcmlError."""
    if not path.is_file():
        raise DcmlError(f"{path}: missing; restore {path.name} from the CUB-200-2011 archive")
    out: dict[str, str] = {}
    for lineno, line in common.read_lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DcmlError(f"{path}:{lineno}: expected '<id> <{what}>', got {line!r}; fix or remove the line")
        if parts[0] in out:
            raise DcmlError(f"{path}:{lineno}: id {parts[0]} is listed twice; remove the duplicate line")
        out[parts[0]] = parts[1].strip()
    return out


def read(root, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None):
    """Read CUB-200-2011 -> (manifest rows, metadata)."""
    common.check_split_mode(split_mode, NAME)
    given = common.require_root(root, NAME)
    root = common.find_marked_root(given, MARKERS)
    if root is None:
        raise DcmlError(f"{given}: not a recognised cub200 layout (expected images.txt, image_class_labels.txt, "
                        "classes.txt and images/); point --root at the CUB_200_2011 folder")
    images_txt, labels_txt, classes_txt = (root / n for n in ("images.txt", "image_class_labels.txt", "classes.txt"))
    images = _pairs(images_txt, "path")
    labels = _pairs(labels_txt, "class id")
    names = _pairs(classes_txt, "class name") if classes_txt.is_file() else {}
    guard = common.RootGuard(root)
    rows, entries = [], []
    for image_id, rel_image in images.items():
        if image_id not in labels:
            raise DcmlError(f"{labels_txt}: no class for image {image_id} ({rel_image}); add its line or restore the file")
        label_text = labels[image_id]
        if not label_text.isdigit():
            raise DcmlError(f"{labels_txt}: class {label_text!r} of image {image_id} is not an integer; restore the file")
        label = int(label_text)
        rel = "images/" + guard.check_relative(rel_image, images_txt)
        entries.append((rel, guard.size(rel, images_txt)))
        name = names.get(str(label), f"{label:03d}.class_{label}")
        rows.append((rel, rel, label, name.split(".", 1)[1] if "." in name else name))
    if not rows:
        raise DcmlError(f"{images_txt}: lists no images; restore the file from the CUB-200-2011 archive")
    df = pd.DataFrame(rows, columns=["image_id", "path", "label", "class_name"])
    df["split"] = np.where(df["label"] <= LAST_TRAIN_CLASS, "train", "test")
    annotations = [p for p in (images_txt, labels_txt, classes_txt) if p.is_file()]
    return common.finish(df, dataset=NAME, root=root, split_mode=split_mode, max_per_class=max_per_class,
                         source=images_txt, fingerprint_value=common.content_fingerprint(root, entries, annotations))
