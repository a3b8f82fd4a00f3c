"""The MLflow run tree of a pipeline run, built from the stage records.

One parent run (``dcml.kind=pipeline``) per pipeline run, one nested run per
stage record in the lineage. A stage whose execution id MLflow has seen
before was served from the cache and is tagged ``dcml.cached=true``. The
final model is logged as the dcml checkpoint file itself (``dcml-model/``):
it loads with ``torch.load(weights_only=True)``, never by unpickling code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from dcml.contracts import records
from dcml.contracts.errors import DcmlError
from dcml.tracking import liveness, store
from dcml.tracking.plots import make_plots

MODEL_DIR = "dcml-model"        # artifact folder of the logged model
MODEL_FILE = "model.pt"         # the dcml checkpoint (dcml.contracts.checkpoint)
MODEL_FORMAT = "dcml.checkpoint"  # tag dcml.model_format: how dcml.model_uri loads
PARENT_RUN_ENV = "DCML_MLFLOW_PARENT_RUN"  # set by `dcml study`: its grid runs nest under this MLflow run
_PATH_KEYS = ("manifest", "out", "features", "clusters", "model", "checkpoints", "init",
              "embeddings", "embeddings_out", "root")


def metric_key(name: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . / : and spaces): recall@1 -> recall_at_1."""
    return re.sub(r"[^\w.\-/ :]", "_", name.replace("@", "_at_"))


def _flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{metric_key(str(key))}"
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:6000]
    return out


def run_settings(lineage: list[dict]) -> dict:
    """The run-level settings: each stage's parameters, later stages winning, plus
    what the pipeline was (method, mode, K, epochs) and where the code came from."""
    merged: dict = {}
    for rec in lineage:
        for key, value in rec.get("params", {}).items():
            if key in _PATH_KEYS:
                continue  # paths differ per run; they are not settings
            merged[key] = value
    train = [r for r in lineage if r.get("stage") in ("train", "train-dfml")]
    if train:
        merged["num_clusters"] = train[0].get("params", {}).get("num_slices") or merged.get("k")
        merged["mode"] = train[0].get("params", {}).get("mode", "dfml")
        merged["method"] = "dfml" if train[0]["stage"] == "train-dfml" else "dc"
    finetunes = [r for r in lineage if r.get("stage") == "finetune"]
    if finetunes:
        merged["finetune_epochs"] = finetunes[-1].get("params", {}).get("epochs")
    if train:
        merged["epochs"] = train[0].get("params", {}).get("epochs")
    commits = {r.get("git_commit") for r in lineage if r.get("git_commit")}
    tags = {r.get("image_tag") for r in lineage if r.get("image_tag")}
    merged["git_commit"] = ",".join(sorted(commits)) or "unknown"
    merged["image_tag"] = ",".join(sorted(tags)) or "local (no image)"
    return merged


def run_parameters(lineage: list[dict]) -> dict[str, str]:
    """The run-level parameters logged on the parent run (flattened settings)."""
    return _flat_params(run_settings(lineage))


def run_name_for(lineage: list[dict]) -> str:
    """A name that says what the run is, e.g. ``cars196 dc-shared K=4 margin seed0``
    (dataset, method-mode, K, loss, seed); ``dfml`` for the DFML method."""
    s = run_settings(lineage)
    if s.get("method") == "dfml":
        what = "dfml" + (f" G={s['groups']}" if s.get("groups") is not None else "")
    elif s.get("method") == "dc":
        mode = "parallel" if s.get("mode") == "worker" else s.get("mode", "shared")
        what = f"dc-{mode}" + (f" K={s['num_clusters']}" if s.get("num_clusters") is not None else "")
    else:
        what = "eval"
    parts = [str(s.get("dataset") or "data"), what, str(s["loss"]) if s.get("loss") else "",
             f"seed{s['seed']}" if s.get("seed") is not None else ""]
    return " ".join(p for p in parts if p)


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


