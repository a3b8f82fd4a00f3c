"""KFP component: log the finished pipeline run to MLflow (never cached).

Stages never talk to MLflow; their records travel inside their artifacts.
This step reads the lineage from the final artifacts and builds the run
tree, so run-unique values never become inputs of cached steps.
"""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def track(
    metrics: Input[Metrics],
    model: Input[Model],
    embeddings: Input[Dataset],
    experiment: str,
    run_name: str,
    mlflow_run: Output[Artifact],
):
    import os

    from dcml.contracts import events
    from dcml.tracking import log_pipeline_run

    os.makedirs(mlflow_run.path, exist_ok=True)
    run_id = log_pipeline_run(
        metrics=os.path.join(metrics.path, "metrics.json"),
        model=os.path.join(model.path, "model.pt"),
        embeddings=os.path.join(embeddings.path, "embeddings.parquet"),
        experiment=experiment,
        run_name=run_name or None,
        out=os.path.join(mlflow_run.path, "record.json"),
    )
    events.emit("summary", text=f"MLflow run {run_id} in experiment {experiment}")
