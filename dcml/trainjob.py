"""Multi-node training through Kubeflow Trainer: one TrainJob per training task.

A pipeline compiled with ``dcml compile --nodes N`` (N > 1) runs each training
task (shared trainer, parallel worker, merge / fine-tune, DFML) as a small
launcher pod that calls :func:`run_stage`:

1. it copies the task's input files (manifest, clusters, fast-mode cache,
   checkpoints) into the run's KFP workspace, a volume every node mounts;
2. it creates a ``trainer.kubeflow.org/v1alpha1`` TrainJob of the
   ``torch-distributed`` runtime: ``numNodes`` = N, ``numProcPerNode`` = the
   pipeline's ``gpus_per_task``, ``resourcesPerNode`` = the task's resources, and
   the task's env, volumes (data PVC, workspace), tolerations, node selector
   and affinity -- all handed over by KFP through ``dsl.TaskConfig``. Each
   node runs ``torchrun -m dcml.launch --call <the stage call>``; the runtime
   sets torchrun's node count, node rank and rendezvous address (``PET_*``);
3. it polls the job, streams its pods' logs into the task's log, deletes the
   job and fails when it fails or runs past the timeout;
4. it copies the checkpoint rank 0 wrote into the workspace to the task's
   output artifact and returns its record.

The job is owned by the launcher pod (``ownerReferences``), so Kubernetes
deletes it when the pod goes (a run terminated, a pod retried). Its resume
checkpoint lives in ``DCML_RESUME_ROOT``: the task's (a folder on the data
PVC, ``dcml compile --resume-dir``, handed over with the task's env), else
the workspace's ``dcml-resume``; a job that the runtime restarts, or a retried
task, continues from the last epoch.

Needs on the cluster: Kubeflow Trainer v2 (>= 2.1, ``podTemplateOverrides``)
with its ``torch-distributed`` ClusterTrainingRuntime, a KFP backend with
TaskConfig pass-throughs and workspaces (KFP >= 2.15), a ReadWriteMany storage
class for the workspace and the data PVC, and RBAC for the pipeline's service
account to create / get / delete ``trainjobs`` and get / list ``pods`` and
``pods/log`` (docs/SCALE.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

from dcml import launch
from dcml.contracts.errors import DcmlError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE = "node"  # the runtime's replicated job and its training container
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of the job (the JobSet is named after it)
INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
RESUME_ROOT_ENV = "DCML_RESUME_ROOT"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
SUCCEEDED, FAILED = ("Complete", "Succeeded"), ("Failed",)


class JobFailed(DcmlError):
    """The TrainJob ended as Failed (it is kept, with its pods, for inspection)."""


@dataclasses.dataclass
class Settings:
    """What the compiled pipeline fixes about its TrainJobs (the component's ``trainjob`` dict)."""

    runtime: str = "torch-distributed"  # ClusterTrainingRuntime
    image: str = ""  # the training image (the launcher's own)
    timeout_s: float = 24 * 3600  # from creation to completion, queueing included
    poll_s: float = 10.0
    resume_dir: str = ""  # DCML_RESUME_ROOT of the job when the task's env has none ('' = <workspace>/dcml-resume)
    shm_size: str = "8Gi"  # in-memory /dev/shm per node (NCCL, data loader workers)

    @classmethod
    def from_dict(cls, values: dict | None) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise DcmlError(f"trainjob settings: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**(values or {}))


def job_name(prefix: str) -> str:
    """A fresh RFC 1035 name (<= 63 characters) for a TrainJob."""
    clean = "".join(c if c.isalnum() else "-" for c in prefix.lower()).strip("-") or "dcml"
    if not clean[0].isalpha():
        clean = "dcml-" + clean
    return f"{clean[:50].rstrip('-')}-{uuid.uuid4().hex[:8]}"


def _by_name(items: Sequence[dict] | None, extra: Sequence[dict] = ()) -> list[dict]:
    """``items`` then those of ``extra`` whose name is not taken (lists keyed by name)."""
    out = [dict(i) for i in items or []]
    names = {i.get("name") for i in out}
    out += [dict(e) for e in extra if e.get("name") not in names]
    return out


def manifest(name: str, namespace: str, *, image: str, command: Sequence[str], num_nodes: int, nproc_per_node: int,
             task_config=None, runtime: str = "torch-distributed", env: Sequence[dict] = (), shm_size: str = "8Gi",
             owner: dict | None = None, labels: dict | None = None) -> dict:
    """The TrainJob object: ``command`` on ``num_nodes`` nodes of ``nproc_per_node`` processes each.

    ``task_config`` (a ``kfp.dsl.TaskConfig``, or anything with its fields):
    its resources become ``resourcesPerNode``, its env the trainer's env, its
    volumes / mounts, tolerations, node selector and affinity the pods'.
    """
    get = (lambda field: getattr(task_config, field, None)) if task_config is not None else (lambda field: None)
    trainer = {"image": image, "command": list(command), "numNodes": int(num_nodes),
               "numProcPerNode": int(nproc_per_node)}
    if get("resources"):
        trainer["resourcesPerNode"] = get("resources")
    environment = _by_name(get("env"), env)
    if environment:
        trainer["env"] = environment
    volumes = _by_name(get("volumes"), [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}])
    mounts = list(get("volume_mounts") or [])
    if not any(m.get("mountPath") == "/dev/shm" for m in mounts):
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    pod = {"volumes": volumes, "containers": [{"name": NODE, "volumeMounts": mounts}]}
    for key, field in (("nodeSelector", "node_selector"), ("tolerations", "tolerations"), ("affinity", "affinity")):
        if get(field):
            pod[key] = get(field)
    metadata = {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "dcml", **(labels or {})}}
    if owner:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"],
                                        "controller": False, "blockOwnerDeletion": False}]
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata,
        "spec": {"runtimeRef": {"name": runtime}, "trainer": trainer,
                 "podTemplateOverrides": [{"targetJobs": [{"name": NODE}], "spec": pod}]},
    }


