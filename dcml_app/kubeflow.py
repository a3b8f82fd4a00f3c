"""`dcml compile` and `dcml submit`: the pipeline for a Kubeflow cluster.

Both take the run's parameters (``--config`` / ``--set``, checked like `dcml
run`'s) and bake them into the compiled YAML as its parameters' defaults, check
``data_root`` against the dataset PVC's mount, and say what the cluster needs
(images to push, the PVC, the MLflow secret's keys, the writable resume
folder). `submit` sends the run (dcml_app.kfp_api: one-line errors);
``submit --dry-run`` writes the YAML and the request instead and sends nothing.
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

import click

from dcml.contracts.errors import DcmlError
from dcml_app import kfp_api, presets
from dcml_app.runner import _build, resolve_arguments, structure_options

IMAGE_USER = "uid 1000 (user dcml of the stage images, docker/base/Dockerfile)"


def cluster_options(f):
    options = [
        click.option("--data-pvc", default="dcml-data", show_default=True, help="PVC with the datasets."),
        click.option("--data-mount", default="/data", show_default=True,
                     help="Mount path of the dataset PVC; data_root must be under it."),
        click.option("--mlflow-secret", default="dcml-mlflow", show_default=True,
                     help="Secret with keys tracking_uri, username, password."),
        click.option("--gpus", type=int, default=None,
                     help="GPUs of every GPU stage, and the default of gpus_per_task [default: training stages "
                          "request gpus_per_task GPUs (a pipeline parameter), the other GPU stages 1]."),
        click.option("--gpu-memory", default="16Gi", show_default=True),
        click.option("--gpu-cpu", default="4", show_default=True),
        click.option("--shm-size", default="8Gi", show_default=True, help="In-memory /dev/shm for data loaders."),
        click.option("--toleration", "tolerations", multiple=True, metavar="KEY[=VALUE]:EFFECT",
                     help="Toleration for GPU stages, e.g. nvidia.com/gpu:NoSchedule (repeatable)."),
        click.option("--node-selector", "node_selectors", multiple=True, metavar="LABEL=VALUE",
                     help="Node selector for GPU stages (repeatable)."),
        click.option("--resume-dir", default=".dcml/resume", show_default=True, metavar="DIR",
                     help="Training stages keep their resume checkpoints here (relative: under --data-mount; "
                          "every node of a TrainJob mounts the data PVC too), so a retried or re-submitted run "
                          "continues a killed training."),
        click.option("--nodes", "num_nodes", type=int, default=1, show_default=True,
                     help="Nodes per training stage: > 1 runs each as a Kubeflow Trainer TrainJob (runtime "
                          "--trainjob-runtime) of gpus_per_task processes per node."),
        click.option("--trainjob-runtime", default="torch-distributed", show_default=True,
                     help="--nodes > 1: the ClusterTrainingRuntime of the TrainJobs."),
        click.option("--trainjob-timeout", "trainjob_timeout_s", type=int, default=24 * 3600, show_default=True,
                     help="--nodes > 1: seconds a TrainJob may take (queueing included) before it is deleted and "
                          "the task fails."),
        click.option("--workspace-size", default="100Gi", show_default=True,
                     help="--nodes > 1: size of the run's shared KFP workspace (staged inputs, outputs)."),
        click.option("--workspace-storage-class", default="",
                     help="--nodes > 1: a ReadWriteMany storage class for the workspace [default: the cluster's]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def parameter_options(f):
    """The run's parameters, baked into the compiled YAML as its defaults."""
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a pipeline parameter (repeatable).")(f)
    return click.option("--config", default=None,
                        help=f"Preset ({', '.join(presets.PRESETS)}) or a JSON file of pipeline parameters.")(f)


