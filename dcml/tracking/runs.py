"""The MLflow run tree of a pipeline run, built from the stage records.

One parent run (``dcml.kind=pipeline``) per pipeline run, one nested run per
stage record in the lineage. A stage whose execution id MLflow has seen
before was served from the cache and is tagged ``dcml.cached=true``.

The parent run's parameters are the pipeline's parameters (dcml.tracking.naming);
its description (``mlflow.note.content``) is the run's headline; its name says
what the run is and what sets it apart in its experiment. Metrics that are
bookkeeping (seconds, images and batches per epoch, ...) go under ``system/``,
MLflow's System metrics tab, so the model-metric charts show the training
curves (``<stage>/loss``, ``<stage>/val_recall_at_1`` on the parent, ``epoch.*``
on the stage runs) and the scores. The final model is an MLflow logged model of
flavor ``dcml`` (the checkpoint itself, no pickle), registered under the
experiment's name with the alias ``candidate`` (dcml.tracking.models).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from dcml.contracts import records
from dcml.contracts.errors import DcmlError
from dcml.tracking import liveness, models, naming, store
from dcml.tracking.naming import flat_params, metric_key
from dcml.tracking.plots import make_plots

PARENT_RUN_ENV = "DCML_MLFLOW_PARENT_RUN"  # set by `dcml study`: its grid runs nest under this MLflow run
SYSTEM = "system/"  # MLflow's prefix of the System metrics tab: bookkeeping, not model quality
# Per-epoch values that are training curves (logged as epoch.<key>, and <stage>/<key> on the parent);
# every other number of a history row is bookkeeping (system/epoch.<key>).
CURVES = ("loss", "val_", "recall", "map", "r_precision", "nmi", "ami", "lr", "best_epoch")
PARENT_CURVES = ("loss", "val_recall", "val_map", "recall", "map")


def run_parameters(lineage: list[dict]) -> dict[str, str]:
    """The parameters of a run logged from bare artifacts: those its stage records name."""
    return naming.lineage_parameters(lineage)


def run_name_for(lineage: list[dict]) -> str:
    """A name that says what the run is, e.g. ``cars196 dc-shared K=4 margin seed0``
    (dataset, method-mode, K, loss, seed); ``dfml`` for the DFML method."""
    return naming.base_name(lineage, naming.lineage_parameters(lineage))


def cached_exec_ids(client, experiment_id: str, lineage: list[dict]) -> set[str]:
    """Stages this run did not execute itself (served from the cache).

    Under `dcml run` every record names the run that executed it
    (``runner``): a stage executed by another run was cached, even when that
    run was killed before it reached MLflow. Records without it (a cluster)
    count as cached when an earlier MLflow run logged the same execution.
    """
    import dcml

    current = dcml.RUNNER
    known = {r["exec_id"] for r in lineage if current and r.get("runner")}
    cached = {r["exec_id"] for r in lineage if r["exec_id"] in known and r["runner"] != current}
    return cached | _seen_exec_ids(client, experiment_id, [r["exec_id"] for r in lineage if r["exec_id"] not in known])


def _seen_exec_ids(client, experiment_id: str, exec_ids: list[str]) -> set[str]:
    seen = set()
    for exec_id in exec_ids:
        hits = client.search_runs([experiment_id], filter_string=f"tags.`dcml.exec_id` = '{exec_id}'", max_results=1)
        if hits:
            seen.add(exec_id)
    return seen


def _numbers(row: dict, prefix: str = ""):
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def history_metrics(history: list[dict], curve: str = "epoch.", bookkeeping: str | None = SYSTEM + "epoch.",
                    only: tuple = CURVES) -> list:
    """Per-epoch step metrics of a training history (epoch 0 is the initial model): the curves
    (loss, val_recall_at_1, recall_at_1, lr.<group>, ...) as ``<curve><key>``, the rest as
    ``<bookkeeping><key>`` (None: left out)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for step, row in enumerate(history):
        epoch = int(row.get("epoch", step))
        for key, value in _numbers({k: v for k, v in row.items() if k != "epoch"}):
            prefix = curve if key.startswith(only) else bookkeeping
            if prefix is not None:
                batch.append(Metric(key=metric_key(f"{prefix}{key}"), value=value, timestamp=now, step=epoch))
    return batch