def state_of(job: dict) -> tuple[str, str]:
    """(state, message): the job's last true condition (Complete, Failed, Suspended, ...),
    "Running" while a child job is active, else "Pending"."""
    status = job.get("status") or {}
    true = [c for c in status.get("conditions") or [] if str(c.get("status")) == "True"]
    for c in true:
        if c.get("type") in FAILED + SUCCEEDED:
            return c["type"], c.get("message") or c.get("reason") or ""
    if any((j.get("active") or 0) > 0 or (j.get("ready") or 0) > 0 for j in status.get("jobsStatus") or []):
        return "Running", ""
    if true:
        return true[-1].get("type", "Pending"), true[-1].get("message") or ""
    return "Pending", ""


class LogStream:
    """The job's pods' logs, line by line and once each, into ``out`` (polled)."""

    def __init__(self, core, name: str, namespace: str, out=None, poll_s: float = 10.0):
        self.core, self.name, self.namespace = core, name, namespace
        self.out, self.poll_s = out or sys.stdout, poll_s
        self.last: dict[str, str] = {}  # pod -> timestamp of the last line shown

    def pump(self) -> None:
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_LABEL}={self.name}").items
        except Exception as exc:  # logs are a courtesy: never fail the task over them
            self.out.write(f"[trainjob] cannot list the job's pods: {' '.join(str(exc).split())[:200]}\n")
            return
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            self._pump_pod(pod)
        self.out.flush()

    def _pump_pod(self, pod) -> None:
        pod_name = pod.metadata.name
        labels = pod.metadata.labels or {}
        tag = f"[node {labels[INDEX_LABEL]}]" if INDEX_LABEL in labels else f"[{pod_name}]"
        since = self.last.get(pod_name)
        kwargs = {"container": NODE, "timestamps": True}
        if since is not None:
            kwargs["since_seconds"] = int(3 * self.poll_s) + 60  # overlap; lines already shown are skipped
        try:
            text = self.core.read_namespaced_pod_log(pod_name, self.namespace, **kwargs)
        except Exception:  # not started yet, or gone
            return
        for line in (text or "").splitlines():
            stamp, _, message = line.partition(" ")
            if since is not None and stamp <= since:
                continue
            self.out.write(f"{tag} {message}\n")
            self.last[pod_name] = stamp


