"""KFP components: subspace training, shared (the paper) or one parallel worker."""

from kfp.dsl import Dataset, Input, Model, Output


def train_shared(
    manifest: Input[Dataset],
    clusters: Input[Dataset],
    backbone: str,
    weights: str,
    image_size: int,
    embedding_dim: int,
    loss: str,
    margin: float,
    miner: str,
    classes_per_batch: int,
    images_per_class: int,
    lr_backbone: float,
    lr_embedding: float,
    weight_decay: float,
    epochs: int,
    recluster_every: int,
    eval_every: int,
    freeze_bn: bool,
    seed: int,
    num_workers: int,
    model: Output[Model],
):
    """K learners over one shared backbone, re-clustering every R epochs."""
    import os

    from components.train.stage import run

    os.makedirs(model.path, exist_ok=True)
    run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        clusters=os.path.join(clusters.path, "clusters.parquet"),
        out=os.path.join(model.path, "model.pt"),
        mode="shared",
        backbone=backbone, weights=weights, image_size=image_size, embedding_dim=embedding_dim,
        loss=loss, margin=margin if margin > 0 else None, miner=miner,
        classes_per_batch=classes_per_batch, images_per_class=images_per_class,
        lr_backbone=lr_backbone, lr_embedding=lr_embedding, weight_decay=weight_decay,
        epochs=epochs, recluster_every=recluster_every, eval_every=eval_every,
        freeze_bn=freeze_bn, seed=seed, num_workers=num_workers,
    )


def train_worker(
    manifest: Input[Dataset],
    clusters: Input[Dataset],
    cluster_id: int,
    backbone: str,
    weights: str,
    image_size: int,
    embedding_dim: int,
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
    freeze_bn: bool,
    freeze_backbone: bool,
    seed: int,
    num_workers: int,
    model: Output[Model],
    init: Input[Model] = None,
):
    """One cluster's sub-model: its own backbone copy and its embedding slice."""
    import os

    from components.train.stage import run

    os.makedirs(model.path, exist_ok=True)
    run(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        clusters=os.path.join(clusters.path, "clusters.parquet"),
        out=os.path.join(model.path, "model.pt"),
        mode="worker", cluster_id=int(cluster_id),
        init=os.path.join(init.path, "model.pt") if init is not None else None,
        backbone=backbone, weights=weights, image_size=image_size, embedding_dim=embedding_dim,
        loss=loss, margin=margin if margin > 0 else None, miner=miner,
        classes_per_batch=classes_per_batch, images_per_class=images_per_class,
        lr_backbone=lr_backbone, lr_embedding=lr_embedding, weight_decay=weight_decay,
        epochs=epochs, eval_every=eval_every, freeze_bn=freeze_bn,
        freeze_backbone=freeze_backbone, seed=seed, num_workers=num_workers,
    )
