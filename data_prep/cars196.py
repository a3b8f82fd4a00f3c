"""Stanford Cars 196 (Krause et al. 2013).

Two layouts:
- official: ``cars_annos.mat`` (struct array ``annotations`` with
  ``relative_im_path``, bbox, ``class`` 1..196, ``test``; cell array
  ``class_names``) next to ``car_ims/``;
- class folders: ``NNN.Class_Name/*.jpg`` with NNN the official class id
  (the layout of ../shared/data/cars196).

Metric learning ignores the classification train/test flag and splits by
class: classes 1-98 train, 99-196 test (the official protocol is already
class-disjoint, so both split modes give the same split).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from dcml.contracts.errors import DcmlError
from data_prep import common

NAME = "cars196"
DEFAULT_SPLIT_MODE = common.OFFICIAL
LAST_TRAIN_CLASS = 98
CLASS_DIR = re.compile(r"^(\d+)\.(.+)$")


def _split(labels: pd.Series) -> pd.Series:
    return np.where(labels <= LAST_TRAIN_CLASS, "train", "test")


def _read_official(root: Path, guard: common.RootGuard):
    mat_path = root / "cars_annos.mat"
    from scipy.io import loadmat

    try:
        mat = loadmat(mat_path, squeeze_me=True)
        annos = np.atleast_1d(mat["annotations"])
        rel_paths = [str(p) for p in annos["relative_im_path"]]
        labels = [int(c) for c in annos["class"]]
    except Exception as exc:  # scipy raises several types for bad .mat files
        raise DcmlError(f"{mat_path}: not a readable cars_annos.mat ({type(exc).__name__}: {exc}); "
                        "restore the file from the Stanford Cars devkit") from None
    names = [str(n) for n in np.atleast_1d(mat.get("class_names", np.array([], dtype=object)))]
    rows, entries = [], []
    for rel, label in zip(rel_paths, labels):
        if label < 1:
            raise DcmlError(f"{mat_path}: class {label} for {rel!r} is not a class id (1..196); restore the original file")
        rel = guard.check_relative(rel, mat_path)
        entries.append((rel, guard.size(rel, mat_path)))
        name = names[label - 1] if label <= len(names) else f"class_{label:03d}"
        rows.append((rel, rel, label, name))
    return rows, entries, [mat_path], mat_path, None


def _read_class_folders(root: Path, guard: common.RootGuard):
    dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    matched = [(d, CLASS_DIR.match(d.name)) for d in dirs]
    odd = [d for d, m in matched if m is None]
    if odd:
        raise DcmlError(f"{odd[0]}: folder name is not 'NNN.Class_Name' (NNN = class id); "
                        "rename it or move it out of the dataset root")
    rows, entries, class_dirs = [], [], {}
    for d, m in matched:
        label, name = int(m.group(1)), m.group(2)
        if label in class_dirs:
            raise DcmlError(f"{d}: class id {label:03d} is also used by {class_dirs[label].name}; "
                            "give each class folder its own NNN prefix")
        class_dirs[label] = d
        for rel in guard.walk_images(d):
            entries.append((rel, guard.size(rel, d)))
            rows.append((rel, rel, label, name))
    return rows, entries, [], root, class_dirs


def read(root, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None):
    """Read Stanford Cars from either layout -> (manifest rows, metadata)."""
    common.check_split_mode(split_mode, NAME)
    given = common.require_root(root, NAME)
    root = common.find_marked_root(given, ("cars_annos.mat",)) or given
    guard = common.RootGuard(root)
    if (root / "cars_annos.mat").is_file():
        rows, entries, annotations, source, class_dirs = _read_official(root, guard)
    elif any(d.is_dir() and CLASS_DIR.match(d.name) for d in root.iterdir()):
        rows, entries, annotations, source, class_dirs = _read_class_folders(root, guard)
    else:
        raise DcmlError(f"{given}: not a recognised cars196 layout (expected cars_annos.mat with car_ims/, "
                        "or class folders named NNN.Class_Name); point --root at the folder that holds them")
    if not rows:
        raise DcmlError(f"{source}: lists no images; point --root at a complete Stanford Cars copy")
    df = pd.DataFrame(rows, columns=["image_id", "path", "label", "class_name"])
    df["split"] = _split(df["label"])
    return common.finish(df, dataset=NAME, root=root, split_mode=split_mode, max_per_class=max_per_class,
                         source=source, fingerprint_value=common.content_fingerprint(root, entries, annotations),
                         class_sources=class_dirs)
