"""KFP component: DFML training (factorised backbone + router), a normal checkpoint out.

Hyper-parameters are named as in dcml.contracts.params (tests check this
signature against it); ``dfml_groups`` is the stage's ``groups``.
"""

from kfp.dsl import Dataset, Input, Model, Output


def train_dfml(
    manifest: Input[Dataset],
    backbone: str,
    weights: str,
    image_size: int,
    embedding_dim: int,
    freeze_bn: str,
    dfml_groups: int,
    lr_router: float,
    loss: str,
    margin: float,
    miner: str,
    classes_per_batch: int,
    images_per_class: int,
    lr_backbone: float,
    lr_embedding: float,
    lr_proxies: float,
    weight_decay: float,
    epochs: int,
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
    import os

    from components.dfml import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    stage.run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(model.path, "model.pt"),
        **hyper,
    )
    from dcml.contracts.io import seal

    seal(model.path)
