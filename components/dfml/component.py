"""KFP component: DFML training (factorised backbone + router), a normal checkpoint out."""

from kfp.dsl import Dataset, Input, Model, Output


def train_dfml(
    manifest: Input[Dataset],
    backbone: str,
    weights: str,
    image_size: int,
    embedding_dim: int,
    groups: int,
    loss: str,
    margin: float,
    classes_per_batch: int,
    images_per_class: int,
    lr_backbone: float,
    lr_embedding: float,
    lr_proxies: float,
    lr_router: float,
    weight_decay: float,
    epochs: int,
    eval_every: int,
    freeze_bn: bool,
    seed: int,
    num_workers: int,
    model: Output[Model],
):
    import os

    from components.dfml.stage import run

    os.makedirs(model.path, exist_ok=True)
    run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(model.path, "model.pt"),
        backbone=backbone, weights=weights, image_size=image_size, embedding_dim=embedding_dim,
        groups=groups, loss=loss, margin=margin if margin > 0 else None,
        classes_per_batch=classes_per_batch, images_per_class=images_per_class,
        lr_backbone=lr_backbone, lr_embedding=lr_embedding, lr_proxies=lr_proxies,
        lr_router=lr_router, weight_decay=weight_decay, epochs=epochs, eval_every=eval_every,
        freeze_bn=freeze_bn, seed=seed, num_workers=num_workers,
    )
