"""DeepFashion In-shop Clothes Retrieval (Liu et al. 2016).

``list_eval_partition.txt`` (in the root or in ``Eval/``): a count line, a
header line ``image_name item_id evaluation_status``, then one line per
image, e.g. ``img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train``.
Image paths are relative to the root (``img/...``) or, in the archive's own
layout, to ``Img/``. Items are the classes; train items are disjoint from the
query/gallery items, and each query searches the gallery.
"""

from __future__ import annotations

import re

import pandas as pd

from dcml.contracts.errors import DcmlError
from data_prep import common

NAME = "inshop"
DEFAULT_SPLIT_MODE = common.OFFICIAL
PARTITION = "list_eval_partition.txt"
STATUSES = ("train", "query", "gallery")
ITEM_ID = re.compile(r"^id_(\d+)$")


def read(root, split_mode: str = DEFAULT_SPLIT_MODE, max_per_class: int | None = None):
    """Read In-shop -> (manifest rows with train/query/gallery, metadata)."""
    common.check_split_mode(split_mode, NAME)
    given = common.require_root(root, NAME)
    root = common.find_marked_root(given, (PARTITION,), ("Eval/" + PARTITION,))
    if root is None:
        raise DcmlError(f"{given}: not a recognised inshop layout (expected {PARTITION} and img/, or Eval/{PARTITION} "
                        "and Img/img/); point --root at the In-shop folder")
    partition = root / PARTITION if (root / PARTITION).is_file() else root / "Eval" / PARTITION
    image_base = "Img/" if not (root / "img").is_dir() and (root / "Img").is_dir() else ""
    guard = common.RootGuard(root)
    rows, entries = [], []
    for lineno, line in common.read_lines(partition):
        parts = line.split()
        if lineno == 1 and len(parts) == 1 and parts[0].isdigit():  # image count
            continue
        if parts[:2] == ["image_name", "item_id"]:  # header
            continue
        if len(parts) != 3 or parts[2] not in STATUSES:
            raise DcmlError(f"{partition}:{lineno}: expected 'image_name item_id train|query|gallery', got {line!r}; "
                            "fix or remove the line")
        rel = image_base + guard.check_relative(parts[0], partition)
        entries.append((rel, guard.size(rel, partition)))
        rows.append((rel, rel, parts[1], parts[2]))
    if not rows:
        raise DcmlError(f"{partition}: lists no images; restore the In-shop annotation file")
    df = pd.DataFrame(rows, columns=["image_id", "path", "class_name", "split"])
    items = sorted(df["class_name"].unique())
    if all(ITEM_ID.match(item) for item in items):
        ids = {item: int(ITEM_ID.match(item).group(1)) for item in items}
    else:  # not the official id_NNNNNNNN names: number the sorted items
        ids = {item: i for i, item in enumerate(items)}
    df["label"] = df["class_name"].map(ids).astype("int64")
    return common.finish(df, dataset=NAME, root=root, split_mode=split_mode, max_per_class=max_per_class,
                         source=partition, fingerprint_value=common.content_fingerprint(root, entries, [partition]))
