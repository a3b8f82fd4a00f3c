"""Pictures of retrieval: query -> neighbour grids and per-class Recall@1 (PNG / CSV files).

:func:`retrieval_pictures` is what a tracking step calls with the embeddings
evaluation wrote and the manifest: it writes

* ``retrieval_grid.png``: 8 random and the 8 worst queries (fewest same-class
  images among their top 5, then the most similar wrong neighbour), each with
  its 5 nearest neighbours; neighbours framed green when of the query's
  class, red otherwise, the query framed blue; captions give class names and
  cosine similarities;
* ``per_class_recall.csv``: class, label, queries, Recall@1 per class, worst first;
* ``per_class_recall.png``: the histogram of per-class Recall@1.

Neighbours are those of evaluation (``dcml.algorithm.metrics.iter_nearest_neighbors``,
exact L2, each query's own row excluded; queries against the gallery when
the data has query / gallery splits). Only queries whose class has another
member in the reference take part (as in the metrics).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from dcml.contracts.errors import DcmlError

THUMB = 96  # thumbnail side in pixels
BORDER = 4  # frame width
GAP = 8
CAPTION = 42  # caption height under each thumbnail: two lines of class name, one of score
LABEL_WIDTH = 150  # left column with the section names
QUERY = (40, 90, 220)
SAME = (0, 160, 60)
DIFFERENT = (220, 30, 30)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


@dataclass
class GridRow:
    """One query and its neighbours (positions in the table the images come from)."""

    section: str
    query: int
    neighbours: list[int]
    same: list[bool]
    scores: list[float]


def neighbours(vectors: np.ndarray, labels: np.ndarray, splits: np.ndarray | None, k: int = 5):
    """(query rows, neighbour rows [q, k], cosine scores [q, k]) as evaluation sees them.

    Queries whose class has no other member in the reference are left out.
    """
    from dcml.algorithm.metrics import iter_nearest_neighbors

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if splits is not None and {"query", "gallery"} <= set(splits):
        queries, reference = np.flatnonzero(splits == "query"), np.flatnonzero(splits == "gallery")
        exclude_self = False
    else:
        queries = reference = np.arange(len(vectors))
        exclude_self = True
    ref_counts = pd.Series(labels[reference]).value_counts()
    others = ref_counts.reindex(labels[queries]).fillna(0).to_numpy() - int(exclude_self)
    queries = queries[others > 0]
    if len(queries) == 0:
        raise DcmlError("embeddings: no query has another image of its class; pictures need classes of 2+ images")
    k = min(k, len(reference) - int(exclude_self))
    if exclude_self:
        # The search over all rows drops each row's own index; keep the rows that are queries.
        found = np.concatenate([ids for _, ids in iter_nearest_neighbors(vectors, k, gpu=False)])[queries]
    else:
        found = reference[np.concatenate([ids for _, ids in iter_nearest_neighbors(vectors[queries], k,
                                                                                   vectors[reference], gpu=False)])]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    scores = np.einsum("qd,qkd->qk", unit[queries], unit[found])
    return queries, found, scores


def pick_rows(queries, found, scores, labels, random: int = 8, worst: int = 8, seed: int = 0) -> list[GridRow]:
    """``random`` queries drawn with ``seed`` and the ``worst`` ones (fewest same-class neighbours, then
    the highest-scoring wrong neighbour)."""
    same = labels[found] == labels[queries][:, None]
    wrong_score = np.where(same, -np.inf, scores).max(axis=1)
    order = np.lexsort((-wrong_score, same.sum(axis=1)))
    rng = np.random.default_rng(seed)
    chosen = [("random", i) for i in np.sort(rng.choice(len(queries), size=min(random, len(queries)), replace=False))]
    chosen += [("worst", i) for i in order[:worst]]
    return [GridRow(section, int(queries[i]), [int(j) for j in found[i]], [bool(s) for s in same[i]],
                    [float(s) for s in scores[i]]) for section, i in chosen]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_grid(rows: list[GridRow], load, class_names, title: str = "") -> tuple[Image.Image, list[dict]]:
    """The grid image and, per row, the boxes of its query and neighbour frames (x0, y0, x1, y1, inclusive).

    ``load(position)`` returns the PIL image of a table row; ``class_names[position]`` its class name.
    """
    cell = THUMB + 2 * BORDER
    k = max((len(r.neighbours) for r in rows), default=0)
    top = 34 if title else GAP
    width = LABEL_WIDTH + (k + 1) * (cell + GAP) + 2 * GAP
    height = top + len(rows) * (cell + CAPTION + GAP) + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    small, big = _font(11), _font(15)
    if title:
        draw.text((GAP, 8), title, fill=TEXT, font=big)
    layout = []
    for r, row in enumerate(rows):
        y = top + r * (cell + CAPTION + GAP)
        if r == 0 or rows[r - 1].section != row.section:
            draw.text((GAP, y + cell // 2 - 8), f"{row.section} queries", fill=TEXT, font=big)
        boxes = []
        for c, (position, colour, last_line) in enumerate(
                [(row.query, QUERY, "query")]
                + [(n, SAME if s else DIFFERENT, f"score {score:.3f}")
                   for n, s, score in zip(row.neighbours, row.same, row.scores)]):
            x = LABEL_WIDTH + GAP + c * (cell + GAP) + (GAP if c else 0)
            box = (x, y, x + cell - 1, y + cell - 1)
            draw.rectangle(box, fill=colour)
            canvas.paste(thumbnail(load(position)), (x + BORDER, y + BORDER))
            for line, text in enumerate(_fit(class_names[position], draw, small, cell) + [last_line]):
                draw.text((x, y + cell + 2 + 13 * line), text, fill=TEXT, font=small)
            boxes.append(box)
        layout.append({"query": boxes[0], "neighbours": boxes[1:]})
    return canvas, layout


def thumbnail(image: Image.Image) -> Image.Image:
    """A THUMB x THUMB RGB picture of ``image`` (aspect kept, letterboxed on white)."""
    image = image.convert("RGB")
    scale = THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    fitted = image.resize(size, Image.Resampling.BILINEAR)
    out = Image.new("RGB", (THUMB, THUMB), BACKGROUND)
    out.paste(fitted, ((THUMB - size[0]) // 2, (THUMB - size[1]) // 2))
    return out


def thumbnail_jpeg(image: Image.Image, side: int) -> bytes:
    """JPEG bytes of ``image`` shrunk to fit ``side`` x ``side`` (aspect kept)."""
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _fit(text: str, draw: ImageDraw.ImageDraw, font, width: int, lines: int = 2) -> list[str]:
    """``text`` broken into at most ``lines`` lines of at most ``width`` pixels (the last one cut with '…')."""
    out = []
    rest = text.replace("_", " ")
    while rest and len(out) < lines:
        n = len(rest)
        while n > 1 and draw.textlength(rest[:n], font=font) > width:
            n -= 1
        if len(out) == lines - 1 and n < len(rest):
            while n > 1 and draw.textlength(rest[:n - 1] + "…", font=font) > width:
                n -= 1
            out.append(rest[:n - 1] + "…")
            break
        out.append(rest[:n])
        rest = rest[n:].lstrip()
    return out or [""]


def per_class_recall(queries, found, labels, class_names) -> pd.DataFrame:
    """Per class: label, queries, Recall@1 (top neighbour of its class); worst first."""
    hit = labels[found[:, 0]] == labels[queries]
    table = pd.DataFrame({"class_name": np.asarray(class_names)[queries], "label": labels[queries], "hit": hit})
    out = table.groupby(["class_name", "label"], as_index=False).agg(queries=("hit", "size"), recall_at_1=("hit", "mean"))
    return out.sort_values(["recall_at_1", "class_name"]).reset_index(drop=True)


def recall_histogram(table: pd.DataFrame, dest: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcml.contracts.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(table["recall_at_1"], bins=np.linspace(0, 1, 11), color="#3b6fd8", edgecolor="white")
    mean = float(np.average(table["recall_at_1"], weights=table["queries"]))
    ax.axvline(mean, color="black", linestyle="--", label=f"overall R@1 {mean:.3f}")
    ax.set(title=title or f"Recall@1 per class ({len(table)} classes)", xlabel="Recall@1 of the class",
           ylabel="classes", xlim=(0, 1))
    ax.legend()
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return dest


def retrieval_pictures(embeddings: str | os.PathLike, manifest: str | os.PathLike, out_dir: str | os.PathLike,
                       random: int = 8, worst: int = 8, k: int = 5, seed: int = 0) -> dict[str, Path]:
    """Write the retrieval grid, the per-class Recall@1 table and its histogram into ``out_dir``.

    ``embeddings``: the Parquet `dcml evaluate --embeddings-out` writes (image_id, label, split,
    embedding); ``manifest``: the manifest those images come from. Returns
    {"grid": ..png, "per_class_csv": ..csv, "per_class_png": ..png}.
    """
    from dcml.algorithm.data import ManifestImageDataset
    from dcml.contracts import manifest as manifest_lib
    from dcml.contracts.io import atomic_path, read_vectors

    table, vectors, _ = read_vectors(embeddings)
    man = manifest_lib.read(manifest)
    rows = man.df.set_index(man.df["image_id"].astype(str)).reindex(table["image_id"].astype(str))
    if rows["label"].isna().any():
        missing = table["image_id"][rows["label"].isna().to_numpy()].iloc[0]
        raise DcmlError(f"{embeddings}: image {missing!r} is not in {manifest}; pass the manifest the embeddings "
                        "were computed from")
    rows = rows.reset_index(drop=True)
    labels = rows["label"].to_numpy(dtype=np.int64)
    class_names = rows["class_name"].astype(str).tolist()
    splits = table["split"].astype(str).to_numpy() if "split" in table.columns else None
    queries, found, scores = neighbours(vectors, labels, splits, k)
    picked = pick_rows(queries, found, scores, labels, random, worst, seed)
    images = ManifestImageDataset(man, rows, transform=None)
    per_class = per_class_recall(queries, found, labels, class_names)
    overall = float(np.mean(labels[found[:, 0]] == labels[queries]))
    grid, _ = draw_grid(picked, images.load_image, class_names,
                        title=f"{man.dataset}: {len(queries)} queries, Recall@1 {overall:.3f}; "
                              f"frames: blue query, green same class, red other class")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"grid": out_dir / "retrieval_grid.png", "per_class_csv": out_dir / "per_class_recall.csv",
             "per_class_png": out_dir / "per_class_recall.png"}
    with atomic_path(paths["grid"]) as tmp:
        grid.save(tmp, format="PNG")
    with atomic_path(paths["per_class_csv"]) as tmp:
        per_class.to_csv(tmp, index=False, float_format="%.4f")
    recall_histogram(per_class, paths["per_class_png"])
    return paths
