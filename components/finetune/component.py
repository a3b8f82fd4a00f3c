"""KFP components: merge the sub-models and fine-tune the whole embedding on all data."""

from typing import List

from kfp.dsl import Dataset, Input, Model, Output


def merge_finetune(
    manifest: Input[Dataset],
    checkpoints: Input[List[Model]],
    merge: str,
    loss: str,
    margin: float,
    miner: str,
    classes_per_batch: int,
    images_per_class: int,
    lr_backbone: float,
    lr_embedding: float,
    weight_decay: float,
    epochs: int,
    eval_every: int,
    seed: int,
    num_workers: int,
    model: Output[Model],
):
    """Fan-in of the parallel workers (dsl.Collected)."""
    import os

    from components.finetune.stage import run

    os.makedirs(model.path, exist_ok=True)
    run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        checkpoints=[os.path.join(c.path, "model.pt") for c in checkpoints],
        out=os.path.join(model.path, "model.pt"),
        merge=merge, loss=loss, margin=margin if margin > 0 else None, miner=miner,
        classes_per_batch=classes_per_batch, images_per_class=images_per_class,
        lr_backbone=lr_backbone, lr_embedding=lr_embedding, weight_decay=weight_decay,
        epochs=epochs, eval_every=eval_every, seed=seed, num_workers=num_workers,
    )


def finetune(
    manifest: Input[Dataset],
    checkpoint: Input[Model],
    loss: str,
    margin: float,
    miner: str,
    classes_per_batch: int,
    images_per_class: int,
    lr_backbone: float,
    lr_embedding: float,
    weight_decay: float,
    epochs: int,
    eval_every: int,
    seed: int,
    num_workers: int,
    model: Output[Model],
):
    """Shared mode: the single trained model, fine-tuned with K=1."""
    import os

    from components.finetune.stage import run

    os.makedirs(model.path, exist_ok=True)
    run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        checkpoints=[os.path.join(checkpoint.path, "model.pt")],
        out=os.path.join(model.path, "model.pt"),
        loss=loss, margin=margin if margin > 0 else None, miner=miner,
        classes_per_batch=classes_per_batch, images_per_class=images_per_class,
        lr_backbone=lr_backbone, lr_embedding=lr_embedding, weight_decay=weight_decay,
        epochs=epochs, eval_every=eval_every, seed=seed, num_workers=num_workers,
    )
