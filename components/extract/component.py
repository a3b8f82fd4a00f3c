"""KFP components: manifest -> backbone features (Dataset dir with features.parquet)
and, in the fast mode, the cache of the frozen lower part (Dataset dir)."""

from kfp.dsl import Dataset, Input, Model, Output


def extract(
    manifest: Input[Dataset],
    backbone: str,
    weights: str,
    image_size: int,
    train_blocks: int,
    fast_views: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    features: Output[Dataset],
    activations: Output[Dataset],
):
    import os

    from components.extract import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(features.path, exist_ok=True)
    stage.run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(features.path, "features.parquet"),
        activations_out=activations.path,
        splits=("train",),
        score=True,  # the run's "pretrained features" baseline (val and test)
        **hyper,
    )
    from dcml.contracts.io import seal

    seal(features.path)
    seal(activations.path)


def extract_with_model(
    manifest: Input[Dataset],
    model: Input[Model],
    batch_size: int,
    num_workers: int,
    features: Output[Dataset],
):
    """Features of a trained model's backbone: re-clustering between rounds."""
    import os

    from components.extract import stage

    os.makedirs(features.path, exist_ok=True)
    stage.run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(features.path, "features.parquet"),
        model=os.path.join(model.path, "model.pt"),
        batch_size=batch_size,
        num_workers=num_workers,
        splits=("train",),
    )
    from dcml.contracts.io import seal

    seal(features.path)
