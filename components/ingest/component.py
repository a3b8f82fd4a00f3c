"""KFP component: dataset -> manifest (Dataset artifact dir with manifest.parquet)."""

from kfp.dsl import Dataset, Output


def ingest(
    dataset: str,
    data_root: str,
    split_mode: str,
    max_per_class: int,
    check_images: bool,
    val_fraction: float,
    data_version: str,
    manifest: Output[Dataset],
):
    import os

    from components.ingest import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(manifest.path, exist_ok=True)
    stage.run(out=os.path.join(manifest.path, "manifest.parquet"), **hyper)
    from dcml.contracts.io import seal

    seal(manifest.path)
