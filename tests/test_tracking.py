"""MLflow run tree from stage records, against a real sqlite store."""

import importlib.util
import json
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from dcml.contracts import params, records
from dcml.contracts.errors import DcmlError
from dcml import tracking
from dcml_app.cli import cli
from dcml.contracts.io import write_json

_spec = importlib.util.spec_from_file_location("tracking_lineage", Path(__file__).with_name("tracking_lineage.py"))
lineage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lineage)
fake_lineage, child_runs = lineage.fake_lineage, lineage.child_runs
VALIDATED_HISTORY, TINY_MODEL = lineage.VALIDATED_HISTORY, lineage.TINY_MODEL


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def store(store_dir, monkeypatch):
    # One database for the module: creating an MLflow schema takes seconds.
    uri = f"sqlite:///{store_dir / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_run_tree_params_metrics_history_and_plots(tmp_path, store):
    metrics_path, emb = fake_lineage(tmp_path)
    out = tmp_path / "mlflow_run.json"
    run_id = tracking.log_pipeline_run(str(metrics_path), embeddings=str(emb), experiment="tree", run_name="demo",
                                       out=str(out))
    client = MlflowClient(store)
    parent = client.get_run(run_id)
    assert parent.data.tags["dcml.kind"] == "pipeline"
    assert parent.data.params["dataset"] == "fashion-mnist"
    assert parent.data.params["num_clusters"] == "2"
    assert parent.data.params["loss"] == "margin"
    assert parent.data.params["margin"] == "0.2"
    assert parent.data.params["finetune_epochs"] == "2"
    assert parent.data.params["epochs"] == "4"
    # only pipeline parameters on the parent run: the stages' internals are on their own runs
    assert set(parent.data.params) <= {p.name for p in params.pipeline_params()}
    assert not set(parent.data.params) & {"num_slices", "mode", "k", "git_commit"}
    assert parent.data.tags["dcml.git_commit"] and parent.data.tags["dcml.method"] == "dc"
    assert parent.data.tags["dcml.mode"] == "shared"
    assert parent.data.metrics["recall_at_1"] == pytest.approx(0.71)
    assert parent.data.metrics["map_at_r"] == pytest.approx(0.3)
    # bookkeeping under system/ (MLflow's System metrics tab); the training curves on the parent too
    assert "system/seconds.train" in parent.data.metrics and "seconds.train" not in parent.data.metrics
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert not any(k.startswith("train/seconds") for k in parent.data.metrics)
    assert "R@1 0.7100" in parent.data.tags["mlflow.note.content"]  # the description

    children = child_runs(client, parent.info.experiment_id, run_id)
    by_stage = {c.data.tags["dcml.stage"]: c for c in children}
    assert set(by_stage) == {"ingest", "cluster", "train", "finetune", "evaluate"}
    assert all(c.data.tags["dcml.cached"] == "false" for c in children)
    train = by_stage["train"]
    loss_history = client.get_metric_history(train.info.run_id, "epoch.loss")
    assert [m.step for m in loss_history] == [0, 1, 2, 3]
    assert [m.value for m in loss_history] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert [m.step for m in client.get_metric_history(train.info.run_id, "epoch.recall_at_1")] == [1, 3]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "system/epoch.seconds")] == [0, 1, 2, 3]
    assert "system/duration_s" in train.data.metrics and "epoch.seconds" not in train.data.metrics
    assert by_stage["cluster"].data.params["k"] == "2"  # a stage's own names and internals on its run

    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {"plots/training_curves.png", "plots/recall_at_k.png", "plots/cluster_sizes.png",
                         "plots/embedding_map.png"}
    assert json.loads(out.read_text())["mlflow_run_id"] == run_id


