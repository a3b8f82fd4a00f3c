"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The run tree is built from the stage records that travel inside the final
artifacts (dcml.contracts.records), after the pipeline has run. A stage whose execution
id MLflow has seen before was served from the cache and is tagged so.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import click

from dcml.contracts import records
from dcml.contracts.errors import DcmlError

DEFAULT_EXPERIMENT = "dcml"
# Parameters shown next to metrics in `dcml compare`, in this order.
KEY_PARAMS = (
    "dataset", "method", "mode", "backbone", "num_clusters", "embedding_dim", "loss", "margin",
    "classes_per_batch", "images_per_class", "epochs", "finetune_epochs", "seed",
)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite store under ./mlflow (never ./mlruns)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def default_store_dir() -> Path:
    return Path(os.environ.get("DCML_MLFLOW_DIR", Path.cwd() / "mlflow")).resolve()


def _artifact_root(tracking_uri: str) -> str | None:
    """An explicit artifact location for local sqlite stores (next to the db)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def setup(experiment: str | None = None, tracking_uri: str | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment or DEFAULT_EXPERIMENT
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(uri)
    return mlflow.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def _flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:6000]
    return out


def run_parameters(lineage: list[dict]) -> dict[str, str]:
    """The run-level parameters: each stage's parameters, later stages winning."""
    merged: dict = {}
    for rec in lineage:
        for key, value in rec.get("params", {}).items():
            if key in ("manifest", "out", "features", "clusters", "model", "checkpoints", "init",
                       "embeddings", "embeddings_out", "root"):
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
    return _flat_params(merged)


def _seen_exec_ids(client, experiment_id: str, exec_ids: list[str]) -> set[str]:
    seen = set()
    for exec_id in exec_ids:
        hits = client.search_runs([experiment_id], filter_string=f"tags.`dcml.exec_id` = '{exec_id}'", max_results=1)
        if hits:
            seen.add(exec_id)
    return seen


def _log_history(client, run_id: str, history: list[dict]) -> None:
    from mlflow.entities import Metric

    import time

    now = int(time.time() * 1000)
    batch = []
    for step, row in enumerate(history):
        epoch = int(row.get("epoch", step))
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            batch.append(Metric(key=f"epoch.{key}".replace("@", "_at_"), value=float(value), timestamp=now, step=epoch))
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i:i + 900])


def metric_key(name: str) -> str:
    """MLflow metric names allow '@'? Not in every backend: map recall@1 -> recall_at_1."""
    return name.replace("@", "_at_")


