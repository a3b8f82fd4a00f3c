"""KFP component: k-means weight quantisation of the trained model."""

from kfp.dsl import Dataset, Input, Model, Output


def compress(
    manifest: Input[Dataset],
    model: Input[Model],
    bits: int,
    method: str,
    loss: str,
    seed: int,
    compressed: Output[Model],
    importance_batches: int = 20,
    finetune_steps: int = 0,
):
    import os

    from components.compress.stage import run

    os.makedirs(compressed.path, exist_ok=True)
    run(
        model=os.path.join(model.path, "model.pt"),
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(compressed.path, "model.pt"),
        bits=bits, method=method, loss=loss, seed=seed,
        importance_batches=importance_batches, finetune_steps=finetune_steps,
    )
    from dcml.contracts.io import seal

    seal(compressed.path)
