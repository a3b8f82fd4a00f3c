"""Pipeline runs side by side (the library half of ``dcml compare``)."""

from __future__ import annotations

from dcml.contracts.errors import DcmlError
from dcml.tracking import liveness, store

# Parameters shown next to metrics, in this order.
KEY_PARAMS = (
    "dataset", "method", "mode", "backbone", "num_clusters", "embedding_dim", "loss", "margin",
    "classes_per_batch", "images_per_class", "epochs", "finetune_epochs", "seed",
)
STRUCTURE = ("method", "mode")  # tags dcml.method / dcml.mode of a pipeline run
PIPELINE_RUNS = "tags.`dcml.kind` = 'pipeline'"
# The default table of a single run (of several: the parameters that differ).
NARROW_PARAMS = ("num_clusters", "mode", "method")
NARROW_METRICS = ("recall@1", "map@r", "r_precision", "nmi")


def dcml_metric_name(name: str) -> str:
    """dcml's spelling of a metric given as dcml or MLflow names it (``recall_at_1``, ``metrics.recall_at_1``)."""
    name = name.strip().lower().removeprefix("metrics.")
    return name.replace("_at_", "@")


def resolve_metric(metric: str, available: list[str], experiment: str) -> str:
    """The column of ``metric`` (dcml or MLflow spelling); an unknown one is a DcmlError listing them all."""
    name = dcml_metric_name(metric)
    if name in available:
        return name
    raise DcmlError(f"--metric {metric}: not logged in the runs of experiment '{experiment}'; pick one of "
                    f"{', '.join(sorted(available))} (dcml or MLflow spelling, e.g. recall@1 or recall_at_1)")


def narrow(table, metric: str):
    """What differs: run name, the parameters that vary across these runs (K, mode and method when there
    is one run), the key metrics (and the one sorted by) and the duration."""
    metrics = [m for m in dict.fromkeys((metric,) + NARROW_METRICS) if m in table.columns]
    cols = ["run"] + (["status"] if "status" in table.columns else [])
    cols += [c for c in (HEADLINE, "delivered") if c in table.columns and table[c].astype(bool).any()]
    params = table.attrs.get("params", [])
    shown = varying(table, params) if len(table) > 1 else [p for p in NARROW_PARAMS if p in params]
    cols += shown + metrics + ["duration"]
    out = table[cols].rename(columns={"num_clusters": "K"})
    out.attrs = dict(table.attrs)
    return out


def varying(table, columns) -> list[str]:
    """The columns whose values are not the same in every row (a missing value counts as one)."""
    return [c for c in columns if table[c].astype(str).nunique(dropna=False) > 1]


def plot_labels(table) -> list[str]:
    """The runs' names, with the start of the run id where two runs share a name."""
    names = table["run"].astype(str)
    twice = set(names[names.duplicated(keep=False)])
    return [f"{name} ({run_id[:7]})" if name in twice else name for name, run_id in zip(names, table["run_id"])]


def _duration(seconds) -> str:
    if seconds != seconds:  # NaN: still running
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        (f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def latest_experiment(tracking_uri: str | None = None) -> str | None:
    """The name of the experiment holding the most recent dcml pipeline run (None if there is none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.connect(tracking_uri))
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string=PIPELINE_RUNS, order_by=["attributes.start_time DESC",
                                                                        "attributes.end_time DESC"],
                              max_results=1)
    return client.get_experiment(runs[0].info.experiment_id).name if runs else None


def compare_runs(experiment: str | None = None, metric: str = "recall@1", tracking_uri: str | None = None,
                 include_all: bool = False):
    """A DataFrame of an experiment's pipeline runs: name, run id, every parameter (key ones first) and
    every final metric, best first (``attrs["params"]``: the parameter columns).

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
    metric_cols = sorted(c for c in df.columns if c.startswith("metrics.")
                         and not c.startswith(("metrics.seconds.", "metrics.system/")))
    available = [dcml_metric_name(c) for c in metric_cols]
    key = resolve_metric(metric, available, name)  # before anything is printed
    for part in STRUCTURE:  # what the pipeline was: a tag of the run (a parameter in runs of an older dcml)
        tag = df[f"tags.dcml.{part}"] if f"tags.dcml.{part}" in df.columns else None
        if f"params.{part}" in df.columns:
            tag = df[f"params.{part}"] if tag is None else tag.fillna(df[f"params.{part}"])
        if tag is not None:
            df[f"params.{part}"] = tag
    logged = [c[len("params."):] for c in df.columns if c.startswith("params.")]
    params = [p for p in KEY_PARAMS if p in logged] + sorted(p for p in logged if p not in KEY_PARAMS)
    cols = ["tags.mlflow.runName", "run_id", "start_time"] + (["status"] if include_all else [])
    table = df[cols + [f"params.{p}" for p in params] + metric_cols].copy()
    table.columns = ["run"] + cols[1:] + params + available
    seconds = (df["end_time"] - df["start_time"]).dt.total_seconds() if "end_time" in df.columns else float("nan")
    table["duration_s"] = seconds
    table["duration"] = [_duration(v) for v in table["duration_s"]]
    _add_headline(table, df)
    table = table.sort_values(key, ascending=False).reset_index(drop=True)
    table.attrs.update(experiment=name, metric=key, metrics=available, params=params)
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