def _log_history(client, run_id: str, history: list[dict]) -> None:
    """Per-epoch step metrics ``epoch.<key>`` (loss, val_recall_at_1, val_map_at_r,
    recall_at_1, best_epoch, lr.<group>, ...); epoch 0 is the initial model."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for step, row in enumerate(history):
        epoch = int(row.get("epoch", step))
        for key, value in _numbers({k: v for k, v in row.items() if k != "epoch"}):
            batch.append(Metric(key=metric_key(f"epoch.{key}"), value=value, timestamp=now, step=epoch))
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


def _log_baseline(lineage: list[dict], final_metrics: dict) -> None:
    """The run's headline (dcml.algorithm.baseline): metrics, the ``dcml.headline`` and
    ``dcml.delivered`` tags (``trained`` or ``pretrained features``)."""
    import mlflow

    from dcml.algorithm import baseline

    effect = baseline.from_lineage(lineage, final_metrics)
    if not effect:
        return
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


def log_pipeline_run(metrics: str, model: str | None = None, embeddings: str | None = None,
                     experiment: str | None = None, run_name: str | None = None,
                     tracking_uri: str | None = None, out: str | None = None,
                     pictures: dict | None = None) -> str:
    """Log a finished pipeline run from its final artifacts; returns the parent run id.

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
    client = MlflowClient()
    liveness.reap_dead_runs(client)
    cached = cached_exec_ids(client, experiment_id, lineage)
    final_metrics = json.loads(Path(metrics).read_text())["metrics"]

    tags = {"dcml.kind": "pipeline", "dcml.final_exec_id": final["exec_id"], **liveness.owner_tags()}
    if os.environ.get(PARENT_RUN_ENV):  # a grid point of `dcml study`: nested under the study's run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    run_name = run_name or run_name_for(lineage)
    compress = [r for r in lineage if r.get("stage") == "compress"]
    if compress:
        # The pipeline's optional branch: the same run, evaluated after quantisation.
        params = compress[-1].get("params", {})
        tags["dcml.compressed"] = f"{params.get('method')}-{params.get('bits')}bit"
        run_name = f"{run_name} [{tags['dcml.compressed']}]"
    # The parent run spans the pipeline: from the first stage this run executed (not served from the cache)
    # to the end of tracking, not only the track step.
    started = pipeline_started_ms([r for r in lineage if r["exec_id"] not in cached])
    opened = client.create_run(experiment_id, start_time=started, tags=tags, run_name=run_name) if started else None
    with (mlflow.start_run(run_id=opened.info.run_id) if opened else
          mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)) as parent, \
            liveness.Heartbeat(client, parent.info.run_id):
        mlflow.log_params(run_parameters(lineage))
        mlflow.log_metrics({metric_key(k): float(v) for k, v in final_metrics.items()})
        _log_baseline(lineage, final_metrics)
        for rec in lineage:
            with mlflow.start_run(experiment_id=experiment_id, run_name=rec.get("name") or rec["stage"], nested=True,
                                  tags={"dcml.kind": "stage", "dcml.stage": rec["stage"],
                                        "dcml.exec_id": rec["exec_id"],
                                        "dcml.cached": str(rec["exec_id"] in cached).lower(),
                                        "dcml.host": rec.get("host", ""),
                                        "dcml.git_commit": rec.get("git_commit", "")}) as child:
                mlflow.log_params(_flat_params(rec.get("params", {})))
                stage_metrics = {metric_key(k): float(v) for k, v in rec.get("metrics", {}).items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
                stage_metrics["duration_s"] = float(rec.get("duration_s", 0.0))
                mlflow.log_metrics(stage_metrics)
                _log_history(client, child.info.run_id, rec.get("history", []))
                if rec.get("extra", {}).get("threshold_table"):  # the index's match threshold: its ROC points
                    mlflow.log_dict({"verification": rec["extra"].get("verification", {}),
                                     "table": rec["extra"]["threshold_table"]}, "verification/threshold_table.json")
            mlflow.log_metric(metric_key(f"seconds.{rec.get('name') or rec['stage']}"), float(rec.get("duration_s", 0.0)))
        with tempfile.TemporaryDirectory() as tmp:
            for path in make_plots(lineage, final_metrics, embeddings, Path(tmp)):
                mlflow.log_artifact(str(path), artifact_path="plots")
            mlflow.log_dict(final, "lineage.json")
        for path in (pictures or {}).values():
            mlflow.log_artifact(str(path), artifact_path="retrieval")
        model_exec_id = records.read(model).get("exec_id") if model and Path(model).is_file() else None
        if model_exec_id:
            # A model served from the cache was logged by an earlier run: point at it.
            earlier = client.search_runs([experiment_id], filter_string=(
                f"tags.`dcml.model_exec_id` = '{model_exec_id}' and tags.`dcml.model_logged` = 'true' "
                f"and tags.`dcml.model_format` = '{MODEL_FORMAT}'"), max_results=1)
            mlflow.set_tag("dcml.model_exec_id", model_exec_id)
            if earlier:
                mlflow.set_tags({"dcml.model_uri": earlier[0].data.tags.get("dcml.model_uri", ""),
                                 "dcml.model_format": MODEL_FORMAT})
            else:
                mlflow.set_tags({"dcml.model_uri": log_model(model, parent.info.run_id),
                                 "dcml.model_format": MODEL_FORMAT, "dcml.model_logged": "true"})
        run_id = parent.info.run_id

    if out:
        from dcml.contracts.io import write_json

        write_json(out, {"mlflow_run_id": run_id, "experiment_id": experiment_id,
                         "tracking_uri": mlflow.get_tracking_uri(),
                         "ui_url": store.ui_url(experiment_id, run_id, store.ui_base(mlflow.get_tracking_uri())),
                         "cached_stages": sorted(r.get("name", r["stage"]) for r in lineage if r["exec_id"] in cached)})
    return run_id


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


def log_model(model_path: str, run_id: str) -> str:
    """Log a dcml checkpoint into the active run as ``dcml-model/model.pt`` plus
    ``dcml-model/model_config.json``; returns its URI (``runs:/<id>/dcml-model/model.pt``).

    The checkpoint is checked first with the loader that will read it back
    (``torch.load(weights_only=True)``); nothing is pickled.
    """
    import mlflow

    from dcml.contracts import checkpoint

    ckpt = checkpoint.load(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_path, Path(tmp) / MODEL_FILE)
        mlflow.log_artifact(str(Path(tmp) / MODEL_FILE), artifact_path=MODEL_DIR)
    mlflow.log_dict({"format": ckpt["format"], "model_config": ckpt["model_config"],
                     "load": "dcml.tracking.load_logged_model(uri) or dcml.model_files.load_model(file): "
                             "torch.load(weights_only=True), no pickled code"},
                    f"{MODEL_DIR}/model_config.json")
    return f"runs:/{run_id}/{MODEL_DIR}/{MODEL_FILE}"


def load_logged_model(model_uri: str, device="cpu", tracking_uri: str | None = None):
    """(EmbeddingModel in eval mode, checkpoint dict) from a ``dcml.model_uri``.

    Reads the checkpoint with ``torch.load(weights_only=True)``: a file holding
    pickled code (anything but tensors and plain containers) is refused with a
    one-line DcmlError instead of being run.
    """
    import mlflow

    from dcml.model_files import load_model

    if not model_uri.endswith(f"/{MODEL_FILE}"):
        raise DcmlError(f"{model_uri}: not a dcml model URI (expected runs:/<run>/{MODEL_DIR}/{MODEL_FILE}); "
                        "models logged with mlflow.pytorch (pickle) are not loaded by dcml")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError: one line either way
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DcmlError(f"{model_uri}: cannot download the model ({first[:200]}); check the run id and the store") from None
        try:
            return load_model(local, device=device)
        except DcmlError as exc:
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).replace(str(local), model_uri)
            if "Weights only load failed" in message or "pickled Python objects" in message:
                message = (f"{model_uri}: refused: the file holds pickled objects, not only tensors and plain "
                           "containers (torch.load weights_only=True rejected it), so loading it could run code; "
                           "do not load it, log the model again with `dcml run`")
            raise DcmlError(message) from None
