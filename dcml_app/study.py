"""`dcml study`: the hyper-parameter studies of the course assignment.

Each grid point is one pipeline run (locally through the cached runner, in
the same folder and cache as `dcml run` -- so ingestion and feature
extraction run once for the whole study, and not at all after an identical
`dcml run` -- or submitted to a cluster). The grid runs are nested under one
MLflow study run, which also gets the comparison table (Markdown + CSV) and
a plot written to the study folder.
"""

from __future__ import annotations

from pathlib import Path

import click

from dcml.contracts.errors import DcmlError

# name -> (varied parameters per grid point, x label)
STUDIES = {
    # Embedding sizes 2^5 .. 2^10.
    "embedding-size": ([{"embedding_dim": 2 ** n} for n in range(5, 11)], "embedding_dim"),
    # Contrastive loss (the assignment's code): negative margin incl. its default 0.5.
    "margin": ([{"loss": "contrastive", "margin": m} for m in (0.25, 0.5, 1.0)], "margin"),
    # P classes x M images: M=1 has no positive pair, P=1 no negative.
    "batch-size": ([{"classes_per_batch": p, "images_per_class": m}
                    for p, m in ((2, 1), (1, 4), (2, 2), (2, 4), (4, 4), (8, 4), (16, 4))], "batch"),
    "loss": ([{"loss": "contrastive"}, {"loss": "triplet"}, {"loss": "margin"}, {"loss": "proxy_anchor"}], "loss"),
}


def why_untrainable(p: int, m: int) -> str:
    if m < 2:
        return "M=1: no two images of a class in a batch, so no positive pair and nothing to pull together"
    if p < 2:
        return "P=1: one class per batch, so no negative pair and nothing to push apart"
    return ""


def label_of(point: dict) -> str:
    if "classes_per_batch" in point:
        p, m = point["classes_per_batch"], point["images_per_class"]
        return f"{p}x{m}={p * m}"
    return ",".join(str(v) for v in point.values())


def grid_text(name: str) -> str:
    """One line: the study's grid and how many pipeline runs it makes."""
    points, axis = STUDIES[name]
    return f"{name}: {len(points)} runs, {axis} = {', '.join(label_of(p) for p in points)}"


def chosen_points(name: str, only) -> list[dict]:
    points, _ = STUDIES[name]
    if not only:
        return points
    labels = [label_of(p) for p in points]
    unknown = [o for o in only if o not in labels]
    if unknown:
        raise DcmlError(f"--only {unknown[0]}: not a point of the {name} grid; pick from {', '.join(labels)}")
    return [p for p in points if label_of(p) in only]


def run_study(name: str, base: dict, *, mode="shared", output_dir="studies", tracking_uri=None,
              experiment=None, runs_dir=None, only=None, echo=print) -> tuple[list[dict], Path]:
    """Run the grid (or the points ``only`` names) locally; returns (rows, study folder).

    The runs go to ``runs_dir`` (default: `dcml run`'s folder, so its cache serves identical stages) and
    are nested under one MLflow study run.
    """
    import os

    import mlflow

    from dcml import tracking
    from dcml_app.runner import DEFAULT_OUTPUT_DIR, run_local

    points = chosen_points(name, only)
    folder = Path(output_dir).resolve() / name
    experiment = experiment or base.get("experiment") or "dcml-study"
    tracking_uri = tracking_uri or tracking.default_tracking_uri()
    experiment_id = tracking.setup(experiment, tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"study:{name}",
                          tags={"dcml.kind": "study", "dcml_app.study": name}) as study_run:
        study_id = study_run.info.run_id
    echo(f"study {grid_text(name)}" + (f" (running {len(points)}: --only)" if only else ""))
    rows = []
    saved = os.environ.get(tracking.PARENT_RUN_ENV)
    os.environ[tracking.PARENT_RUN_ENV] = study_id  # the grid runs' track steps nest under the study run
    try:
        for i, point in enumerate(points, 1):
            rows.append(_run_point(name, point, i, len(points), base, experiment, mode, runs_dir or DEFAULT_OUTPUT_DIR,
                                   tracking_uri, run_local, echo))
    finally:
        if saved is None:
            os.environ.pop(tracking.PARENT_RUN_ENV, None)
        else:
            os.environ[tracking.PARENT_RUN_ENV] = saved
    write_report(name, rows, folder)
    _log_study(name, rows, folder, study_id, tracking_uri)
    return rows, folder


def _run_point(name, point, i, n, base, experiment, mode, runs_dir, tracking_uri, run_local, echo) -> dict:
    args = {**base, **point, "experiment": experiment, "run_name": f"{name}:{label_of(point)}"}
    row = {"setting": label_of(point), **point}
    echo(f"[{i}/{n}] training {name} = {label_of(point)}")
    reason = why_untrainable(args.get("classes_per_batch", 8), args.get("images_per_class", 4))
    try:
        summary = run_local(args, mode=mode, output_dir=runs_dir, tracking_uri=tracking_uri)
    except DcmlError as exc:
        # A setting that cannot train is a result of the study, not a crash of it.
        return {**row, "trained": False, "note": reason or str(exc)}
    train = _train_history(summary["metrics_file"])
    pairs = sum(h.get("mined_pos_pairs", 0) + h.get("nonzero_terms", 0) for h in train)
    trained = pairs > 0 and not reason
    cached = summary["mlflow"].get("cached_stages", [])
    echo(f"[{i}/{n}] {name} = {label_of(point)}: R@1 {summary['metrics'].get('recall@1', float('nan')):.4f}"
         + (f" ({', '.join(cached)} from the cache)" if cached else ""))
    return {**row, **summary["metrics"], "trained": trained, "note": reason if not trained else "",
            "run": summary["mlflow"].get("mlflow_run_id", ""), "cached_stages": cached}


