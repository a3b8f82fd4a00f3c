"""KFP component: features -> cluster assignments; returns the cluster ids to fan out over."""

from typing import List

from kfp.dsl import Dataset, Input, Output


def cluster(
    features: Input[Dataset],
    num_clusters: int,
    niter: int,
    nredo: int,
    seed: int,
    cluster_grouping: str,
    clusters: Output[Dataset],
) -> List[int]:
    import os

    from components.cluster import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(clusters.path, exist_ok=True)
    stage.run(
        features=os.path.join(features.path, "features.parquet"),
        out=os.path.join(clusters.path, "clusters.parquet"),
        **hyper,
    )
    from dcml.contracts.io import seal

    seal(clusters.path)
    return list(range(num_clusters))