def _cluster_settings(data_pvc, data_mount, mlflow_secret, gpus, gpu_memory, gpu_cpu, shm_size,
                      tolerations, node_selectors, resume_dir=".dcml/resume", num_nodes=1, trainjob_runtime="torch-distributed",
                      trainjob_timeout_s=24 * 3600, workspace_size="100Gi", workspace_storage_class=""):
    import pipeline

    parsed_tolerations = []
    for item in tolerations:
        if ":" not in item:
            raise DcmlError(f"--toleration {item}: expected KEY[=VALUE]:EFFECT, e.g. nvidia.com/gpu:NoSchedule")
        keyval, effect = item.rsplit(":", 1)
        key, _, value = keyval.partition("=")
        parsed_tolerations.append({"key": key, "operator": "Equal" if value else "Exists",
                                   "value": value or None, "effect": effect})
    selector = {}
    for item in node_selectors:
        if "=" not in item:
            raise DcmlError(f"--node-selector {item}: expected LABEL=VALUE")
        key, value = item.split("=", 1)
        selector[key] = value
    if gpus is not None and gpus < 1:
        raise DcmlError(f"--gpus {gpus}: must be >= 1")
    if num_nodes < 1:
        raise DcmlError(f"--nodes {num_nodes}: must be >= 1")
    if trainjob_timeout_s < 1:
        raise DcmlError(f"--trainjob-timeout {trainjob_timeout_s}: must be >= 1 second")
    if not data_mount.startswith("/"):
        raise DcmlError(f"--data-mount {data_mount}: must be an absolute path inside the pods, e.g. /data")
    return pipeline.ClusterSettings(data_pvc=data_pvc, data_mount=data_mount, mlflow_secret=mlflow_secret,
                                    gpus_per_task=gpus, gpu_memory_request=gpu_memory, gpu_cpu_request=gpu_cpu,
                                    shm_size=shm_size, tolerations=parsed_tolerations, node_selector=selector,
                                    resume_dir=resume_dir, num_nodes=num_nodes, trainjob_runtime=trainjob_runtime,
                                    trainjob_timeout_s=trainjob_timeout_s, workspace_size=workspace_size,
                                    workspace_storage_class=workspace_storage_class)


def cluster_arguments(config, overrides, settings) -> dict:
    """The run's parameters for a cluster: checked, ``data_root`` inside the dataset PVC's mount, and a
    ``gpus_per_task`` that agrees with ``--gpus``."""
    args = resolve_arguments(config, overrides)
    root = args.get("data_root")
    mount = PurePosixPath(settings.data_mount)
    if root and (not root.startswith("/") or ".." in PurePosixPath(root).parts
                 or not PurePosixPath(root).is_relative_to(mount)):
        name = PurePosixPath(root).name or "DATASET"
        raise DcmlError(f"data_root {root}: the stages read it from the dataset PVC mounted at {mount} "
                        f"(--data-mount); pass --set data_root={mount}/{name} (its path on the PVC)")
    if settings.gpus_per_task and args.get("gpus_per_task", settings.gpus_per_task) != settings.gpus_per_task:
        raise DcmlError(f"--set gpus_per_task={args['gpus_per_task']} and --gpus {settings.gpus_per_task}: every "
                        "GPU stage gets --gpus GPUs, so training runs that many processes; drop one of the two")
    return args


def write_yaml(pipeline_fn, out) -> None:
    """Compile ``pipeline_fn`` to the file ``out`` (atomically)."""
    import shutil

    from kfp import compiler

    from dcml.contracts.io import atomic_path

    with atomic_path(out) as tmp:
        compiler.Compiler().compile(pipeline_fn, package_path=str(tmp.with_suffix(".yaml")))
        shutil.move(str(tmp.with_suffix(".yaml")), tmp)


def images_of(yaml_path) -> list[str]:
    """The container images a compiled pipeline runs (its executors')."""
    import yaml

    spec = next(yaml.safe_load_all(Path(yaml_path).read_text()))
    return sorted({e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()
                   if "container" in e})


def cluster_needs(settings, images: list[str], args: dict) -> list[str]:
    """What must exist on the cluster before the compiled pipeline runs, one line each."""
    import pipeline

    registry, tag = images[0].rsplit("/", 1)[0], images[0].rsplit(":", 1)[1]
    keys = ", ".join(f"{key} (-> ${env})" for key, env in settings.mlflow_secret_keys.items())
    shared = " (ReadWriteMany)" if settings.multi_node else ""
    root = args.get("data_root") or "(not set: the dataset reader's default path)"
    lines = [
        f"  images : {len(images)} to push (make images push REGISTRY={registry} TAG={tag}): "
        + ", ".join(i.rsplit("/", 1)[1] for i in images),
        f"  data   : PVC {settings.data_pvc} in the run's namespace,{shared} mounted at {settings.data_mount} "
        f"by every stage, holding data_root {root}",
        f"  resume : {pipeline.resume_root(settings)} writable by {IMAGE_USER}: training stages keep their "
        "resume checkpoints there",
        f"  MLflow : secret {settings.mlflow_secret} with keys {keys}",
        f"  GPUs   : nodes offering {settings.gpu_resource}"
        + (f", tolerations {', '.join(t['key'] + ':' + t['effect'] for t in settings.tolerations)}"
           if settings.tolerations else "")
        + (f", labels {', '.join(f'{k}={v}' for k, v in settings.node_selector.items())}"
           if settings.node_selector else ""),
    ]
    if settings.multi_node:
        lines.append(f"  nodes  : Kubeflow Trainer with ClusterTrainingRuntime {settings.trainjob_runtime}, a "
                     "ReadWriteMany storage class, RBAC for trainjobs (docs/SCALE.md)")
    return lines