def log_pipeline_run(metrics: str, model: str | None = None, embeddings: str | None = None,
                     experiment: str | None = None, run_name: str | None = None,
                     tracking_uri: str | None = None, out: str | None = None) -> str:
    """Log a finished pipeline run from its final artifacts; returns the parent run id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    final = records.read(metrics)
    if not final:
        raise DcmlError(f"{metrics}: no dcml record inside; pass the metrics.json written by `dcml evaluate`")
    lineage = list(records.walk(final))
    experiment_id = setup(experiment, tracking_uri)
    client = MlflowClient()
    cached = _seen_exec_ids(client, experiment_id, [r["exec_id"] for r in lineage])
    final_metrics = json.loads(Path(metrics).read_text())["metrics"]

    tags = {"dcml.kind": "pipeline", "dcml.final_exec_id": final["exec_id"]}
    compress = [r for r in lineage if r.get("stage") == "compress"]
    if compress:
        # The pipeline's optional branch: the same run, evaluated after quantisation.
        params = compress[-1].get("params", {})
        tags["dcml.compressed"] = f"{params.get('method')}-{params.get('bits')}bit"
        run_name = f"{run_name or 'run'} [{tags['dcml.compressed']}]"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as parent:
        mlflow.log_params(run_parameters(lineage))
        mlflow.log_metrics({metric_key(k): float(v) for k, v in final_metrics.items()})
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
            mlflow.log_metric(f"seconds.{rec.get('name') or rec['stage']}", float(rec.get("duration_s", 0.0)))
        with tempfile.TemporaryDirectory() as tmp:
            for path in make_plots(lineage, final_metrics, embeddings, Path(tmp)):
                mlflow.log_artifact(str(path), artifact_path="plots")
            mlflow.log_dict(final, "lineage.json")
        model_exec_id = records.read(model).get("exec_id") if model and Path(model).is_file() else None
        if model_exec_id:
            # A model served from the cache was logged by an earlier run: point at it.
            earlier = client.search_runs([experiment_id], filter_string=(
                f"tags.`dcml.model_exec_id` = '{model_exec_id}' and tags.`dcml.model_logged` = 'true'"), max_results=1)
            mlflow.set_tag("dcml.model_exec_id", model_exec_id)
            if earlier:
                mlflow.set_tag("dcml.model_uri", earlier[0].data.tags.get("dcml.model_uri", ""))
            else:
                mlflow.set_tags({"dcml.model_logged": "true", "dcml.model_uri": _log_model(model)})
        run_id = parent.info.run_id

    if out:
        from dcml.contracts.io import write_json

        write_json(out, {"mlflow_run_id": run_id, "experiment_id": experiment_id,
                         "tracking_uri": mlflow.get_tracking_uri(),
                         "cached_stages": sorted(r.get("name", r["stage"]) for r in lineage if r["exec_id"] in cached)})
    return run_id


def _log_model(model_path: str) -> str:
    """Log the checkpoint as an MLflow PyTorch model; returns its model URI."""
    import mlflow
    import torch

    from dcml.model_files import load_model

    model, _ = load_model(model_path, device="cpu")
    model.eval()
    # Pickle format: torch.export (pt2) costs ~15 s of tracing per run here.
    # Explicit requirements avoid MLflow import-scanning the environment.
    info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "dcml"])
    return info.model_uri


def make_plots(lineage: list[dict], final_metrics: dict, embeddings: str | None, out_dir: Path) -> list[Path]:
    """Training curves, Recall@K curve, cluster sizes, 2-D embedding map (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    trained = [r for r in lineage if r.get("history")]
    if trained:
        fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(11, 4))
        for rec in trained:
            hist = rec["history"]
            epochs = [h.get("epoch", i) for i, h in enumerate(hist)]
            label = rec.get("name") or rec["stage"]
            if any("loss" in h for h in hist):
                ax_loss.plot(epochs, [h.get("loss", float("nan")) for h in hist], marker=".", label=label)
            r1 = [(h.get("epoch", i), h["recall@1"]) for i, h in enumerate(hist) if "recall@1" in h]
            if r1:
                ax_r1.plot(*zip(*r1), marker="o", label=label)
        ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
        ax_r1.set(title="test Recall@1 during training", xlabel="epoch", ylabel="R@1")
        for ax in (ax_loss, ax_r1):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "training_curves.png"))

    recall = sorted((int(k.split("@")[1]), v) for k, v in final_metrics.items() if k.startswith("recall@"))
    if recall:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([k for k, _ in recall], [v for _, v in recall], marker="o")
        ax.set(xscale="log", title="Recall@K", xlabel="K", ylabel="recall", ylim=(0, 1.01))
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out_dir / "recall_at_k.png"))

    sizes = [(r.get("name") or r["stage"], h["epoch"], h["cluster_sizes"]) for r in lineage
             for h in r.get("history", []) if h.get("cluster_sizes")]
    sizes += [(r.get("name") or r["stage"], 0, r["metrics"].get("sizes") or r.get("extra", {}).get("sizes"))
              for r in lineage if r.get("stage") == "cluster"
              and (r.get("metrics", {}).get("sizes") or r.get("extra", {}).get("sizes"))]
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, epoch, counts) in enumerate(sizes):
            counts = sorted(counts, reverse=True)
            ax.bar([i + j / (len(counts) + 1) for j in range(len(counts))], counts,
                   width=1 / (len(counts) + 1), label=f"{name} @ epoch {epoch}")
        ax.set(title="cluster sizes at each (re-)clustering", ylabel="images", xticks=[])
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / "cluster_sizes.png"))

    routed = [r for r in lineage if any("routing" in h for h in r.get("history", []))]
    for rec in routed:
        name = rec.get("name") or rec["stage"]
        groups = rec.get("extra", {}).get("groups", "?")
        paths.append(routing_plot(rec["history"], out_dir / f"routing_{name}.png",
                                  title=f"DFML routing ({name}, G={groups})"))

    if embeddings and Path(embeddings).is_file():
        paths.append(embedding_map(embeddings, out_dir / "embedding_map.png"))
    return paths


def _short_unit(name: str) -> str:
    # "backbone.net._blocks.7" -> "7"; ViT "backbone.blocks.3.attn" stays readable
    return name.rsplit("_blocks.", 1)[-1] if "_blocks." in name else name.replace("backbone.", "")


