"""KFP components: subspace training, shared (the paper) or one parallel worker.

Hyper-parameters are named as in dcml.contracts.params (tests check these
signatures against it); each is passed on to the stage under that name.
``gpus_per_task`` is the stage's ``nproc`` (data-parallel processes). With
``num_nodes > 1`` (``dcml compile --nodes N``) the task is a launcher: the
stage runs as a Kubeflow TrainJob (dcml.trainjob) configured from
``trainjob``, the KFP workspace and the task's own ``task_config``.
"""

from kfp.dsl import Dataset, Input, Model, Output, TaskConfig


def train_shared(
    manifest: Input[Dataset],
    clusters: Input[Dataset],
    activations: Input[Dataset],
    backbone: str,
    weights: str,
    image_size: int,
    embedding_dim: int,
    train_blocks: int,
    freeze_bn: str,
    recluster_every: int,
    whole_embedding_after: float,
    embedding_slices: bool,
    embedding_masks: bool,
    mask_orthogonality: float,
    cluster_grouping: str,
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
    gpus_per_task: int,
    model: Output[Model],
    num_nodes: int = 1,
    trainjob: dict = {},
    workspace_path: str = "",
    task_config: TaskConfig = None,
):
    """K learners over one shared backbone, re-clustering every R epochs."""
    import os

    from components.train import stage

    hyper = {k: v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    args = dict(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        clusters=os.path.join(clusters.path, "clusters.parquet"),
        activations=activations.path,
        out=os.path.join(model.path, "model.pt"),
        mode="shared", nproc=gpus_per_task,
        **hyper,
    )
    from dcml.trainjob import run_training  # here, or a TrainJob over num_nodes nodes

    run_training("components.train.stage:run", args,
                 inputs=("manifest", "clusters", "activations"), num_nodes=num_nodes,
                 nproc_per_node=gpus_per_task, workspace=workspace_path, task_config=task_config,
                 settings=trainjob, prefix="dcml-train-shared")
    from dcml.contracts.io import seal

    seal(model.path)


def train_worker(
    manifest: Input[Dataset],
    clusters: Input[Dataset],
    activations: Input[Dataset],
    cluster_id: int,
    freeze_backbone: bool,
    backbone: str,
    weights: str,
    image_size: int,
    embedding_dim: int,
    train_blocks: int,
    freeze_bn: str,
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
    gpus_per_task: int,
    model: Output[Model],
    init: Input[Model] = None,
    num_nodes: int = 1,
    trainjob: dict = {},
    workspace_path: str = "",
    task_config: TaskConfig = None,
):
    """One cluster's sub-model: its own backbone copy and its embedding slice."""
    import os

    from components.train import stage

    hyper = {k: v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    args = dict(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        clusters=os.path.join(clusters.path, "clusters.parquet"),
        activations=activations.path,
        out=os.path.join(model.path, "model.pt"),
        mode="worker", cluster_id=int(cluster_id), freeze_backbone=freeze_backbone,
        init=os.path.join(init.path, "model.pt") if init is not None else None, nproc=gpus_per_task,
        **hyper,
    )
    from dcml.trainjob import run_training  # here, or a TrainJob over num_nodes nodes

    run_training("components.train.stage:run", args,
                 inputs=("manifest", "clusters", "activations", "init"), num_nodes=num_nodes,
                 nproc_per_node=gpus_per_task, workspace=workspace_path, task_config=task_config,
                 settings=trainjob, prefix="dcml-train-worker")
    from dcml.contracts.io import seal

    seal(model.path)