def _report(yaml_path, args: dict, settings, done: str) -> None:
    """``done`` (what was written or sent), the parameters baked in, and what the cluster needs."""
    images = images_of(yaml_path)
    click.echo(f"{done} ({len(args)} parameter(s) of --config/--set baked in as the YAML's defaults)")
    click.echo("the cluster needs:")
    for line in cluster_needs(settings, images, args):
        click.echo(line)


@click.command("compile")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the pipeline YAML.")
@parameter_options
@structure_options
@cluster_options
def compile_cli(out, config, overrides, mode, method, rounds, merge, freeze_backbone, image_registry, image_tag,
                **cluster_kwargs):
    """Compile the pipeline to Kubeflow YAML for a cluster (--config/--set: its parameters' defaults)."""
    from dcml.contracts.io import check_writable

    settings = _cluster_settings(**cluster_kwargs)
    args = cluster_arguments(config, overrides, settings)
    pipeline_fn, _ = _build(mode, method, rounds, merge, freeze_backbone, image_registry, image_tag,
                            cluster=settings, defaults=args)
    check_writable(out)
    write_yaml(pipeline_fn, out)
    _report(out, args, settings, f"wrote {out}")


@click.command("submit")
@click.option("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. https://kfp.example.com")
@click.option("--experiment", "kfp_experiment", default="dcml", show_default=True, help="KFP experiment name.")
@click.option("--namespace", default=None, help="Kubernetes namespace (multi-user Kubeflow).")
@click.option("--run-name", default=None, help="[default: 'dcml <dataset> <date> <time>']")
@click.option("--token", default=None, envvar=kfp_api.TOKEN_ENV, show_envvar=True,
              help="Bearer token for the KFP API (e.g. kubectl create token ...).")
@click.option("--dry-run", is_flag=True,
              help="Write the compiled YAML and the run request to --out-dir; send nothing.")
@click.option("--out-dir", default="dcml-submit", show_default=True, type=click.Path(file_okay=False),
              help="--dry-run: where pipeline.yaml and run-request.json go.")
@parameter_options
@structure_options
@cluster_options
def submit_cli(host, kfp_experiment, namespace, run_name, token, dry_run, out_dir, config, overrides, mode, method,
               rounds, merge, freeze_backbone, image_registry, image_tag, **cluster_kwargs):
    """Compile and submit a pipeline run to a Kubeflow cluster (kfp.Client)."""
    import tempfile

    settings = _cluster_settings(**cluster_kwargs)
    args = cluster_arguments(config, overrides, settings)
    pipeline_fn, tag = _build(mode, method, rounds, merge, freeze_backbone, image_registry, image_tag,
                              cluster=settings, defaults=args)
    if not dry_run:
        kfp_api.preflight(host, token, namespace)  # an unreachable host fails in seconds, before anything is sent
    run_name = run_name or f"dcml {args.get('dataset', 'run')} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    if dry_run:
        from dcml.contracts.io import check_writable, write_json

        folder = Path(out_dir)
        check_writable(folder / "pipeline.yaml")
        check_writable(folder / "run-request.json")
        write_yaml(pipeline_fn, folder / "pipeline.yaml")
        request = {"host": host, **kfp_api.run_request(run_name, kfp_experiment, namespace, args), "image_tag": tag}
        write_json(folder / "run-request.json", request)
        _report(folder / "pipeline.yaml", args, settings,
                f"dry run, nothing sent: wrote {folder / 'pipeline.yaml'} and {folder / 'run-request.json'}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / "pipeline.yaml")
        write_yaml(pipeline_fn, package)
        run_id = kfp_api.submit(host, package, args, run_name, kfp_experiment, namespace, token)
        _report(package, args, settings, f"submitted run {run_id}: {host.rstrip('/')}/#/runs/details/{run_id}")
