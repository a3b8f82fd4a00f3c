"""KFP component: DFML training (factorised backbone + router), a normal checkpoint out.

Hyper-parameters are named as in dcml.contracts.params (tests check this
signature against it); ``dfml_groups`` is the stage's ``groups``,
``gpus_per_task`` its ``nproc``. With ``num_nodes > 1`` the task launches the
stage as a Kubeflow TrainJob (dcml.trainjob; see components/train/component.py).
"""

from kfp.dsl import Dataset, Input, Model, Output, TaskConfig


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
    baseline_candidate: bool,
    fusion: bool,
    gpus_per_task: int,
    model: Output[Model],
    num_nodes: int = 1,
    trainjob: dict = {},
    workspace_path: str = "",
    task_config: TaskConfig = None,
):
    import os

    from components.dfml import stage

    hyper = {stage.RENAME.get(k, k): v for k, v in locals().items() if k in stage.PARAMS}
    os.makedirs(model.path, exist_ok=True)
    args = dict(
        manifest=os.path.join(manifest.path, "manifest.parquet"),
        out=os.path.join(model.path, "model.pt"),
        nproc=gpus_per_task,
        **hyper,
    )
    from dcml.trainjob import run_training  # here, or a TrainJob over num_nodes nodes

    run_training("components.dfml.stage:run", args,
                 inputs=("manifest",), num_nodes=num_nodes,
                 nproc_per_node=gpus_per_task, workspace=workspace_path, task_config=task_config,
                 settings=trainjob, prefix="dcml-train-dfml")
    from dcml.contracts.io import seal

    seal(model.path)