def _log_batches(client, run_id: str, batch: list) -> None:
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i:i + 900])


def baseline_metrics(effect: dict) -> dict:
    """Parent-run metrics of the pretrained-features baseline: ``pretrained.<metric>`` (test),
    ``pretrained.val_<metric>`` and, when chosen on validation, ``trained.val_<metric>``."""
    out = {f"pretrained.{k[len('pretrained_'):]}": v for k, v in effect.items()
           if k.startswith("pretrained_") and isinstance(v, (int, float))}
    choice = effect.get("choice", {})
    out.update({f"{k.split('_', 1)[0]}.{k.split('_', 1)[1]}": v for k, v in choice.items()
                if k.startswith(("trained_val_", "pretrained_val_", "whitened_val_", "fused_val_"))})
    out.update({f"choice.{k[len('choice_'):]}": v for k, v in choice.items()
                if k.startswith("choice_") and isinstance(v, (int, float))})
    out.update({f"choice.{k}": v for k, v in choice.items() if k in ("val_classes", "whitened_width")})
    if "kept_test_recall@1" in effect:
        out["trained.kept_test_recall@1"] = effect["kept_test_recall@1"]
    return {metric_key(k): float(v) for k, v in out.items()}


def _log_baseline(lineage: list[dict], final_metrics: dict) -> dict:
    """The run's headline (dcml.algorithm.baseline): metrics, the ``dcml.headline`` and
    ``dcml.delivered`` tags (``trained`` or ``pretrained features``); returns the tags."""
    import mlflow

    from dcml.algorithm import baseline

    effect = baseline.from_lineage(lineage, final_metrics)
    if not effect:
        return {}
    mlflow.log_metrics(baseline_metrics(effect))
    tags = {}
    head = baseline.headline(effect)
    if head:
        tags["dcml.headline"] = head
    if "delivered" in effect.get("choice", {}):
        tags["dcml.delivered"] = effect["choice"]["delivered"]
        tags["dcml.choice"] = baseline.choice_line(effect["choice"])
        warning = baseline.noise_warning(effect["choice"])
        if warning:
            tags["dcml.warning"] = warning
    mlflow.set_tags(tags)
    return tags


def description(tags: dict, final_metrics: dict, model: dict | None) -> str:
    """The run's description (MLflow's ``mlflow.note.content``, markdown): the headline, the
    choice and its warning, the test scores, and where the delivered model is registered."""
    lines = [tags[k] for k in ("dcml.headline", "dcml.choice", "dcml.warning") if tags.get(k)]
    scores = [f"{name} {final_metrics[key]:.4f}" for key, name in (("recall@1", "R@1"), ("map@r", "MAP@R"), ("nmi", "NMI"))
              if isinstance(final_metrics.get(key), (int, float))]
    if scores:
        lines.append("test: " + ", ".join(scores))
    if model and model.get("registered"):
        uri = f"models:/{model['registered']}/{model['version']}"
        lines.append(f"model: registered as {model['registered']} version {model['version']} (the newest version "
                     f"has the alias {models.ALIAS}); load it with `dcml.tracking.load_logged_model(\"{uri}\")`")
    return "\n\n".join(lines)


