"""KFP component: manifest -> backbone features (Dataset dir with features.parquet)."""

from kfp.dsl import Dataset, Input, Model, Output


def extract(
    manifest: Input[Dataset],
    backbone: str,
    weights: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    features: Output[Dataset],
):
    import os

    from components.extract.stage import run

    os.makedirs(features.path, exist_ok=True)
    run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(features.path, "features.parquet"),
        seed=seed,
        backbone=backbone,
        weights=weights,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        splits=("train",),
    )


def extract_with_model(
    manifest: Input[Dataset],
    model: Input[Model],
    batch_size: int,
    num_workers: int,
    features: Output[Dataset],
):
    """Features of a trained model's backbone: re-clustering between rounds."""
    import os

    from components.extract.stage import run

    os.makedirs(features.path, exist_ok=True)
    run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(features.path, "features.parquet"),
        model=os.path.join(model.path, "model.pt"),
        batch_size=batch_size,
        num_workers=num_workers,
        splits=("train",),
    )
