"""Multi-node training as a Kubeflow TrainJob (dcml.trainjob), against a fake Kubernetes API.

No cluster runs here. The fake implements the few client calls the launcher
makes (CustomObjectsApi: create / get / delete a namespaced custom object;
CoreV1Api: list pods, read a pod's log), records the TrainJob it is given and
plays back a status. In the end-to-end test it also does what the Trainer
controller and the torch-distributed runtime would: it starts one torchrun
agent per node with the runtime's PET_* variables (here two "nodes" on this
machine, gloo), so the command the launcher put in the TrainJob really trains,
and the checkpoint comes back through the workspace.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kfp.dsl import TaskConfig

from dcml import trainjob
from dcml.contracts.errors import DcmlError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fmnist_data", REPO / "components" / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)

TASK_CONFIG = TaskConfig(
    resources={"limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "32", "memory": "256Gi"}},
    env=[{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow"}],
    volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "dcml-data"}},
             {"name": "kfp-workspace", "persistentVolumeClaim": {"claimName": "run-1-kfp-workspace"}}],
    volume_mounts=[{"name": "data", "mountPath": "/data"}, {"name": "kfp-workspace", "mountPath": "/kfp-workspace"}],
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    node_selector={"accelerator": "a100"},
    affinity=None,
)


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeCluster:
    """CustomObjectsApi + CoreV1Api, enough for the launcher.

    ``script``: statuses ``get`` returns one after another (the last one stays);
    ``run=True``: create starts the job's nodes as local torchrun agents and the
    status follows them (Created -> Running -> Complete / Failed).
    """

    def __init__(self, script=None, logs=None, run=False, pythonpath=None):
        self.created, self.deleted, self.gets = [], [], 0
        self.script = list(script or [])
        self.logs = {pod: list(lines) for pod, lines in (logs or {}).items()}
        self.run, self.pythonpath = run, pythonpath
        self.nodes: list[tuple[subprocess.Popen, Path]] = []
        self.seen: dict[str, int] = {}

    # -- CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        self.created.append(body)
        if self.run:
            self._start(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.gets += 1
        job = dict(self.created[-1])
        if self.run:
            job["status"] = self._status()
        elif self.script:
            job["status"] = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return job

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body=None):
        self.deleted.append(name)
        for proc, _ in self.nodes:
            proc.kill()

    # -- CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector):
        name = self.created[-1]["metadata"]["name"]
        assert label_selector == f"jobset.sigs.k8s.io/jobset-name={name}"
        pods = sorted(self.logs) if not self.run else [f"{name}-node-0-{i}" for i in range(len(self.nodes))]
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(
            name=pod, labels={"jobset.sigs.k8s.io/job-index": pod.rsplit("-", 1)[-1]})) for pod in pods])

    def read_namespaced_pod_log(self, name, namespace, container, timestamps, since_seconds=None):
        assert container == "node" and timestamps
        if self.run:  # stamp the lines a node printed since the last read
            index = int(name.rsplit("-", 1)[-1])
            text = self.nodes[index][1].read_text(errors="replace").splitlines()
            new = text[self.seen.get(name, 0):]
            self.seen[name] = len(text)
            self.logs.setdefault(name, []).extend((stamp(), line) for line in new)
        lines = self.logs.get(name, [])
        if since_seconds is not None:  # what the API does: whole seconds back from now (here: everything)
            pass
        return "".join(f"{ts} {line}\n" for ts, line in lines)

    # -- the job's nodes, as the torch-distributed runtime starts them
    def _start(self, body):
        trainer = body["spec"]["trainer"]
        command = trainer["command"]
        assert command[:2] == ["torchrun", "-m"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        logs = Path(os.environ["FAKE_CLUSTER_LOGS"])
        for node in range(trainer["numNodes"]):
            env = {**os.environ, **{e["name"]: e["value"] for e in trainer.get("env", [])},
                   "PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                   "PET_NODE_RANK": str(node), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
                   "PYTHONPATH": self.pythonpath, "OMP_NUM_THREADS": "1"}
            log = logs / f"node-{node}.log"
            with open(log, "w") as fh:
                proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *command[1:]], env=env,
                                        stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
            self.nodes.append((proc, log))

    def _status(self):
        codes = [proc.poll() for proc, _ in self.nodes]
        if any(c not in (None, 0) for c in codes):
            return {"conditions": [{"type": "Created", "status": "True"},
                                   {"type": "Failed", "status": "True", "reason": "JobFailed",
                                    "message": f"node exit codes {codes}"}]}
        if all(c == 0 for c in codes):
            return {"conditions": [{"type": "Created", "status": "True"},
                                   {"type": "Complete", "status": "True", "message": "jobs completed"}]}
        return {"conditions": [{"type": "Created", "status": "True"}],
                "jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}]}


# -- the TrainJob object ----------------------------------------------------------------

def test_the_trainjob_carries_the_task_config_through():
    body = trainjob.manifest("dcml-train-shared-1a2b3c4d", "team-ml", image="registry/dcml-train:abc",
                             command=["torchrun", "-m", "dcml.launch", "--call", "{}"], num_nodes=2, nproc_per_node=8,
                             task_config=TASK_CONFIG, env=[{"name": "DCML_RESUME_ROOT", "value": "/kfp-workspace/r"},
                                                           {"name": "MLFLOW_TRACKING_URI", "value": "shadowed"}],
                             owner={"name": "launcher-pod", "uid": "u-1"})
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == "dcml-train-shared-1a2b3c4d" and body["metadata"]["namespace"] == "team-ml"
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "launcher-pod",
                                                    "uid": "u-1", "controller": False, "blockOwnerDeletion": False}]
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    t = spec["trainer"]
    assert (t["numNodes"], t["numProcPerNode"], t["image"]) == (2, 8, "registry/dcml-train:abc")
    assert t["resourcesPerNode"] == TASK_CONFIG.resources
    assert t["command"][:3] == ["torchrun", "-m", "dcml.launch"]
    # The task's env first; the launcher's own only where the task sets nothing.
    assert t["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow"},
                        {"name": "DCML_RESUME_ROOT", "value": "/kfp-workspace/r"}]
    (override,) = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    pod = override["spec"]
    assert pod["tolerations"] == TASK_CONFIG.tolerations and pod["nodeSelector"] == {"accelerator": "a100"}
    assert "affinity" not in pod
    assert [v["name"] for v in pod["volumes"]] == ["data", "kfp-workspace", "dshm"]
    assert pod["volumes"][2] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {"name": "kfp-workspace", "mountPath": "/kfp-workspace"} in container["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_job_names_are_dns_labels():
    for prefix in ("dcml-train-shared", "Train_Worker", "7up", "x" * 80):
        name = trainjob.job_name(prefix)
        assert len(name) <= 63 and name[0].isalpha() and name.replace("-", "").isalnum() and name == name.lower()
    assert trainjob.job_name("a") != trainjob.job_name("a")


def test_state_follows_the_conditions():
    assert trainjob.state_of({}) == ("Pending", "")
    assert trainjob.state_of({"status": {"conditions": [{"type": "Created", "status": "True"}]}}) == ("Created", "")
    running = {"status": {"conditions": [{"type": "Created", "status": "True"}], "jobsStatus": [{"active": 2}]}}
    assert trainjob.state_of(running) == ("Running", "")
    failed = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                        {"type": "Failed", "status": "True", "message": "OOMKilled"}]}}
    assert trainjob.state_of(failed) == ("Failed", "OOMKilled")
    assert trainjob.state_of({"status": {"conditions": [{"type": "Complete", "status": "True"}]}})[0] == "Complete"
    assert trainjob.state_of({"status": {"conditions": [{"type": "Failed", "status": "False"}]}})[0] == "Pending"


# -- the launcher ---------------------------------------------------------------------

def launch(tmp_path, cluster, timeout_s=3600, **kwargs):
    (tmp_path / "inputs").mkdir(exist_ok=True)
    manifest = tmp_path / "inputs" / "manifest.parquet"
    manifest.write_bytes(b"parquet")
    out = tmp_path / "artifact" / "model.pt"
    clock = iter(range(0, 10**6, 10))
    printed = []
    log = SimpleNamespace(write=printed.append, flush=lambda: None)
    try:
        return trainjob.run_stage("components.train.stage:run", {"manifest": str(manifest), "out": str(out), "nproc": 8},
                                  inputs=("manifest",), num_nodes=2, nproc_per_node=8, workspace=str(tmp_path / "ws"),
                                  task_config=TASK_CONFIG, apis=(cluster, cluster), namespace="team-ml", out=log,
                                  settings={"image": "registry/dcml-train:abc", "timeout_s": timeout_s, "poll_s": 5},
                                  clock=lambda: next(clock), sleep=lambda s: None, **kwargs)
    finally:
        launch.printed = "".join(printed)


def test_a_failed_job_fails_the_task_with_its_logs_and_is_kept(tmp_path):
    created = {"conditions": [{"type": "Created", "status": "True"}]}
    running = {**created, "jobsStatus": [{"name": "node", "active": 2}]}
    failed = {"conditions": [{"type": "Created", "status": "True"},
                             {"type": "Failed", "status": "True", "message": "jobset node failed: OOMKilled"}]}
    cluster = FakeCluster(script=[created, running, running, failed], logs={
        "job-node-0-0": [("2026-01-01T00:00:01.000001Z", "epoch 1/4"), ("2026-01-01T00:00:02.000001Z", "boom")],
        "job-node-0-1": [("2026-01-01T00:00:01.500000Z", "rank 1 waiting")]})
    with pytest.raises(DcmlError, match="failed: jobset node failed: OOMKilled"):
        launch(tmp_path, cluster)
    printed = launch.printed
    assert "Created" in printed and "Running" in printed and "Failed" in printed
    # Every line once, although each poll reads the whole log again.
    assert printed.count("[node 0] epoch 1/4") == 1 and printed.count("[node 0] boom") == 1
    assert printed.count("[node 1] rank 1 waiting") == 1
    assert cluster.deleted == []  # kept with its pods for `kubectl describe` / logs
    (body,) = cluster.created
    call = body["spec"]["trainer"]["command"]
    # The job reads its inputs from the workspace, not from the launcher pod's local paths.
    assert str(tmp_path / "ws" / "dcml-trainjobs") in call[-1] and str(tmp_path / "inputs") not in call[-1]
    assert not (tmp_path / "artifact" / "model.pt").exists()


def test_a_job_that_never_finishes_is_deleted_and_fails_the_task(tmp_path):
    cluster = FakeCluster(script=[{"conditions": [{"type": "Created", "status": "True"}]}])
    with pytest.raises(DcmlError, match="did not finish within 60 s"):
        launch(tmp_path, cluster, timeout_s=60)
    assert cluster.deleted == [cluster.created[0]["metadata"]["name"]]
    assert 6 <= cluster.gets <= 9  # polled every 10 (fake) seconds until the timeout


def test_a_completed_job_without_a_model_is_an_error(tmp_path):
    cluster = FakeCluster(script=[{"conditions": [{"type": "Complete", "status": "True"}]}])
    with pytest.raises(DcmlError, match="wrote no .*ReadWriteMany"):
        launch(tmp_path, cluster)


@pytest.mark.slow
def test_the_training_component_runs_as_a_two_node_trainjob(tmp_path, monkeypatch, capsys):
    """train_shared compiled for --nodes 2, run against the fake cluster that starts the
    job's two nodes here: the model comes back through the workspace into the artifact."""
    from components.train.component import train_shared

    man = fmnist_data.make_manifest(tmp_path / "ingest" / "manifest.parquet", per_class=12,
                                    train_classes=(0, 1, 2, 3), test_per_class=6)
    (tmp_path / "extract").mkdir()  # fast mode off: an empty activations folder
    import numpy as np
    import pyarrow as pa

    from dcml.contracts import manifest as manifest_mod
    from dcml.contracts.io import write_parquet

    ids = manifest_mod.read(man).split("train")["image_id"].tolist()
    (tmp_path / "cluster").mkdir()
    write_parquet(tmp_path / "cluster" / "clusters.parquet",
                  pa.table({"image_id": ids, "cluster": pa.array(np.arange(len(ids)) % 2, pa.int64())}), {"k": 2})
    (tmp_path / "logs").mkdir()
    monkeypatch.setenv("FAKE_CLUSTER_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("KFP_POD_NAME", "dcml-run-train-shared-launcher")
    monkeypatch.setenv("KFP_POD_UID", "0000-1111")
    cluster = FakeCluster(run=True, pythonpath=str(REPO))
    monkeypatch.setattr(trainjob, "cluster_apis", lambda: (cluster, cluster))
    monkeypatch.setattr(trainjob, "current_namespace", lambda: "team-ml")
    model = SimpleNamespace(path=str(tmp_path / "train-shared" / "model"))
    artifact = lambda name: SimpleNamespace(path=str(tmp_path / name))  # noqa: E731
    train_shared(
        manifest=artifact("ingest"), clusters=artifact("cluster"), activations=artifact("extract"),
        backbone="small_cnn", weights="none", image_size=28, embedding_dim=8, train_blocks=-1, freeze_bn="true",
        recluster_every=1, whole_embedding_after=1.0, embedding_slices=True, embedding_masks=False,
        mask_orthogonality=1.0, cluster_grouping="kmeans", loss="margin", margin=0.0, miner="none", classes_per_batch=4, images_per_class=4,
        lr_backbone=1e-3, lr_embedding=1e-3, lr_proxies=0.0, weight_decay=1e-4, epochs=2, batches_per_epoch=0,
        head_init="random", warmup_epochs=0, schedule="constant", select_on="recall@1", patience=0, eval_every=0,
        seed=0, num_workers=0, gpus_per_task=1, model=model, num_nodes=2, workspace_path=str(tmp_path / "ws"),
        trainjob={"image": "registry/dcml-train:abc", "poll_s": 0.5, "timeout_s": 600}, task_config=TASK_CONFIG)
    text = capsys.readouterr().out

    (body,) = cluster.created
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["spec"]["trainer"]["numProcPerNode"] == 1
    assert body["metadata"]["ownerReferences"][0]["name"] == "dcml-run-train-shared-launcher"
    env = {e["name"]: e["value"] for e in body["spec"]["trainer"]["env"]}
    assert env["DCML_RESUME_ROOT"] == str(tmp_path / "ws" / "dcml-resume")
    assert "Complete" in text and "[node 0]" in text, text[-2000:]
    # The checkpoint of the two-node run is the task's output, sealed; the staging folder is gone.
    ckpt = torch.load(Path(model.path) / "model.pt", weights_only=True)
    import json

    record = json.loads(ckpt["record"])
    assert record["extra"]["processes"] == 2 and record["metrics"]["epochs"] == 2
    assert (Path(model.path) / ".dcml-seal.json").is_file()
    assert not list((tmp_path / "ws" / "dcml-trainjobs").iterdir())
    assert cluster.deleted == []