def log_pipeline_run(metrics: str, model: str | None = None, embeddings: str | None = None,
                     experiment: str | None = None, run_name: str | None = None,
                     tracking_uri: str | None = None, out: str | None = None,
                     pictures: dict | None = None, pipeline_params: dict | None = None) -> str:
    """Log a finished pipeline run from its final artifacts; returns the parent run id.

    ``pipeline_params``: the pipeline's parameters as the run got them (the
    track step's); they are the parent run's parameters. Without them (a run
    logged from bare artifacts) the parameters the stage records name.
    ``pictures``: files shown with the run under ``retrieval/`` (the retrieval
    grid, the per-class Recall@1 table and histogram of dcml.retrieval.pictures).

    Before logging, RUNNING pipeline runs of the store whose track step died
    are marked KILLED (dcml.tracking.liveness).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    final = records.read(metrics)
    if not final:
        raise DcmlError(f"{metrics}: no dcml record inside; pass the metrics.json written by `dcml evaluate`")
    lineage = list(records.walk(final))
    experiment_id = store.setup(experiment, tracking_uri)
    experiment_name = experiment or store.DEFAULT_EXPERIMENT
    client = MlflowClient()
    liveness.reap_dead_runs(client)
    cached = cached_exec_ids(client, experiment_id, lineage)
    final_metrics = json.loads(Path(metrics).read_text())["metrics"]
    values = naming.pipeline_parameters(pipeline_params) if pipeline_params else run_parameters(lineage)
    shape = naming.structure(lineage)

    tags = {"dcml.kind": "pipeline", "dcml.final_exec_id": final["exec_id"], **liveness.owner_tags(),
            **{f"dcml.{k}": str(shape[k]) for k in ("method", "mode", "git_commit", "image_tag") if k in shape}}
    if os.environ.get(PARENT_RUN_ENV):  # a grid point of `dcml study`: nested under the study's run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    base = naming.base_name(lineage, values)
    compress = [r for r in lineage if r.get("stage") == "compress"]
    if compress:
        # The pipeline's optional branch: the same run, evaluated after quantisation.
        settings = compress[-1].get("params", {})
        tags["dcml.compressed"] = f"{settings.get('method')}-{settings.get('bits')}bit"
        base = f"{base} [{tags['dcml.compressed']}]"
    tags[naming.BASE_NAME_TAG] = base
    run_name = run_name or naming.distinct_name(client, experiment_id, base, values)
    # The parent run spans the pipeline: from the first stage this run executed (not served from the cache)
    # to the end of tracking, not only the track step.
    started = pipeline_started_ms([r for r in lineage if r["exec_id"] not in cached])
    opened = client.create_run(experiment_id, start_time=started, tags=tags, run_name=run_name) if started else None
    with (mlflow.start_run(run_id=opened.info.run_id) if opened else
          mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)) as parent, \
            liveness.Heartbeat(client, parent.info.run_id):
        mlflow.log_params(values)
        mlflow.log_metrics({metric_key(k): float(v) for k, v in final_metrics.items()})
        headline = _log_baseline(lineage, final_metrics)
        curves = []
        for rec in lineage:
            _log_stage_run(client, experiment_id, rec, cached)
            stage = rec.get("name") or rec["stage"]
            if rec.get("history"):  # the training curves, first among the parent's charts
                curves += history_metrics(rec["history"], curve=f"{metric_key(stage)}/", bookkeeping=None,
                                          only=PARENT_CURVES)
            mlflow.log_metric(metric_key(f"{SYSTEM}seconds.{stage}"), float(rec.get("duration_s", 0.0)))
        _log_batches(client, parent.info.run_id, curves)
        with tempfile.TemporaryDirectory() as tmp:
            for path in make_plots(lineage, final_metrics, embeddings, Path(tmp)):
                mlflow.log_artifact(str(path), artifact_path="plots")
            mlflow.log_dict(final, "lineage.json")
        for path in (pictures or {}).values():
            mlflow.log_artifact(str(path), artifact_path="retrieval")
        delivered = _log_delivered_model(client, experiment_id, experiment_name, parent.info.run_id, model,
                                         tags.get("dcml.compressed"), headline.get("dcml.headline", ""))
        mlflow.set_tag("mlflow.note.content", description(headline, final_metrics, delivered))
        run_id = parent.info.run_id

    if out:
        from dcml.contracts.io import write_json

        write_json(out, {"mlflow_run_id": run_id, "experiment_id": experiment_id,
                         "tracking_uri": mlflow.get_tracking_uri(),
                         "ui_url": store.ui_url(experiment_id, run_id, store.ui_base(mlflow.get_tracking_uri())),
                         "model": delivered or {},
                         "cached_stages": sorted(r.get("name", r["stage"]) for r in lineage if r["exec_id"] in cached)})
    return run_id


def _log_stage_run(client, experiment_id: str, rec: dict, cached: set) -> None:
    """The nested run of one stage: its own parameters (internals included), metrics and curves."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id, run_name=rec.get("name") or rec["stage"], nested=True,
                          tags={"dcml.kind": "stage", "dcml.stage": rec["stage"], "dcml.exec_id": rec["exec_id"],
                                "dcml.cached": str(rec["exec_id"] in cached).lower(),
                                "dcml.host": rec.get("host", ""),
                                "dcml.git_commit": rec.get("git_commit", "")}) as child:
        mlflow.log_params(flat_params(rec.get("params", {})))
        stage_metrics = {metric_key(k): float(v) for k, v in rec.get("metrics", {}).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}
        stage_metrics[f"{SYSTEM}duration_s"] = float(rec.get("duration_s", 0.0))
        mlflow.log_metrics(stage_metrics)
        _log_batches(client, child.info.run_id, history_metrics(rec.get("history", [])))
        if rec.get("extra", {}).get("threshold_table"):  # the index's match threshold: its ROC points
            mlflow.log_dict({"verification": rec["extra"].get("verification", {}),
                             "table": rec["extra"]["threshold_table"]}, "verification/threshold_table.json")


