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
    manifest: Input[Dataset],
    experiment: str,
    run_name: str,
    pipeline_params: dict,
    mlflow_run: Output[Artifact],
):
    # pipeline_params: every pipeline parameter as the run got it (kfp hands them over as text);
    # they are the parent run's MLflow parameters.
    import os
    import tempfile

    from dcml.contracts import events
    from dcml.retrieval.pictures import retrieval_pictures
    from dcml.tracking import log_pipeline_run

    os.makedirs(mlflow_run.path, exist_ok=True)
    vectors = os.path.join(embeddings.path, "embeddings.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        # What the model retrieves: 8 random and 8 worst test queries with their
        # top-5 neighbours, and Recall@1 per class (table + histogram).
        pictures = retrieval_pictures(vectors, os.path.join(manifest.path, "manifest.parquet"), tmp)
        run_id = log_pipeline_run(
            metrics=os.path.join(metrics.path, "metrics.json"),
            model=os.path.join(model.path, "model.pt"),
            embeddings=vectors,
            experiment=experiment,
            run_name=run_name or None,
            pipeline_params=pipeline_params,
            out=os.path.join(mlflow_run.path, "record.json"),
            pictures=pictures,
        )
    events.emit("summary", text=f"MLflow run {run_id} in experiment {experiment}")
