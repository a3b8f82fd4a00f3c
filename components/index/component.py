"""KFP component: model + manifest -> a gallery index folder (optional step after evaluation)."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def index(
    manifest: Input[Dataset],
    model: Input[Model],
    index_type: str,
    target_recall: float,
    false_match_rate: float,
    batch_size: int,
    num_workers: int,
    seed: int,
    gallery: Output[Artifact],
    metrics: Output[Metrics],
):
    import os

    from components.index.stage import run
    from dcml.contracts.io import write_json

    record = run(
        out=gallery.path,
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        model=os.path.join(model.path, "model.pt"),
        index_type=index_type,
        target_recall=target_recall,
        false_match_rate=false_match_rate,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
    )
    # The record also travels as a metrics file, so the track step logs the index like an evaluation.
    os.makedirs(metrics.path, exist_ok=True)
    write_json(os.path.join(metrics.path, "metrics.json"), {"metrics": record["metrics"], "record": record})
    for key, value in record["metrics"].items():
        metrics.log_metric(key, float(value))
    from dcml.contracts.io import seal

    seal(gallery.path)
    seal(metrics.path)
