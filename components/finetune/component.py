"""KFP components: merge the sub-models and fine-tune the whole embedding on all data.

Hyper-parameters are named as in dcml.contracts.params (tests check these
signatures against it); ``finetune_epochs`` is the stage's ``epochs``.
"""

from typing import List

from kfp.dsl import Dataset, Input, Model, Output


def merge_finetune(
    manifest: Input[Dataset],
    checkpoints: Input[List[Model]],
    activations: Input[Dataset],
    merge: str,
    finetune_epochs: int,
    loss: str,
    margin: float,
    miner: str,
    classes_per_batch: int,
    images_per_class: int,
    lr_backbone: float,
    lr_embedding: float,
    lr_proxies: float,
    weight_decay: float,
    batches_per_epoch: int,
    head_init: str,
    warmup_epochs: int,
    schedule: str,
    select_on: str,
    patience: int,
    eval_every: int,
    seed: int,
    num_workers: int,
    model: Output[Model],
):
    """Fan-in of the parallel workers (dsl.Collected)."""
    import os

    from components.finetune import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    stage.run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        checkpoints=[os.path.join(c.path, "model.pt") for c in checkpoints],
        activations=activations.path,
        out=os.path.join(model.path, "model.pt"),
        merge=merge,
        **hyper,
    )
    from dcml.contracts.io import seal

    seal(model.path)


def finetune(
    manifest: Input[Dataset],
    checkpoint: Input[Model],
    activations: Input[Dataset],
    finetune_epochs: int,
    loss: str,
    margin: float,
    miner: str,
    classes_per_batch: int,
    images_per_class: int,
    lr_backbone: float,
    lr_embedding: float,
    lr_proxies: float,
    weight_decay: float,
    batches_per_epoch: int,
    head_init: str,
    warmup_epochs: int,
    schedule: str,
    select_on: str,
    patience: int,
    eval_every: int,
    seed: int,
    num_workers: int,
    model: Output[Model],
):
    """Shared mode: the single trained model, fine-tuned with K=1."""
    import os

    from components.finetune import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    stage.run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        checkpoints=[os.path.join(checkpoint.path, "model.pt")],
        activations=activations.path,
        out=os.path.join(model.path, "model.pt"),
        **hyper,
    )
    from dcml.contracts.io import seal

    seal(model.path)