def _log_delivered_model(client, experiment_id: str, experiment: str, run_id: str, model: str | None,
                         variant: str | None, headline: str) -> dict | None:
    """Log and register the delivered model, or, when an earlier run of the experiment logged this very
    model (served from the cache), link that logged model to this run; the tags say which."""
    import mlflow

    model_exec_id = records.read(model).get("exec_id") if model and Path(model).is_file() else None
    if not model_exec_id:
        return None
    mlflow.set_tag("dcml.model_exec_id", model_exec_id)
    earlier = client.search_runs([experiment_id], filter_string=(
        f"tags.`dcml.model_exec_id` = '{model_exec_id}' and tags.`dcml.model_logged` = 'true' "
        f"and tags.`dcml.model_format` = '{models.MODEL_FORMAT}'"), max_results=1)
    if earlier:
        uri = earlier[0].data.tags.get("dcml.model_uri", "")
        models.link_model(run_id, uri.removeprefix("models:/"))
        mlflow.set_tags({"dcml.model_uri": uri, "dcml.model_format": models.MODEL_FORMAT,
                         **{k: earlier[0].data.tags[k] for k in ("dcml.registered_model", "dcml.registered_version")
                            if k in earlier[0].data.tags}})
        return {"model_uri": uri, "registered": earlier[0].data.tags.get("dcml.registered_model", ""),
                "version": earlier[0].data.tags.get("dcml.registered_version", "")}
    delivered = models.log_model(model, run_id, experiment, variant, description=headline)
    mlflow.set_tags({"dcml.model_uri": delivered["model_uri"], "dcml.model_format": models.MODEL_FORMAT,
                     "dcml.model_logged": "true", "dcml.registered_model": delivered["registered"],
                     "dcml.registered_version": delivered["version"]})
    return delivered


def pipeline_started_ms(executed: list[dict]) -> int | None:
    """Epoch milliseconds of the earliest ``started`` of these stage records (None when there is none)."""
    from datetime import datetime

    times = []
    for rec in executed:
        try:
            times.append(datetime.fromisoformat(rec["started"]).timestamp())
        except (KeyError, TypeError, ValueError):
            continue
    return int(min(times) * 1000) if times else None


# The delivered model: dcml.tracking.models (kept importable from here).
log_model, load_logged_model = models.log_model, models.load_logged_model
