"""Any image collection in class folders.

Two layouts:
- flat: ``<root>/<class>/**/<image>``;
- split: ``<root>/<split>/<class>/**/<image>`` with split folders train/test
  (or train/query/gallery).

Split modes: ``class-disjoint`` (the default) puts the first half of the
sorted classes in train and the rest in test; ``official`` keeps the split
folders of the split layout. Labels number the sorted class names from 0.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dcml.contracts.errors import DcmlError
from dcml.contracts.manifest import SPLITS
from data_prep import common

NAME = "folder"
DEFAULT_SPLIT_MODE = common.CLASS_DISJOINT


def _subdirs(d: Path) -> list[Path]:
    return [p for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def read(root, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None):
    """Read class folders -> (manifest rows, metadata)."""
    common.check_split_mode(split_mode, NAME)
    root = common.require_root(root, NAME)
    guard = common.RootGuard(root)
    top = _subdirs(root)
    split_layout = bool(top) and all(d.name in SPLITS for d in top)
    if split_mode == common.OFFICIAL and not split_layout:
        raise DcmlError(f"{root}: has no train/ and test/ split folders, so there is no official split; "
                        "use --split-mode class-disjoint or arrange the classes under train/ and test/")
    class_dirs = [(d.name, c) for d in top for c in _subdirs(d)] if split_layout else [(None, c) for c in top]
    rows, entries, class_sources = [], [], {}
    for split, d in class_dirs:
        for rel in guard.walk_images(d):
            entries.append((rel, guard.size(rel, d)))
            rows.append((rel, rel, d.name, split))
        class_sources.setdefault(d.name, d)
    if not rows:
        loose = [p for p in sorted(root.iterdir()) if p.suffix.lower() in common.IMAGE_EXTENSIONS]
        hint = "move each class's images into its own folder" if loose else "point --root at a folder of class folders"
        raise DcmlError(f"{root}: not a recognised folder layout (no images in <class>/ or <split>/<class>/ folders); {hint}")
    df = pd.DataFrame(rows, columns=["image_id", "path", "class_name", "split"])
    names = sorted(df["class_name"].unique())
    labels = {name: i for i, name in enumerate(names)}
    df["label"] = df["class_name"].map(labels).astype("int64")
    if split_mode == common.CLASS_DISJOINT:
        if len(names) < 2:
            raise DcmlError(f"{root}: a class-disjoint split needs at least 2 class folders, found {len(names)}; add classes")
        train, _ = common.class_halves(names)
        df["split"] = ["train" if n in train else "test" for n in df["class_name"]]
    return common.finish(df, dataset=NAME, root=root, split_mode=split_mode, max_per_class=max_per_class,
                         source=root, fingerprint_value=common.content_fingerprint(root, entries),
                         class_sources={labels[n]: d for n, d in class_sources.items()})
