"""KFP components: merge the sub-models and fine-tune the whole embedding on all data.

Hyper-parameters are named as in dcml.contracts.params (tests check these
signatures against it); ``finetune_epochs`` is the stage's ``epochs``,
``gpus_per_task`` its ``nproc``. With ``num_nodes > 1`` the task launches the
stage as a Kubeflow TrainJob (dcml.trainjob; see components/train/component.py).
"""

from typing import List

from kfp.dsl import Dataset, Input, Model, Output, TaskConfig


def merge_finetune(
    manifest: Input[Dataset],
    checkpoints: Input[List[Model]],
    activations: Input[Dataset],
    clusters: Input[Dataset],
    merge: str,
    finetune_epochs: int,
    finetune_cluster_epochs: int,
    recluster_every: int,
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
    batches_per_epoch: int,
    head_init: str,
    warmup_epochs: int,
    schedule: str,
    select_on: str,
    patience: int,
    eval_every: int,
    seed: int,
    num_workers: int,
    baseline_candidate: bool,
    fusion: bool,
    gpus_per_task: int,
    model: Output[Model],
    num_nodes: int = 1,
    trainjob: dict = {},
    workspace_path: str = "",
    task_config: TaskConfig = None,
):
    """Fan-in of the parallel workers (dsl.Collected)."""
    import os

    from components.finetune import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    args = dict(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        checkpoints=[os.path.join(c.path, "model.pt") for c in checkpoints],
        activations=activations.path,
        clusters=os.path.join(clusters.path, "clusters.parquet"),
        out=os.path.join(model.path, "model.pt"),
        merge=merge, nproc=gpus_per_task,
        **hyper,
    )
    from dcml.trainjob import run_training  # here, or a TrainJob over num_nodes nodes

    run_training("components.finetune.stage:run", args,
                 inputs=("manifest", "checkpoints", "activations", "clusters"), num_nodes=num_nodes,
                 nproc_per_node=gpus_per_task, workspace=workspace_path, task_config=task_config,
                 settings=trainjob, prefix="dcml-merge-finetune")
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
    baseline_candidate: bool,
    fusion: bool,
    gpus_per_task: int,
    model: Output[Model],
    num_nodes: int = 1,
    trainjob: dict = {},
    workspace_path: str = "",
    task_config: TaskConfig = None,
):
    """Shared mode: the single trained model, fine-tuned with K=1."""
    import os

    from components.finetune import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    args = dict(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        checkpoints=[os.path.join(checkpoint.path, "model.pt")],
        activations=activations.path,
        out=os.path.join(model.path, "model.pt"),
        nproc=gpus_per_task,
        **hyper,
    )
    from dcml.trainjob import run_training  # here, or a TrainJob over num_nodes nodes

    run_training("components.finetune.stage:run", args,
                 inputs=("manifest", "checkpoints", "activations"), num_nodes=num_nodes,
                 nproc_per_node=gpus_per_task, workspace=workspace_path, task_config=task_config,
                 settings=trainjob, prefix="dcml-finetune")
    from dcml.contracts.io import seal

    seal(model.path)
