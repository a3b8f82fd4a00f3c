"""Any image collection in class folders.

Two layouts:
- flat: ``<root>/<class>/**/<image>``;
- split: ``<root>/<split>/<class>/**/<image>`` with split folders train/test
  (or train/query/gallery).

Split modes: ``class-disjoint`` (the default) puts the first half of the
sorted classes in train and the rest in test; ``official`` keeps the split
folders of the split layout. Labels number the sorted class names from 0.

:func:`unsplit` lists the images of either layout with their class and
nothing else (no splits, any number of classes, any number of images per
class; images lying in the root itself take the root's name as their class):
what ``dcml index --append --folder`` adds to an index.
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


def _class_folders(root: Path) -> tuple[bool, list[tuple[str | None, Path]]]:
    """(split layout?, [(split folder or None, class folder)])."""
    top = _subdirs(root)
    split_layout = bool(top) and all(d.name in SPLITS for d in top)
    return split_layout, [(d.name, c) for d in top for c in _subdirs(d)] if split_layout else [(None, c) for c in top]


def _loose_images(root: Path) -> list[Path]:
    """Image files lying in ``root`` itself (not in a class folder)."""
    return [p for p in sorted(root.iterdir()) if p.suffix.lower() in common.IMAGE_EXTENSIONS and p.is_file()
            and not p.name.startswith(".")]


def unsplit(root) -> pd.DataFrame:
    """Every image of ``root`` with its class, no split carved and no class size checked: ``path``
    (absolute) and ``class_name`` (its class folder's name; ``root``'s own name for images lying in it)."""
    if root is None or not Path(root).is_dir():
        raise DcmlError(f"{root}: no such folder; pass a folder of images (class folders, or images lying in it)")
    root = common.require_root(root, NAME)
    guard = common.RootGuard(root)
    _, class_dirs = _class_folders(root)
    rows = [(str(root / rel), d.name) for _, d in class_dirs for rel in guard.walk_images(d)]
    rows += [(str(p), root.resolve().name) for p in _loose_images(root)]
    if not rows:
        raise DcmlError(f"{root}: no image files ({', '.join(sorted(common.IMAGE_EXTENSIONS))}) in it or its class "
                        "folders; pass a folder of images")
    return pd.DataFrame(rows, columns=["path", "class_name"])


def read(root, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None):
    """Read class folders -> (manifest rows, metadata)."""
    common.check_split_mode(split_mode, NAME)
    root = common.require_root(root, NAME)
    guard = common.RootGuard(root)
    split_layout, class_dirs = _class_folders(root)
    if split_mode == common.OFFICIAL and not split_layout:
        raise DcmlError(f"{root}: has no train/ and test/ split folders, so there is no official split; "
                        "use --split-mode class-disjoint or arrange the classes under train/ and test/")
    rows, entries, class_sources = [], [], {}
    for split, d in class_dirs:
        for rel in guard.walk_images(d):
            entries.append((rel, guard.size(rel, d)))
            rows.append((rel, rel, d.name, split))
        class_sources.setdefault(d.name, d)
    if not rows:
        hint = ("move each class's images into its own folder" if _loose_images(root)
                else "point --root at a folder of class folders")
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