def routing_plot(history: list[dict], dest: Path, title: str = "DFML routing") -> Path:
    """How a DFML model spreads samples over its sub-blocks: the share sent to each
    sub-block per routed block (training images of the last epoch, and the test
    images of the last evaluation when there is one), plus the normalised
    routing entropy (1 = even spread, 0 = collapsed) and R@1 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    trained = [h for h in history if "routing" in h]
    panels = [("training images, last epoch", trained[-1]["routing"])]
    evaluated = [h for h in history if "eval_routing" in h]
    if evaluated:
        panels.append(("test images, last evaluation", evaluated[-1]["eval_routing"]))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.5))
    groups = 1
    for ax, (panel_title, counts) in zip(axes, panels):
        # Network order (JSON round trips may have sorted "10" before "2").
        names = sorted(counts, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
        table = np.array([counts[n] for n in names], dtype=float)
        shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
        groups = shares.shape[1]
        left = np.zeros(len(names))
        for g in range(groups):
            ax.barh(range(len(names)), shares[:, g], left=left, label=f"sub-block {g}")
            left += shares[:, g]
        ax.set_yticks(range(len(names)), [_short_unit(n) for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="share of samples", ylabel="block", title=panel_title)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=groups, fontsize=8)
    ax = axes[-1]
    ax.plot([h["epoch"] for h in trained], [h["routing_entropy"] for h in trained], marker="o",
            label="routing entropy (train)")
    if evaluated:
        ax.plot([h["epoch"] for h in evaluated], [h["recall@1"] for h in evaluated], marker="s", label="R@1 full")
        routed_r1 = [(h["epoch"], h["routed_recall@1"]) for h in evaluated if "routed_recall@1" in h]
        if routed_r1:
            ax.plot(*zip(*routed_r1), marker="^", label="R@1 routed")
    ax.set(ylim=(0, 1.05), xlabel="epoch", title="spread and retrieval per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, dest)


def embedding_map(embeddings: str, dest: Path, max_points: int = 3000) -> Path:
    """PCA of test embeddings to 2-D, coloured by class."""
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.decomposition import PCA

    from dcml.contracts.io import read_vectors

    meta, vectors, _ = read_vectors(embeddings, "embedding")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(vectors))[:max_points]
    xy = PCA(n_components=2, random_state=0).fit_transform(vectors[idx])
    labels = meta["label"].to_numpy()[idx]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=4, alpha=0.7)
    ax.set(title=f"test embeddings (PCA, {len(idx)} points, colour = class)", xticks=[], yticks=[])
    return _save(fig, dest)


def _save(fig, dest: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(dest, dpi=110, format="png")
    plt.close(fig)
    return dest


def compare_runs(experiment: str | None = None, metric: str = "recall@1", tracking_uri: str | None = None):
    """A DataFrame of pipeline runs: key parameters next to final metrics, best first."""
    import mlflow

    setup(experiment, tracking_uri)
    df = mlflow.search_runs(experiment_names=[experiment or DEFAULT_EXPERIMENT],
                            filter_string="tags.`dcml.kind` = 'pipeline'")
    if df.empty:
        return df
    sort_col = f"metrics.{metric_key(metric)}"
    cols = ["tags.mlflow.runName", "start_time"]
    cols += [f"params.{p}" for p in KEY_PARAMS if f"params.{p}" in df.columns]
    cols += sorted(c for c in df.columns if c.startswith("metrics.") and not c.startswith("metrics.seconds."))
    table = df[cols].copy()
    table.columns = [c.split(".", 1)[1] if "." in c else c for c in cols]
    table = table.rename(columns={"mlflow.runName": "run"})
    table.columns = [c.replace("_at_", "@") for c in table.columns]
    key = metric if metric in table.columns else sort_col.split(".", 1)[1]
    if key in table.columns:
        table = table.sort_values(key, ascending=False)
    return table.reset_index(drop=True)


@click.command("compare")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@click.option("--metric", default="recall@1", show_default=True, help="Sort by this metric (best first).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Save a bar chart of the metric per run (PNG).")
@click.option("--tracking-uri", default=None, help="Defaults to $MLFLOW_TRACKING_URI or sqlite:///./mlflow/mlflow.db.")
def compare_cli(experiment, metric, fmt, plot, tracking_uri):
    """Compare pipeline runs: key parameters next to metrics, best first."""
    table = compare_runs(experiment, metric, tracking_uri)
    if table.empty:
        raise DcmlError(f"experiment '{experiment}' has no dcml pipeline runs; run `dcml run` first or pass --experiment")
    if fmt == "csv":
        click.echo(table.to_csv(index=False), nl=False)
    else:
        click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if plot:
        plot_metric(table, metric, plot)
        click.echo(f"plot: {plot}")


def plot_metric(table, metric: str, dest: str, label_cols: tuple[str, ...] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in table.columns:
        raise DcmlError(f"metric '{metric}' not logged in these runs; pick one of {', '.join(c for c in table.columns if '@' in c or c in ('nmi', 'ami'))}")
    labels = [" ".join(str(row[c]) for c in label_cols) if label_cols else str(row["run"]) for _, row in table.iterrows()]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(table)), 4))
    ax.bar(range(len(table)), table[metric].astype(float))
    ax.set_xticks(range(len(table)), labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel=metric, title=f"{metric} per run")
    ax.grid(axis="y", alpha=0.3)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, Path(dest))
