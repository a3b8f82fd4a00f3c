"""`dcml compare`: pipeline runs of an MLflow experiment side by side."""

from __future__ import annotations

import click

from dcml.contracts.errors import DcmlError


@click.command("compare")
@click.option("--experiment", default=None,
              help="MLflow experiment name [default: the experiment with the most recent dcml pipeline run].")
@click.option("--metric", default="recall@1", show_default=True,
              help="Sort by this metric, best first (dcml or MLflow spelling: recall@1 or recall_at_1).")
@click.option("--wide", is_flag=True, help="Every parameter and metric, and the run id (the table shows the "
              "parameters that differ between the runs).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Save a bar chart of the metric per run (PNG).")
@click.option("--all", "include_all", is_flag=True,
              help="Also list runs that did not finish (running, failed, killed), with their status.")
@click.option("--tracking-uri", default=None, help="Defaults to $MLFLOW_TRACKING_URI or sqlite:///./mlflow/mlflow.db.")
def compare_cli(experiment, metric, wide, fmt, plot, include_all, tracking_uri):
    """Compare pipeline runs: the parameters that differ between them next to the key metrics, best first
    (--wide: every parameter and metric and the run id; --format csv always has everything)."""
    from dcml.contracts.io import check_writable
    from dcml.tracking import compare, plot_metric

    if plot:
        check_writable(plot)
    table = compare.compare_runs(experiment, metric, tracking_uri, include_all=include_all)
    if table.empty:
        raise DcmlError(compare.no_runs_message(table, experiment, include_all))
    key = table.attrs["metric"]
    if fmt == "csv":
        click.echo(table.drop(columns=["duration"]).to_csv(index=False), nl=False)
    else:
        shown = table.drop(columns=["duration_s"]) if wide else compare.narrow(table, key)
        click.echo(f"experiment: {table.attrs['experiment']} (sorted by {key}; "
                   f"{'every column' if wide else 'the parameters that differ; --wide shows every parameter'})")
        click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if plot:
        plot_metric(table.assign(run=compare.plot_labels(table)), key, plot)
        click.echo(f"plot: {plot}")