def wait(api, core, name: str, namespace: str, *, timeout_s: float, poll_s: float = 10.0, out=None,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Poll the TrainJob until it completes (returns it); a failed job is a :class:`JobFailed`,
    one still unfinished after ``timeout_s`` a DcmlError (the caller deletes it)."""
    out = out or sys.stdout
    logs = LogStream(core, name, namespace, out, poll_s)
    start, shown = clock(), None
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        logs.pump()
        state, message = state_of(job)
        if state != shown:
            out.write(f"[trainjob] {name}: {state}{f' ({message})' if message else ''} after {clock() - start:.0f} s\n")
            out.flush()
            shown = state
        if state in SUCCEEDED:
            return job
        if state in FAILED:
            raise JobFailed(f"TrainJob {namespace}/{name} failed: {message or 'no reason given'}; "
                            "its pods' logs are above (kubectl describe trainjob for events)")
        if clock() - start > timeout_s:
            raise DcmlError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s ({state}); "
                            "deleting it; raise the timeout (dcml compile --trainjob-timeout) or check that the "
                            "cluster has the nodes and GPUs it asks for")
        sleep(poll_s)


def delete(api, name: str, namespace: str) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            body={"propagationPolicy": "Background"})
    except Exception as exc:  # already gone, or no permission: say so, do not hide the first error
        sys.stderr.write(f"[trainjob] could not delete {namespace}/{name}: {' '.join(str(exc).split())[:200]}\n")


# -- a stage as a TrainJob ------------------------------------------------------------

def _copy(src: Path, dest: Path) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)
    return str(dest)


def stage_in(kwargs: dict, inputs: Sequence[str], folder: Path) -> dict:
    """``kwargs`` with the input files / folders named by ``inputs`` copied into ``folder``
    (a path, or a list of paths, each); missing or empty ones are left as they are."""
    staged = dict(kwargs)
    for key in inputs:
        value = kwargs.get(key)
        if not value:
            continue
        if isinstance(value, (list, tuple)):
            staged[key] = [_copy(Path(v), folder / key / str(i) / Path(v).name) for i, v in enumerate(value)]
        elif Path(value).exists():
            staged[key] = _copy(Path(value), folder / key / Path(value).name)
    return staged


def current_namespace() -> str:
    try:
        return Path(NAMESPACE_FILE).read_text().strip()
    except OSError:
        raise DcmlError(f"{NAMESPACE_FILE}: not running in a Kubernetes pod; multi-node training (num_nodes > 1) "
                        "runs on a cluster only") from None


def cluster_apis():
    """(CustomObjectsApi, CoreV1Api) with the pod's service account."""
    from kubernetes import client, config

    config.load_incluster_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def run_training(target: str, kwargs: dict, *, inputs: Sequence[str], num_nodes: int, nproc_per_node: int,
                 workspace: str, task_config=None, settings: dict | None = None, prefix: str = "dcml-train"):
    """A training component's body: the stage call ``target(**kwargs)`` in this pod (``kwargs``
    carries its own ``nproc``), or with ``num_nodes > 1`` as a TrainJob (:func:`run_stage`)."""
    if num_nodes > 1:
        return run_stage(target, kwargs, inputs=inputs, num_nodes=num_nodes, nproc_per_node=nproc_per_node,
                         workspace=workspace, task_config=task_config, settings=settings, prefix=prefix)
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def run_stage(target: str, kwargs: dict, *, inputs: Sequence[str], num_nodes: int, nproc_per_node: int,
              workspace: str, task_config=None, settings: dict | None = None, out_key: str = "out",
              prefix: str = "dcml-train", apis=None, namespace: str | None = None, out=None,
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Run the stage call ``target(**kwargs)`` as a TrainJob of ``num_nodes`` x ``nproc_per_node``
    processes; ``kwargs[out_key]`` (a checkpoint) is where its output ends up. Returns the record.

    ``apis``: (CustomObjectsApi, CoreV1Api)-like objects (default: the cluster's,
    with the pod's service account).
    """
    s = Settings.from_dict(settings)
    if not workspace:
        raise DcmlError("multi-node training needs the KFP workspace (dsl.WORKSPACE_PATH_PLACEHOLDER); "
                        "compile with dcml compile --nodes N")
    if not s.image:
        raise DcmlError("trainjob settings: no image for the training pods")
    out = out or sys.stdout
    api, core = apis if apis is not None else cluster_apis()
    namespace = namespace or current_namespace()
    name = job_name(prefix)
    folder = Path(workspace) / "dcml-trainjobs" / name
    final = Path(kwargs[out_key])
    call = stage_in(kwargs, inputs, folder / "inputs")
    call[out_key] = str(folder / "out" / final.name)
    env = [{"name": RESUME_ROOT_ENV, "value": s.resume_dir or str(Path(workspace) / "dcml-resume")},
           {"name": "PYTHONUNBUFFERED", "value": "1"},
           # Rank 0 reports progress (and its summary) as event lines, which reach the task's log.
           {"name": "DCML_EVENTS", "value": "1"}, {"name": "DCML_EVENTS_EVERY", "value": "30"}]
    owner = None
    if os.environ.get("KFP_POD_NAME") and os.environ.get("KFP_POD_UID"):
        owner = {"name": os.environ["KFP_POD_NAME"], "uid": os.environ["KFP_POD_UID"]}
    body = manifest(name, namespace, image=s.image, command=["torchrun", "-m", *launch.module_command(target, call)],
                    num_nodes=num_nodes, nproc_per_node=nproc_per_node, task_config=task_config, runtime=s.runtime,
                    env=env, shm_size=s.shm_size, owner=owner, labels={"dcml/stage": prefix})
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    out.write(f"[trainjob] created {namespace}/{name}: {num_nodes} nodes x {nproc_per_node} processes, "
              f"runtime {s.runtime}, image {s.image}\n")
    out.flush()
    keep = False  # the job is deleted unless it completed or failed by itself
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if previous is not None:  # a terminated run: delete the job rather than leave its GPUs busy
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        try:
            wait(api, core, name, namespace, timeout_s=s.timeout_s, poll_s=s.poll_s, out=out, clock=clock, sleep=sleep)
        except JobFailed:
            keep = True
            raise
        keep = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not keep:  # timed out, or the launcher was stopped: free the nodes
            delete(api, name, namespace)
    produced = Path(call[out_key])
    if not produced.is_file():
        raise DcmlError(f"TrainJob {namespace}/{name} completed but wrote no {produced}; "
                        "is the workspace mounted on every node (ReadWriteMany)?")
    from dcml.contracts import checkpoint
    from dcml.contracts.io import atomic_path

    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        shutil.copy2(produced, tmp)
    record = json.loads(checkpoint.load(final).get("record") or "{}")
    shutil.rmtree(folder, ignore_errors=True)  # the staged inputs and the output: the workspace is the run's
    return record


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
