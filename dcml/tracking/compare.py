"""Pipeline runs side by side (the library half of ``dcml compare``)."""

from __future__ import annotations

from dcml.contracts.errors import DcmlError
from dcml.tracking import liveness, store
from dcml.tracking.runs import metric_key

# Parameters shown next to metrics, in this order.
KEY_PARAMS = (
    "dataset", "method", "mode", "backbone", "num_clusters", "embedding_dim", "loss", "margin",
    "classes_per_batch", "images_per_class", "epochs", "finetune_epochs", "seed",
)
PIPELINE_RUNS = "tags.`dcml.kind` = 'pipeline'"


def latest_experiment(tracking_uri: str | None = None) -> str | None:
    """The name of the experiment holding the most recent dcml pipeline run (None if there is none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.connect(tracking_uri))
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string=PIPELINE_RUNS, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return client.get_experiment(runs[0].info.experiment_id).name if runs else None


def compare_runs(experiment: str | None = None, metric: str = "recall@1", tracking_uri: str | None = None,
                 include_all: bool = False):
    """A DataFrame of an experiment's pipeline runs: key parameters next to final metrics, best first.

    ``experiment`` None: the experiment with the most recent pipeline run. Only
    FINISHED runs unless ``include_all`` (then with a ``status`` column); runs
    whose track step died are marked KILLED first.
    """
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or store.default_tracking_uri()
    db = store.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise DcmlError(f"{db}: no MLflow store here; run `dcml run` first, or pass --tracking-uri")
    store.connect(uri)
    liveness.reap_dead_runs(MlflowClient(uri))
    name = experiment or latest_experiment(uri)
    if name is None:
        raise DcmlError(f"{uri}: no dcml pipeline runs in this store; run `dcml run` first")
    exp = MlflowClient(uri).get_experiment_by_name(name)
    if exp is None:
        empty = pd.DataFrame()
        empty.attrs["experiment"] = name
        return empty
    where = PIPELINE_RUNS if include_all else f"{PIPELINE_RUNS} and attributes.status = 'FINISHED'"
    df = mlflow.search_runs(experiment_names=[name], filter_string=where)
    df.attrs["experiment"] = name
    if df.empty:
        return df
    store.mark_training(MlflowClient(uri), exp)  # an experiment of dcml runs made by an older dcml
    sort_col = f"metrics.{metric_key(metric)}"
    cols = ["tags.mlflow.runName", "start_time"] + (["status"] if include_all else [])
    cols += [f"params.{p}" for p in KEY_PARAMS if f"params.{p}" in df.columns]
    cols += sorted(c for c in df.columns if c.startswith("metrics.") and not c.startswith("metrics.seconds."))
    table = df[cols].copy()
    table.columns = [c.split(".", 1)[1] if "." in c else c for c in cols]
    table = table.rename(columns={"mlflow.runName": "run"})
    table.columns = [c.replace("_at_", "@") for c in table.columns]
    _add_headline(table, df)
    key = metric if metric in table.columns else sort_col.split(".", 1)[1]
    if key in table.columns:
        table = table.sort_values(key, ascending=False)
    table = table.reset_index(drop=True)
    table.attrs["experiment"] = name
    return table


HEADLINE = "pretrained -> trained R@1"


def _add_headline(table, df) -> None:
    """The runs' headline beside their names: test R@1 of the pretrained features -> the
    delivered model, and which candidate validation chose ('' where a run has none)."""
    def cell(row) -> str:
        before, after = row.get("metrics.pretrained.recall_at_1"), row.get("metrics.recall_at_1")
        if before is None or after is None or before != before or after != after:  # missing or NaN
            return ""
        return f"{before:.4f} -> {after:.4f} ({100 * (after - before):+.1f})"

    table.insert(1, HEADLINE, [cell(row) for row in df.to_dict("records")])
    delivered = df["tags.dcml.delivered"].fillna("").tolist() if "tags.dcml.delivered" in df.columns else [""] * len(df)
    table.insert(2, "delivered", delivered)


def no_runs_message(table, experiment: str | None, include_all: bool) -> str:
    name = table.attrs.get("experiment") or experiment or store.DEFAULT_EXPERIMENT
    which = "dcml pipeline runs" if include_all else "finished dcml pipeline runs (--all lists the others)"
    return f"experiment '{name}' has no {which}; run `dcml run` first or pass --experiment"

