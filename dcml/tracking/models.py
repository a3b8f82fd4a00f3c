"""The delivered model in MLflow: an MLflow 3 logged model of flavor ``dcml``, registered.

The logged model (``mlflow.models.Model.log`` with this module as its flavor)
is linked to the pipeline run; its artifacts are the dcml checkpoint itself
(``model.pt``: tensors and plain containers, read back with
``torch.load(weights_only=True)``) and an ``MLmodel`` file naming the
``dcml`` flavor and its loader. Nothing is pickled, and nothing is unpickled
when it loads.

Each newly logged model is registered in the Model Registry under the name of
its experiment (:func:`registered_name`) and the alias ``candidate`` moves to
that newest version. Load it back with::

    from dcml import tracking
    model, checkpoint = tracking.load_logged_model("models:/dcml-demo@candidate")
    file = tracking.download_model("models:/dcml-demo@candidate", "my-model")  # then dcml.load_model(file)
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from dcml.contracts.errors import DcmlError

FLAVOR_NAME = "dcml"
LOGGED_NAME = "model"            # the logged model's name inside its run
MODEL_FILE = "model.pt"          # the dcml checkpoint (dcml.contracts.checkpoint)
MODEL_FORMAT = "mlflow.logged_model"  # tag dcml.model_format: dcml.model_uri is models:/<model id>
ALIAS = "candidate"              # on the newest registered version
LEGACY_DIR = "dcml-model"        # runs:/<run>/dcml-model/model.pt of runs logged before logged models


def registered_name(experiment: str, variant: str | None = None) -> str:
    """The Model Registry name of an experiment's models (``variant``: a compressed copy, e.g. ``loss-aware-4bit``)."""
    name = re.sub(r"[^\w.\- ]", "-", experiment).strip() or "dcml"
    return f"{name}-{variant}" if variant else name


# ------------------------------------------------------------------ the flavor (called by Model.log)
def save_model(path, mlflow_model, checkpoint: str) -> None:
    """Write the model folder: the checkpoint, checked with the loader that reads it back, and ``MLmodel``."""
    from dcml.contracts import checkpoint as checkpoints

    ckpt = checkpoints.load(checkpoint)
    folder = Path(path)
    folder.mkdir(parents=True)
    shutil.copyfile(checkpoint, folder / MODEL_FILE)
    mlflow_model.add_flavor(FLAVOR_NAME, model_file=MODEL_FILE, format=ckpt["format"],
                            model_config=ckpt["model_config"], loader="dcml.tracking.load_logged_model",
                            serialization="torch.save of tensors and plain containers; "
                                          "loaded with torch.load(weights_only=True)")
    mlflow_model.save(str(folder / "MLmodel"))


def log_model(model_path: str, run_id: str, experiment: str, variant: str | None = None,
              description: str = "") -> dict:
    """Log ``model_path`` as a logged model of ``run_id``, register it and move the alias; returns
    {model_uri: models:/<model id>, model_id, registered: the registered model's name, version}."""
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    import mlflow
    from dcml.tracking import store

    info = Model.log(artifact_path=None, name=LOGGED_NAME, flavor=sys.modules[__name__], flavor_name=FLAVOR_NAME,
                     run_id=run_id, model_type="dcml embedding model", checkpoint=model_path)
    name = registered_name(experiment, variant)
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    with store.store_lock(uri):  # version numbers and the alias: one registering process at a time
        version = mlflow.register_model(info.model_uri, name, tags={"dcml.run_id": run_id})
        client.set_registered_model_alias(name, ALIAS, version.version)
        if description:
            client.update_model_version(name, version.version, description=description)
    return {"model_uri": info.model_uri, "model_id": info.model_id, "registered": name, "version": str(version.version)}


def link_model(run_id: str, model_id: str) -> None:
    """Show an already logged model (served from the cache) among this run's logged models too."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.tracking import MlflowClient

    MlflowClient().log_outputs(run_id, models=[LoggedModelOutput(model_id, step=0)])


# ------------------------------------------------------------------ loading back (no unpickling)
def download_model(model_uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """The dcml checkpoint of a logged or registered model, downloaded into folder ``dst``; returns the file.

    ``model_uri``: ``models:/<name>@candidate``, ``models:/<name>/<version>``, ``models:/<model id>``
    (``dcml.model_uri`` of a run) or a legacy ``runs:/<run>/dcml-model/model.pt``. A model of another
    flavor (e.g. mlflow.pytorch, a pickle) is refused before any of its files is loaded."""
    import mlflow

    if not model_uri.startswith("models:/") and not model_uri.endswith(f"/{LEGACY_DIR}/{MODEL_FILE}"):
        raise DcmlError(f"{model_uri}: not a dcml model URI (expected models:/<name>@{ALIAS}, models:/<name>/<version> "
                        f"or the dcml.model_uri tag of a run)")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        if model_uri.startswith("models:/"):
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
            _check_flavor(model_uri, str(folder / "MLmodel"))
            local = folder / MODEL_FILE
        else:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    except DcmlError:
        raise
    except Exception as exc:  # noqa: BLE001 - MlflowException, OSError: one line either way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DcmlError(f"{model_uri}: cannot download the model ({first[:200]}); check the name, alias or run "
                        "id and the store (--tracking-uri / MLFLOW_TRACKING_URI)") from None
    return Path(local)


def _check_flavor(model_uri: str, mlmodel_file: str) -> None:
    from mlflow.models import Model

    flavors = Model.load(mlmodel_file).flavors
    if FLAVOR_NAME not in flavors:
        raise DcmlError(f"{model_uri}: not a dcml model (its MLmodel has flavors {', '.join(sorted(flavors))}, "
                        f"not {FLAVOR_NAME}); models logged with mlflow.pytorch (pickle) are not loaded by dcml")


def load_logged_model(model_uri: str, device="cpu", tracking_uri: str | None = None):
    """(EmbeddingModel in eval mode, checkpoint dict) of a logged or registered dcml model (see
    :func:`download_model` for the URIs).

    Reads the checkpoint with ``torch.load(weights_only=True)``: a file holding
    pickled code (anything but tensors and plain containers) is refused with a
    one-line DcmlError instead of being run.
    """
    from dcml.model_files import load_model

    with tempfile.TemporaryDirectory() as tmp:
        local = download_model(model_uri, tmp, tracking_uri)
        try:
            return load_model(local, device=device)
        except DcmlError as exc:
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).replace(str(local), model_uri)
            if "Weights only load failed" in message or "pickled Python objects" in message:
                message = (f"{model_uri}: refused: the file holds pickled objects, not only tensors and plain "
                           "containers (torch.load weights_only=True rejected it), so loading it could run code; "
                           "do not load it, log the model again with `dcml run`")
            raise DcmlError(message) from None