def test_second_run_marks_stages_served_from_cache(tmp_path, store):
    metrics_path, emb = fake_lineage(tmp_path)
    first = tracking.log_pipeline_run(str(metrics_path), experiment="cache")
    second = tracking.log_pipeline_run(str(metrics_path), experiment="cache")
    client = MlflowClient(store)
    exp_id = client.get_run(first).info.experiment_id
    assert {c.data.tags["dcml.cached"] for c in child_runs(client, exp_id, first)} == {"false"}
    again = child_runs(client, exp_id, second)
    assert len(again) == 5
    assert {c.data.tags["dcml.cached"] for c in again} == {"true"}


def test_store_is_sqlite_with_explicit_artifact_location(tmp_path, store, store_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics_path, _ = fake_lineage(tmp_path)
    run_id = tracking.log_pipeline_run(str(metrics_path), experiment="where")
    assert mlflow.get_tracking_uri() == store
    exp = MlflowClient(store).get_experiment_by_name("where")
    assert exp.artifact_location == (store_dir / "mlflow" / "artifacts" / "where").as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert MlflowClient(store).get_run(run_id).info.artifact_uri.startswith(exp.artifact_location)


def test_compare_lists_runs_best_first(tmp_path, store):
    metrics_path, _ = fake_lineage(tmp_path)
    tracking.log_pipeline_run(str(metrics_path), experiment="cmp", run_name="first")
    better = json.loads(metrics_path.read_text())
    better["metrics"]["recall@1"] = 0.9
    write_json(metrics_path, better)
    tracking.log_pipeline_run(str(metrics_path), experiment="cmp", run_name="second")
    plot = tmp_path / "cmp.png"
    result = CliRunner().invoke(cli, ["compare", "--experiment", "cmp", "--format", "csv", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in result.output.strip().splitlines()[:3]]
    header = rows[0]
    assert header[0] == "run" and "recall@1" in header and "num_clusters" in header
    assert [rows[1][0], rows[2][0]] == ["second", "first"]
    assert plot.stat().st_size > 1000


def test_compare_metric_names_narrow_table_and_zoomed_plot(tmp_path, store, capsys):
    from dcml_app.cli import main as dcml_main

    metrics_path, _ = fake_lineage(tmp_path)
    for name, r1 in (("close-a", 0.864), ("close-b", 0.892)):
        data = json.loads(metrics_path.read_text())
        data["metrics"]["recall@1"] = r1
        write_json(metrics_path, data)
        tracking.log_pipeline_run(str(metrics_path), experiment="narrow", run_name=name)
    # An unknown metric: one line, exit 2, nothing printed before it, every logged metric offered.
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        dcml_main(["compare", "--experiment", "narrow", "--metric", "foo", "--plot", str(tmp_path / "foo.png")])
    bad = capsys.readouterr()
    assert done.value.code == 2 and bad.out == "" and len(bad.err.strip().splitlines()) == 1
    assert bad.err.startswith("error: --metric foo: not logged in the runs of experiment 'narrow'")
    assert all(m in bad.err for m in ("recall@1", "map@r", "r_precision", "nmi", "ami"))
    assert not (tmp_path / "foo.png").exists()
    # MLflow's spelling works; the default table is narrow, --wide has everything.
    plot = tmp_path / "r1.png"
    dcml_main(["compare", "--experiment", "narrow", "--metric", "recall_at_1", "--plot", str(plot)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("experiment: narrow (sorted by recall@1")
    # the two runs differ in no parameter: only names, metrics and durations
    assert lines[1].split() == ["run", "recall@1", "map@r", "r_precision", "nmi", "duration"]
    assert [line.split()[0] for line in lines[2:4]] == ["close-b", "close-a"]
    assert max(len(line) for line in lines[1:4]) <= 100
    dcml_main(["compare", "--experiment", "narrow", "--wide"])
    wide = capsys.readouterr().out.splitlines()
    assert len(wide[1]) > 150 and "recall@8" in wide[1] and "embedding_dim" in wide[1]
    assert plot.stat().st_size > 1000
    # The plot's axis is zoomed to the values, which are printed on the bars.
    from matplotlib.figure import Figure

    from dcml.tracking import plots

    drawn = []
    original = plots._save
    plots._save = lambda fig, dest: (drawn.append(fig), original(fig, dest))
    try:
        plots.plot_metric(tracking.compare_runs("narrow", "recall@1", store), "recall@1", str(tmp_path / "again.png"))
    finally:
        plots._save = original
    axis = drawn[0].axes[0]
    low, high = axis.get_ylim()
    assert isinstance(drawn[0], Figure) and 0.8 < low < 0.864 and 0.892 < high < 0.95
    assert sorted(t.get_text() for t in axis.texts) == ["0.8640", "0.8920"]


def test_compare_without_runs_is_a_clear_error(tmp_path, store):
    result = CliRunner().invoke(cli, ["compare", "--experiment", "nothing-here"])
    assert result.exit_code != 0


# -- training curves with validation (the epoch kept, val and test R@1) ---------------------------------

def test_validation_history_is_logged_as_step_metrics(tmp_path, store):
    metrics_path, _ = fake_lineage(tmp_path, validated=True)
    run_id = tracking.log_pipeline_run(str(metrics_path), experiment="validated")
    client = MlflowClient(store)
    train = next(c for c in child_runs(client, client.get_run(run_id).info.experiment_id, run_id)
                 if c.data.tags["dcml.stage"] == "train")
    history = {key: [(m.step, m.value) for m in client.get_metric_history(train.info.run_id, key)]
               for key in ("epoch.val_recall_at_1", "epoch.val_map_at_r", "epoch.recall_at_1", "epoch.loss",
                           "epoch.best_epoch", "epoch.lr.backbone")}
    assert history["epoch.val_recall_at_1"] == [(0, 0.40), (1, 0.55), (2, 0.62), (3, 0.60)]
    assert [s for s, _ in history["epoch.val_map_at_r"]] == [0, 1, 2, 3]
    assert [s for s, _ in history["epoch.recall_at_1"]] == [0, 1, 2, 3]
    assert [s for s, _ in history["epoch.loss"]] == [1, 2, 3]  # the initial model has no loss
    assert history["epoch.best_epoch"] == [(1, 1.0), (2, 2.0), (3, 2.0)]
    assert history["epoch.lr.backbone"] == [(1, 1e-4)]
    assert "plots/training_curves.png" in {a.path for a in client.list_artifacts(run_id, "plots")}


def test_training_curves_show_validation_beside_loss_and_mark_the_epoch_kept(tmp_path):
    train = records.StageTimer("train", {}).finish(history=VALIDATED_HISTORY)
    fig = tracking.training_curves_figure([train])
    loss_ax, val_ax, test_ax = fig.axes
    assert "loss" in loss_ax.get_title()
    assert "validation" in val_ax.get_title() and "test" in test_ax.get_title()
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["train val R@1"].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["train val MAP@R"].get_ydata()) == [0.10, 0.20, 0.25, 0.24]
    assert list(lines["train test R@1"].get_xdata()) == [0, 1, 2, 3]
    assert list(lines["train"].get_xdata()) == [1, 2, 3]  # loss: no point for the initial model
    kept = lines["train kept: epoch 2"]
    assert (list(kept.get_xdata()), list(kept.get_ydata()), kept.get_marker()) == ([2], [0.62], "*")
    # The epoch kept is marked on every panel.
    for ax in fig.axes:
        assert any(list(line.get_xdata()) == [2, 2] for line in ax.get_lines())
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


# -- run names -------------------------------------------------------------------------------------

def test_a_run_without_a_name_is_named_from_its_lineage(tmp_path, store):
    metrics_path, _ = fake_lineage(tmp_path)
    run_id = tracking.log_pipeline_run(str(metrics_path), experiment="names")
    assert MlflowClient(store).get_run(run_id).info.run_name == "fashion-mnist dc-shared K=2 margin seed0"
    named = tracking.log_pipeline_run(str(metrics_path), experiment="names", run_name="mine")
    assert MlflowClient(store).get_run(named).info.run_name == "mine"


@pytest.mark.parametrize("stages,name", [
    ([("ingest", {"dataset": "cars196"}), ("cluster", {"k": 4}),
      ("train", {"mode": "shared", "loss": "margin", "seed": 0})], "cars196 dc-shared K=4 margin seed0"),
    ([("ingest", {"dataset": "cub200"}), ("cluster", {"k": 8}),
      ("train", {"mode": "worker", "cluster_id": 0, "loss": "triplet", "seed": 3})], "cub200 dc-parallel K=8 triplet seed3"),
    ([("ingest", {"dataset": "sop"}), ("train-dfml", {"groups": 2, "loss": "proxy_anchor", "seed": 1})],
     "sop dfml G=2 proxy_anchor seed1"),
])
def test_run_names_say_dataset_method_mode_k_loss_seed(stages, name):
    lineage = [records.StageTimer(stage, params).finish() for stage, params in stages]
    assert tracking.run_name_for(lineage) == name


# -- experiments are model-training experiments ------------------------------------------------------

def test_experiments_are_marked_model_training_when_created_and_when_found_unmarked(store):
    client = MlflowClient(store)
    new_id = tracking.setup("kind-new", store)
    assert client.get_experiment(new_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old_id = client.create_experiment("kind-old")  # made before dcml marked its experiments
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old_id).tags
    assert tracking.setup("kind-old", store) == old_id
    assert client.get_experiment(old_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.ui_url(new_id, base="http://h:1") == f"http://h:1/#/experiments/{new_id}?workflowType=machine_learning"


# -- `dcml compare` with no options --------------------------------------------------------------------

def test_compare_without_options_shows_the_experiment_with_the_latest_run(tmp_path, monkeypatch):
    # A store of its own: runs of the other tests carry pipeline start times of their own lineages.
    store = f"sqlite:///{tmp_path / 'own' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    metrics_path, _ = fake_lineage(tmp_path)
    tracking.log_pipeline_run(str(metrics_path), experiment="dcml-older", run_name="older run")
    tracking.log_pipeline_run(str(metrics_path), experiment="dcml-demo", run_name="demo run")
    result = CliRunner().invoke(cli, ["compare"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("experiment: dcml-demo (sorted by recall@1")
    assert "demo run" in result.output and "older run" not in result.output
    picked = CliRunner().invoke(cli, ["compare", "--experiment", "dcml-older", "--format", "csv"])
    assert picked.exit_code == 0, picked.output
    assert [line.split(",")[0] for line in picked.output.strip().splitlines()[1:]] == ["older run"]
    assert tracking.latest_experiment(store) == "dcml-demo"
    # An experiment of dcml runs from before experiments were marked gets marked when compared.
    client = MlflowClient(store)
    older = client.get_experiment_by_name("dcml-older")
    client.delete_experiment_tag(older.experiment_id, tracking.EXPERIMENT_KIND_TAG)
    assert CliRunner().invoke(cli, ["compare", "--experiment", "dcml-older"]).exit_code == 0
    assert client.get_experiment(older.experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


# -- the model: a dcml checkpoint, never a pickle ---------------------------------------------------------

def _embed(model):
    torch.manual_seed(1)
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        return model(images)


class _Payload:
    """Runs code when unpickled: what a malicious 'model' file would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_model_is_a_registered_logged_model_that_loads_without_unpickling(tmp_path, store):
    model_file = tmp_path / "model.pt"
    metrics_path, _ = fake_lineage(tmp_path, model=model_file)
    run_id = tracking.log_pipeline_run(str(metrics_path), model=str(model_file), experiment="model")
    client = MlflowClient(store)
    run = client.get_run(run_id)
    tags = run.data.tags
    # an MLflow 3 logged model of the run, flavor dcml: the checkpoint and MLmodel, nothing pickled
    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.source_run_id == run_id and tags["dcml.model_uri"] == f"models:/{logged.model_id}"
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    assert tags["dcml.model_format"] == "mlflow.logged_model" and tags["dcml.model_logged"] == "true"
    files = sorted(a.path for a in client.list_logged_model_artifacts(logged.model_id))
    assert "model.pt" in files and "MLmodel" in files and not [f for f in files if f.endswith((".pkl", ".pickle"))]
    from mlflow.models import Model

    flavor = Model.load(f"models:/{logged.model_id}").flavors["dcml"]
    assert flavor["model_config"] == TINY_MODEL.config and flavor["loader"] == "dcml.tracking.load_logged_model"
    assert logged.params["dataset"] == "fashion-mnist"  # the run's parameters travel with it
    # registered under the experiment's name, the alias candidate on the newest version
    version = client.get_model_version_by_alias("model", "candidate")
    assert (str(version.version), version.source) == ("1", f"models:/{logged.model_id}")
    assert tags["dcml.registered_model"] == "model" and tags["dcml.registered_version"] == "1"
    assert "models:/model/1" in tags["mlflow.note.content"]

    for uri in ("models:/model@candidate", "models:/model/1", tags["dcml.model_uri"]):
        model, _ = tracking.load_logged_model(uri)
        assert torch.allclose(_embed(model), _embed(TINY_MODEL.eval()), atol=1e-6)
    file = tracking.download_model("models:/model@candidate", tmp_path / "mine")
    assert file == tmp_path / "mine" / "model.pt" and file.read_bytes() == model_file.read_bytes()

    # The same model served from the cache: the next run links the logged model, registers nothing new.
    again = client.get_run(tracking.log_pipeline_run(str(metrics_path), model=str(model_file), experiment="model"))
    assert again.data.tags["dcml.model_uri"] == tags["dcml.model_uri"] and "dcml.model_logged" not in again.data.tags
    assert [o.model_id for o in again.outputs.model_outputs] == [logged.model_id]
    assert [str(v.version) for v in client.search_model_versions("name = 'model'")] == ["1"]
    # Another model: version 2 gets the alias.
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    other_metrics, _ = fake_lineage(other.parent, model=other)
    third = client.get_run(tracking.log_pipeline_run(str(other_metrics), model=str(other), experiment="model"))
    assert third.data.tags["dcml.registered_version"] == "2"
    assert str(client.get_model_version_by_alias("model", "candidate").version) == "2"

    # A tampered copy of the artifact that carries pickled code is refused, and the code never runs.
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil" / "model.pt"
    evil.parent.mkdir()
    torch.save({**torch.load(model_file, weights_only=True), "model": {"weight": _Payload(marker)}}, evil)
    experiment_id = run.info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name="tampered") as tampered:
        mlflow.log_artifact(str(evil), artifact_path="dcml-model")
    uri = f"runs:/{tampered.info.run_id}/dcml-model/model.pt"  # the layout of runs logged before logged models
    with pytest.raises(DcmlError) as refused:
        tracking.load_logged_model(uri)
    message = str(refused.value)
    print(f"refused: {message}")
    assert "\n" not in message and message.startswith(f"{uri}: refused: the file holds pickled objects")
    assert not marker.exists()
    # (The payload is real: an unrestricted unpickler runs it.)
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"


def test_a_model_logged_with_mlflow_pytorch_is_refused_unread(tmp_path, store):
    import mlflow.pytorch

    with pytest.raises(DcmlError, match="not a dcml model URI"):
        tracking.load_logged_model("runs:/0123/model/data/model.pth")
    with mlflow.start_run(experiment_id=tracking.setup("pickled", store)):
        info = mlflow.pytorch.log_model(TINY_MODEL, name="pickled", pip_requirements=[], serialization_format="pickle")
    with pytest.raises(DcmlError) as refused:
        tracking.load_logged_model(info.model_uri)
    assert "not a dcml model (its MLmodel has flavors" in str(refused.value) and "pytorch" in str(refused.value)
    with pytest.raises(DcmlError, match="cannot download the model"):
        tracking.load_logged_model("models:/no-such-model@candidate")


# -- the parent run spans the pipeline; the UI command works from any folder -------------------------------

def _shift_started(obj, started: str):
    if isinstance(obj, dict):
        return {k: (started if k == "started" else _shift_started(v, started)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shift_started(v, started) for v in obj]
    return obj


def test_parent_run_duration_is_the_pipelines_not_the_track_steps(tmp_path, store):
    from datetime import datetime, timedelta, timezone

    metrics_path, _ = fake_lineage(tmp_path)
    began = (datetime.now(timezone.utc) - timedelta(seconds=275)).replace(microsecond=0)
    write_json(metrics_path, _shift_started(json.loads(metrics_path.read_text()), began.isoformat()))
    run_id = tracking.log_pipeline_run(str(metrics_path), experiment="duration")
    info = MlflowClient(store).get_run(run_id).info
    assert info.start_time == int(began.timestamp() * 1000)
    assert info.end_time - info.start_time >= 275_000
    # Every stage served from the cache: the run is the track step alone (it starts when it is logged).
    again = MlflowClient(store).get_run(tracking.log_pipeline_run(str(metrics_path), experiment="duration")).info
    assert again.start_time > info.end_time - 1000


def test_ui_command_names_the_store_of_the_run_from_any_folder(tmp_path, store):
    """The printed command: this environment's mlflow by absolute path, the run's store by absolute path
    (started for real it takes over a minute here, so the test opens the store it names from another folder)."""
    import os
    import shlex
    import subprocess

    metrics_path, _ = fake_lineage(tmp_path)
    run_id = tracking.log_pipeline_run(str(metrics_path), experiment="ui-anywhere")
    relative = os.path.relpath(store.removeprefix("sqlite:///"), Path.cwd())
    args = shlex.split(tracking.ui_command(f"sqlite:///{relative}"))  # as a run in this folder names its store
    assert Path(args[0]).is_absolute() and Path(args[0]).is_file() and args[1] == "ui"
    uri = args[args.index("--backend-store-uri") + 1]
    assert uri == store
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import sys; from mlflow.tracking import MlflowClient; "
             "print(MlflowClient(sys.argv[1]).get_run(sys.argv[2]).info.run_id)")
    done = subprocess.run([str(Path(args[0]).with_name("python")), "-c", probe, uri, run_id], cwd=elsewhere,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert done.returncode == 0 and done.stdout.strip() == run_id, done.stderr[-1000:]
    assert tracking.ui_command("http://mlflow.example:5000") == "open http://mlflow.example:5000"


def test_the_index_match_threshold_table_is_logged(tmp_path, store):
    table = [{"false_match_rate": 0.01, "threshold": 0.8, "measured_false_match_rate": 0.01, "true_match_rate": 0.6}]
    record = records.StageTimer("index", {"out": str(tmp_path / "index")}).finish(
        metrics={"images": 3, "match_threshold": 0.8, "match_true_rate": 0.6},
        extra={"verification": {"threshold": 0.8, "false_match_rate": 0.01}, "threshold_table": table})
    metrics_path = tmp_path / "index-metrics.json"
    write_json(metrics_path, {"metrics": record["metrics"], "record": record})
    run_id = tracking.log_pipeline_run(str(metrics_path), experiment="threshold")
    client = MlflowClient(store)
    child = child_runs(client, client.get_run(run_id).info.experiment_id, run_id)[0]
    assert child.data.metrics["match_threshold"] == pytest.approx(0.8)
    logged = mlflow.artifacts.load_dict(f"runs:/{child.info.run_id}/verification/threshold_table.json")
    assert logged == {"verification": {"threshold": 0.8, "false_match_rate": 0.01}, "table": table}
