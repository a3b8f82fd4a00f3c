"""Stage 3: faiss k-means of the training images' vectors -> cluster assignments.

``cluster_grouping="random"`` writes K random groups of whole classes instead
(the control without cluster structure; the features are read only for the
training rows and their labels)."""

from __future__ import annotations

import click
import numpy as np
import pandas as pd
import pyarrow as pa

from dcml.contracts import events
from dcml.contracts.io import check_writable
from dcml.algorithm.clustering import (KMeansResult, cluster_sizes, drop_singletons, kmeans, match_to_previous,
                                       random_class_groups)
from dcml.contracts import params
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_parquet_meta, read_vectors, write_parquet
from dcml.contracts.records import StageTimer

# Parameters this stage takes (dcml.contracts.params); num_clusters is its --k.
PARAMS = ("num_clusters", "niter", "nredo", "seed", "cluster_grouping")
RENAME = params.STAGE_NAMES["cluster"]


def _vectors(path):
    meta = read_parquet_meta(path)
    column = meta.get("vector_column")
    if column is None:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        column = next((c for c in ("feature", "embedding") if c in names), None)
        if column is None:
            raise DcmlError(f"{path}: no 'feature' or 'embedding' column; pass the output of `dcml extract`")
    rows, vectors, meta = read_vectors(path, column)
    for col in ("image_id", "label"):
        if col not in rows.columns:
            raise DcmlError(f"{path}: no '{col}' column; pass the output of `dcml extract`")
    if "split" in rows.columns:
        train = (rows["split"] == "train").to_numpy()
        if not train.any():
            raise DcmlError(f"{path}: no rows with split 'train'; extract features of a manifest with a training split")
        rows, vectors = rows[train].reset_index(drop=True), vectors[train]
    return rows, vectors, column


def _previous(path, image_ids: pd.Series, k: int) -> np.ndarray:
    """The previous assignment aligned to ``image_ids`` (-1 where it has none)."""
    try:
        prev = pd.read_parquet(path, columns=["image_id", "cluster"])
    except Exception as exc:
        raise DcmlError(f"{path}: not a cluster assignment table ({' '.join(str(exc).split())[:160]}); pass an output of `dcml cluster`") from None
    prev_k = read_parquet_meta(path).get("k")
    if prev_k is not None and int(prev_k) != k:
        raise DcmlError(f"{path}: previous clustering has k={prev_k}, this one k={k}; match only clusterings with the same k")
    prev = prev.drop_duplicates("image_id")
    by_id = pd.Series(prev["cluster"].to_numpy(), index=prev["image_id"].astype(str))
    aligned = by_id.reindex(image_ids.astype(str)).fillna(-1).to_numpy(dtype=np.int64)
    if not (aligned >= 0).any():
        raise DcmlError(f"{path}: shares no image_id with the features; pass the clusters of the same training images")
    return aligned


def _as_clusters(vectors: np.ndarray, assignments: np.ndarray, k: int, normalize: bool) -> KMeansResult:
    """Given groups as a clustering: their centroids and inertia (comparable with k-means')."""
    from dcml.algorithm.clustering import l2_normalize

    x = l2_normalize(vectors) if normalize else np.asarray(vectors, np.float32)
    centroids = np.stack([x[assignments == c].mean(axis=0) for c in range(k)]).astype(np.float32)
    inertia = float(((x - centroids[assignments]) ** 2).sum())
    return KMeansResult(assignments, centroids, inertia)


def run(features, out, previous=None, normalize=True, **hyper) -> dict:
    """Cluster the training rows of a feature (or embedding) table into ``k`` clusters.

    Writes Parquet ``image_id, cluster`` for every training row; cluster -1
    marks an image whose class has no other image in its cluster (it cannot
    form a positive pair). ``previous``: an earlier assignment whose ids the
    new clusters are matched to (Hungarian on the overlap). ``hyper``: the
    parameters in ``PARAMS`` (``k`` is the pipeline's num_clusters).
    """
    hp = params.resolve(PARAMS, hyper, "cluster", rename=RENAME)
    check_writable(out)
    k, niter, nredo, seed = hp["k"], hp["niter"], hp["nredo"], hp["seed"]
    timer = StageTimer("cluster", {**hp, "normalize": normalize})
    rows, vectors, column = _vectors(features)
    if len(rows) >= k > rows["label"].nunique():  # a cluster holds whole classes: K clusters need K classes
        raise DcmlError(f"k={k}: {features} holds only {rows['label'].nunique()} training classes; use k <= "
                        f"{rows['label'].nunique()}")
    random_groups = hp["cluster_grouping"] == "random"
    try:
        if random_groups:
            result = _as_clusters(vectors, random_class_groups(rows["label"].to_numpy(), k, int(seed)), k,
                                  bool(normalize))
        else:
            result = kmeans(vectors, k, niter=int(niter), nredo=int(nredo), seed=int(seed), normalize=bool(normalize))
    except DcmlError as exc:
        raise DcmlError(f"{features}: {exc}") from None
    assignments = result.assignments
    if previous is not None and not random_groups:
        assignments = match_to_previous(_previous(previous, rows["image_id"], k), assignments, k)
    raw_sizes = cluster_sizes(assignments, k)
    assignments = drop_singletons(assignments, rows["label"].to_numpy())
    sizes = cluster_sizes(assignments, k)
    metrics = {"inertia": result.inertia, "left_out": int((assignments < 0).sum()),
               "min_size": min(sizes), "max_size": max(sizes),
               "classes_per_cluster": [int(rows["label"][assignments == c].nunique()) for c in range(k)]}
    record = timer.finish(inputs={"features": features, "previous": previous}, metrics=metrics,
                          extra={"sizes": sizes, "sizes_before_singletons": raw_sizes, "vector_column": column})
    table = pa.table({"image_id": pa.array(rows["image_id"].astype(str)), "cluster": pa.array(assignments, pa.int64())})
    write_parquet(out, table, {"k": k, "grouping": hp["cluster_grouping"], "niter": int(niter), "nredo": int(nredo), "seed": int(seed),
                               "normalize": bool(normalize), "inertia": result.inertia, "sizes": sizes,
                               "vector_column": column, "record": record})
    events.emit("summary", text=f"K={k}: {min(sizes)}-{max(sizes)} images per cluster, {metrics['left_out']} left out")
    return record


@click.command("cluster")
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Feature/embedding Parquet (dcml extract).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output clusters Parquet.")
@params.click_options(*PARAMS, rename=RENAME)
@click.option("--previous", type=click.Path(dir_okay=False), help="Earlier clusters to match the new ids to.")
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2-normalise the vectors first.")
def cli(**kwargs):
    """Faiss k-means of the training images into K clusters."""
    record = run(**kwargs)
    click.echo(f"wrote {kwargs['out']}: sizes {record['extra']['sizes']}, inertia {record['metrics']['inertia']:.4g}")
