"""The MLflow store: where it is, creating it safely, the experiments dcml logs to.

Locally the store is ``sqlite:///./mlflow/mlflow.db`` with artifacts in
``./mlflow/artifacts`` (never MLflow's ./mlruns file store). Several
``dcml run`` at once on a fresh folder must not race MLflow's schema set-up
(its tables are created and migrated by whichever process opens the store
first): the first opening of a sqlite store, and experiment creation, run
under an exclusive ``fcntl.flock`` on ``<db>.lock`` beside the database.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DEFAULT_EXPERIMENT = "dcml"
# MLflow 3 marks what an experiment is for with this experiment tag; the
# value below is the UI's "Machine learning" (model training) kind, the other
# one being "genai_development" (traces, GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# MLflow 3.17's UI picks the experiment page (runs, or the GenAI overview) from
# its "workflow type" (the GenAI / Model training switch, default GenAI,
# remembered per browser); a link carrying ?workflowType=machine_learning opens
# the runs whatever the browser remembers.
UI_WORKFLOW = "machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`

_opened: set[str] = set()  # stores this process has opened (created/migrated) already


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite store under ./mlflow (never ./mlruns)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def default_store_dir() -> Path:
    return Path(os.environ.get("DCML_MLFLOW_DIR", Path.cwd() / "mlflow")).resolve()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// store (None for other stores)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):])
    return None


def artifact_root(tracking_uri: str) -> str | None:
    """An explicit artifact location for local sqlite stores (next to the db)."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").resolve().as_uri() if db else None


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """Exclusive across processes for a sqlite store (a flock on <db>.lock); no-op for others."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(f"{db}.lock", "a")
    except OSError:  # a store we may only read: nothing to create, nothing to serialise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def connect(tracking_uri: str | None = None) -> str:
    """Point mlflow at the store, creating or migrating its schema once (under the lock); returns the URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if sqlite_path(uri) and uri not in _opened:
        with store_lock(uri):
            # MlflowClient opens (and caches, per process) the store: MLflow creates
            # the tables and runs the migrations here, one process at a time.
            MlflowClient(uri).search_experiments(max_results=1)
        _opened.add(uri)
    return uri


def setup(experiment: str | None = None, tracking_uri: str | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists, marked as a
    model-training experiment; returns its id. Safe when several processes
    create the same experiment at once."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = connect(tracking_uri)
    client = MlflowClient(uri)
    name = experiment or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is None:
        with store_lock(uri):
            exp = client.get_experiment_by_name(name)
            if exp is None:
                root = artifact_root(uri)
                try:
                    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                                    tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
                except MlflowException as exc:  # another process (another host) created it meanwhile
                    exp = client.get_experiment_by_name(name)
                    if exp is None:
                        raise exc from None
    mark_training(client, exp)
    return exp.experiment_id


def mark_training(client, experiment) -> None:
    """Tag an experiment made before dcml marked its experiments (one without a kind) as model training."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def ui_base(tracking_uri: str | None = None) -> str:
    """Where the MLflow UI of this store is: the server itself, else `make mlflow-ui`."""
    uri = tracking_uri or default_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def ui_command(tracking_uri: str | None = None) -> str:
    """A shell command that serves this store's UI from any folder (the database by absolute path, with
    this environment's ``mlflow``); for a tracking server, its address."""
    import shlex
    import sys

    uri = tracking_uri or default_tracking_uri()
    db = sqlite_path(uri)
    if db is None:
        return f"open {ui_base(uri)}"
    exe = Path(sys.executable).with_name("mlflow")
    return (f"{shlex.quote(str(exe) if exe.is_file() else 'mlflow')} ui --backend-store-uri "
            f"{shlex.quote('sqlite:///' + str(db.resolve()))} --host 127.0.0.1 --port 5000")


def ui_url(experiment_id: str, run_id: str | None = None, base: str | None = None) -> str:
    """A link that opens the experiment's training runs (or one run) in MLflow's UI."""
    base = (base or ui_base()).rstrip("/")
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?workflowType={UI_WORKFLOW}"
