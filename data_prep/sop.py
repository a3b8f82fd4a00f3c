"""Stanford Online Products (Oh Song et al. 2016), official layout:

    Ebay_train.txt, Ebay_test.txt   header "image_id class_id super_class_id path"
    <super_class>_final/<product>_<n>.JPG

11,318 training classes (59,551 images) and 11,316 test classes (60,502
images): the official split is class-disjoint.
"""

from __future__ import annotations

import pandas as pd

from dcml.contracts.errors import DcmlError
from data_prep import common

NAME = "sop"
DEFAULT_SPLIT_MODE = common.OFFICIAL
FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


def read(root, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None):
    """Read Stanford Online Products -> (manifest rows, metadata)."""
    common.check_split_mode(split_mode, NAME)
    given = common.require_root(root, NAME)
    root = common.find_marked_root(given, tuple(FILES.values()))
    if root is None:
        raise DcmlError(f"{given}: not a recognised sop layout (expected Ebay_train.txt and Ebay_test.txt next to "
                        "the *_final/ image folders); point --root at the Stanford_Online_Products folder")
    guard = common.RootGuard(root)
    rows, entries, super_names, class_files = [], [], {}, {}
    for split, filename in FILES.items():
        path = root / filename
        for lineno, line in common.read_lines(path):
            parts = line.split(maxsplit=3)
            if parts[0] == "image_id":  # header
                continue
            if len(parts) != 4 or not (parts[1].isdigit() and parts[2].isdigit()):
                raise DcmlError(f"{path}:{lineno}: expected 'image_id class_id super_class_id path', got {line!r}; "
                                "fix or remove the line")
            rel = guard.check_relative(parts[3], path)
            entries.append((rel, guard.size(rel, path)))
            label = int(parts[1])
            # SOP classes have no names: name them after their super-class folder.
            folder = rel.split("/")[0] if "/" in rel else "product"
            super_names.setdefault(label, folder.removesuffix("_final"))
            class_files.setdefault(label, path)
            rows.append((rel, rel, label, f"{super_names[label]}_{label}", split))
    if not rows:
        raise DcmlError(f"{root / FILES['train']}: lists no images; restore the SOP annotation files")
    df = pd.DataFrame(rows, columns=["image_id", "path", "label", "class_name", "split"])
    annotations = [root / f for f in FILES.values()]
    return common.finish(df, dataset=NAME, root=root, split_mode=split_mode, max_per_class=max_per_class,
                         source=root / FILES["train"], fingerprint_value=common.content_fingerprint(root, entries, annotations),
                         class_sources=class_files)
