"""KFP component: model + manifest -> retrieval metrics and test embeddings."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def evaluate(
    manifest: Input[Dataset],
    model: Input[Model],
    ks: str,
    batch_size: int,
    num_workers: int,
    metrics: Output[Metrics],
    embeddings: Output[Dataset],
):
    import json
    import os

    from components.evaluate.stage import run

    os.makedirs(metrics.path, exist_ok=True)
    os.makedirs(embeddings.path, exist_ok=True)
    out = os.path.join(metrics.path, "metrics.json")
    run(
        out=out,
        model=os.path.join(model.path, "model.pt"),
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        ks=tuple(int(k) for k in ks.split(",")),
        embeddings_out=os.path.join(embeddings.path, "embeddings.parquet"),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    # Also shown by the Kubeflow UI.
    for key, value in json.load(open(out))["metrics"].items():
        metrics.log_metric(key, float(value))
    from dcml.contracts.io import seal

    seal(metrics.path)
    seal(embeddings.path)
