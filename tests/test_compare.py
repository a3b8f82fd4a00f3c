"""Runs told apart: names that say what differs, and `dcml compare` (real sqlite store, real CLI)."""

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from dcml import tracking
from dcml.contracts import params
from dcml_app.cli import cli

_spec = importlib.util.spec_from_file_location("tracking_lineage", Path(__file__).with_name("tracking_lineage.py"))
lineage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lineage)

PIPELINE = [p.name for p in params.pipeline_params()]


def as_kfp_hands_them_over(**changes) -> dict:
    """Every pipeline parameter as the track step gets it under kfp.local: text, whole numbers as '3.0'."""
    values = {**params.defaults(PIPELINE), "dataset": "fashion-mnist", "num_clusters": 2, "loss": "margin",
              **changes}
    return {k: (f"{float(v)}" if isinstance(v, int) and not isinstance(v, bool) else str(v).lower()
                if isinstance(v, bool) else str(v)) for k, v in values.items()}


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def log(tmp_path, experiment, run_name=None, **changes) -> str:
    folder = tmp_path / f"lineage-{len(list(tmp_path.glob('lineage-*')))}"
    folder.mkdir()
    metrics_path, _ = lineage.fake_lineage(folder)
    return tracking.log_pipeline_run(str(metrics_path), experiment=experiment, run_name=run_name,
                                     pipeline_params=as_kfp_hands_them_over(**changes))


def test_parameters_are_read_back_with_their_types_and_names_say_what_differs(tmp_path, store):
    client = MlflowClient(store)
    first = client.get_run(log(tmp_path, "names"))
    assert first.data.params == {k: str(v) for k, v in {**params.defaults(PIPELINE), "dataset": "fashion-mnist",
                                                        "num_clusters": 2, "loss": "margin"}.items()}
    assert first.data.params["epochs"] == str(params.PARAMS["epochs"].default) and first.data.params["check_images"] == "False"
    base = "fashion-mnist dc-shared K=2 margin seed0"
    assert first.info.run_name == base
    assert client.get_run(log(tmp_path, "names", lr_backbone=0.002)).info.run_name == f"{base} lr_backbone=0.002"
    assert client.get_run(log(tmp_path, "names")).info.run_name == f"{base} #2"  # the same again
    many = client.get_run(log(tmp_path, "names", epochs=3, margin=0.1, lr_embedding=0.01, miner="none",
                              data_root="/data/photos/holiday")).info.run_name
    assert many == f"{base} data_root=holiday epochs=3 lr_embedding=0.01 +2"
    assert client.get_run(log(tmp_path, "names", run_name="mine")).info.run_name == "mine"  # a given name stays


def test_compare_shows_what_differs_every_parameter_wide_and_distinct_plot_labels(tmp_path, store):
    ids = [log(tmp_path, "cmp", run_name="same name"), log(tmp_path, "cmp", run_name="same name", lr_backbone=0.002),
           log(tmp_path, "cmp", lr_backbone=0.002, epochs=3)]
    default = CliRunner().invoke(cli, ["compare", "--experiment", "cmp"])
    assert default.exit_code == 0, default.output
    header = default.output.splitlines()[1].split()
    assert header == ["run", "epochs", "lr_backbone", "recall@1", "map@r", "r_precision", "nmi", "duration"]

    csv = CliRunner().invoke(cli, ["compare", "--experiment", "cmp", "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    import io

    import pandas as pd

    table = pd.read_csv(io.StringIO(csv.output), keep_default_na=False)
    assert set(PIPELINE) <= set(table.columns) and {"run", "run_id", "method", "mode"} <= set(table.columns)
    assert sorted(table["run_id"]) == sorted(ids)
    assert sorted(table["lr_backbone"].astype(str)) == ["0.0001", "0.002", "0.002"]
    wide = CliRunner().invoke(cli, ["compare", "--experiment", "cmp", "--wide"])
    assert wide.exit_code == 0 and all(name in wide.output for name in ("lr_backbone", "run_id", ids[0], "gpus_per_task"))

    from dcml.tracking import plots

    drawn = []
    original = plots._save
    plots._save = lambda fig, dest: (drawn.append(fig), original(fig, dest))
    try:
        plotted = CliRunner().invoke(cli, ["compare", "--experiment", "cmp", "--plot", str(tmp_path / "r1.png")])
    finally:
        plots._save = original
    assert plotted.exit_code == 0, plotted.output
    labels = [t.get_text() for t in drawn[0].axes[0].get_xticklabels()]
    assert len(set(labels)) == 3 and sum(label.startswith("same name (") for label in labels) == 2