def _train_history(metrics_file: str) -> list[dict]:
    from dcml.contracts import records

    return [h for r in records.walk(records.read(metrics_file)) if r["stage"] == "train" for h in r.get("history", [])]


def write_report(name: str, rows: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from dcml.contracts.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    metric_cols = [c for c in ("recall@1", "recall@2", "map@r", "nmi") if c in table.columns]
    shown = table[["setting", *metric_cols, "trained", "note"]]
    with atomic_path(folder / "results.csv") as tmp:
        shown.to_csv(tmp, index=False)
    with atomic_path(folder / "results.md") as tmp:
        tmp.write_text(f"# Study: {name}\n\n" + shown.to_markdown(index=False, floatfmt=".4f") + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for col in metric_cols:
        ax.plot(table["setting"].astype(str), table[col].astype(float), marker="o", label=col)
    ax.set(title=f"study: {name}", xlabel=STUDIES[name][1], ylabel="metric", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "results.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _log_study(name, rows, folder, study_id, tracking_uri):
    import mlflow

    from dcml import tracking

    tracking.connect(tracking_uri)
    with mlflow.start_run(run_id=study_id):
        for i, row in enumerate(rows):
            for key in ("recall@1", "map@r", "nmi"):
                if key in row:
                    mlflow.log_metric(tracking.metric_key(key), float(row[key]), step=i)
        for file in ("results.md", "results.csv", "results.png"):
            mlflow.log_artifact(str(folder / file))


@click.command("study", epilog="Grids (one pipeline run per point):\n\n" + "\n\n".join(
    "  " + grid_text(n) for n in sorted(STUDIES)))
@click.argument("name", type=click.Choice(sorted(STUDIES)))
@click.option("--config", default="demo", show_default=True, help="Preset or JSON file: the fixed parameters.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a fixed parameter (repeatable).")
@click.option("--mode", type=click.Choice(["shared", "parallel"]), default="shared", show_default=True)
@click.option("--output-dir", default="studies", show_default=True, type=click.Path(file_okay=False),
              help="Where the study's table and plot go.")
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Pipeline outputs and cache, shared with `dcml run` (identical stages are not run again).")
@click.option("--only", multiple=True, metavar="SETTING", help="Run only this grid point (repeatable), e.g. margin.")
@click.option("--experiment", default=None, help="MLflow experiment (default: the preset's).")
@click.option("--tracking-uri", default=None)
@click.option("--host", default=None, help="Submit every grid point to this Kubeflow endpoint instead of running locally.")
@click.option("--image-tag", default=None, help="With --host: image tag (default: git commit).")
def study_cli(name, config, overrides, mode, output_dir, runs_dir, only, experiment, tracking_uri, host, image_tag):
    """Run a study (embedding-size, margin, batch-size, loss); write table + plot."""
    from dcml_app.runner import _build, resolve_arguments

    pipeline_fn, tag = _build(mode, "dc", 1, "average", False, "dcml", image_tag)
    base = resolve_arguments(config, overrides)
    if host:
        _submit_study(name, base, host, mode, tag, experiment)
        return
    chosen_points(name, only)  # an unknown --only fails before anything runs
    rows, folder = run_study(name, base, mode=mode, output_dir=output_dir, tracking_uri=tracking_uri,
                             experiment=experiment, runs_dir=runs_dir, only=only, echo=click.echo)
    click.echo((folder / "results.md").read_text())
    click.echo(f"table: {folder / 'results.csv'}  plot: {folder / 'results.png'}")


def _submit_study(name, base, host, mode, tag, experiment):
    import tempfile

    import kfp
    from kfp import compiler

    from dcml_app.runner import _build

    pipeline_fn, _ = _build(mode, "dc", 1, "average", False, "dcml", tag,
                            cluster=__import__("pipeline").ClusterSettings())
    client = kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as tmp:
        package = f"{tmp}/pipeline.yaml"
        compiler.Compiler().compile(pipeline_fn, package_path=package)
        for point in STUDIES[name][0]:
            args = {**base, **point, "run_name": f"{name}:{label_of(point)}"}
            if experiment:
                args["experiment"] = experiment
            run = client.create_run_from_pipeline_package(package, arguments=args, run_name=args["run_name"],
                                                          experiment_name=f"dcml-study-{name}")
            click.echo(f"submitted {args['run_name']}: {run.run_id}")
    click.echo("when they finish: dcml compare --experiment " + (experiment or base.get("experiment", "dcml")))

