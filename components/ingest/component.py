"""KFP component: dataset -> manifest (Dataset artifact dir with manifest.parquet)."""

from kfp.dsl import Dataset, Output


def ingest(
    dataset: str,
    data_root: str,
    split_mode: str,
    max_per_class: int,
    check_images: bool,
    manifest: Output[Dataset],
):
    import os

    from components.ingest.stage import run

    os.makedirs(manifest.path, exist_ok=True)
    run(
        dataset=dataset,
        root=data_root or None,
        out=os.path.join(manifest.path, "manifest.parquet"),
        split_mode=split_mode,
        check_images=check_images,
        max_per_class=max_per_class or None,
    )
