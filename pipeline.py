"""The dcml Kubeflow pipeline.

ingest -> extract -> cluster -> train (shared, or ParallelFor workers + merge)
-> finetune -> evaluate -> track (MLflow), optionally -> compress -> evaluate
-> track and -> index (gallery index for search and serving) -> track. Structure (training mode, rounds,
method, cluster settings, images) is fixed at compile time by
``build_pipeline``; every number (K, epochs, learning rates, ...) is a
pipeline parameter, so one compiled YAML serves many runs.

The same component definitions run in kfp.local.SubprocessRunner (the
embedded default, `dcml run`), in kfp.local.DockerRunner and on a cluster
(`dcml compile` / `dcml submit`).

Scale: every training stage runs ``gpus_per_task`` data-parallel processes
(torchrun; a pipeline parameter); on a cluster it requests that many GPUs.
``ClusterSettings.num_nodes > 1`` (`dcml compile --nodes N`) compiles the
training stages as launchers of Kubeflow Trainer TrainJobs over N nodes
(dcml.trainjob): the components get the TaskConfig pass-throughs (resources,
env, volumes, tolerations, node selector, affinity) and the pipeline a
ReadWriteMany workspace that the launcher and the job's nodes share. It is a
compile-time setting because it changes what the compiled YAML contains.
"""


from dataclasses import dataclass, field

from kfp import dsl
from kfp.dsl import Metrics

from components.cluster.component import cluster as cluster_fn
from dcml.contracts import params
from components.compress.component import compress as compress_fn
from components.dfml.component import train_dfml as train_dfml_fn
from components.evaluate.component import evaluate as evaluate_fn
from components.extract.component import extract as extract_fn
from components.extract.component import extract_with_model as extract_with_model_fn
from components.finetune.component import finetune as finetune_fn
from components.finetune.component import merge_finetune as merge_finetune_fn
from components.index.component import index as index_fn
from components.ingest.component import ingest as ingest_fn
from components.track.component import track as track_fn
from components.train.component import train_shared as train_shared_fn
from components.train.component import train_worker as train_worker_fn

MODES = ("shared", "parallel")
METHODS = ("dc", "dfml")
# Stage whose image a component runs in (docker/<stage>/Dockerfile).
IMAGE_OF = {
    "ingest": "ingest", "extract": "extract", "extract-with-model": "extract", "cluster": "cluster",
    "train-shared": "train", "train-worker": "train", "train-dfml": "train", "finetune": "finetune",
    "merge-finetune": "finetune", "evaluate": "evaluate", "compress": "compress", "track": "base",
    "index": "evaluate",  # the same software as evaluation (embeds images, runs faiss)
}
# Stages that train: gpus_per_task processes each, a TrainJob launcher with num_nodes > 1.
TRAINING_STAGES = frozenset({"train-shared", "train-worker", "train-dfml", "finetune", "merge-finetune"})
GPU_STAGES = frozenset({"extract", "extract-with-model", "train-shared", "train-worker", "train-dfml",
                        "finetune", "merge-finetune", "evaluate", "compress", "index"})
RESUME_ROOT_ENV = "DCML_RESUME_ROOT"


@dataclass
class ClusterSettings:
    """Kubernetes settings applied when compiling for a cluster."""

    data_pvc: str = "dcml-data"                   # PVC holding the datasets
    data_mount: str = "/data"                     # where every stage sees it
    mlflow_secret: str = "dcml-mlflow"            # secret with the tracking URI + credentials
    mlflow_secret_keys: dict = field(default_factory=lambda: {
        "tracking_uri": "MLFLOW_TRACKING_URI",
        "username": "MLFLOW_TRACKING_USERNAME",
        "password": "MLFLOW_TRACKING_PASSWORD",
    })
    # None: training stages request the pipeline parameter gpus_per_task GPUs, the other GPU
    # stages one. N: every GPU stage requests N, and gpus_per_task defaults to N.
    gpus_per_task: int | None = None
    gpu_resource: str = "nvidia.com/gpu"
    gpu_cpu_request: str = "4"
    gpu_memory_request: str = "16Gi"
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    shm_size: str = "8Gi"                         # in-memory /dev/shm for DataLoader workers
    resume_dir: str = ".dcml/resume"              # training resume files: relative = under data_mount
    tolerations: list = field(default_factory=list)   # [{"key":..., "operator":..., "value":..., "effect":...}]
    node_selector: dict = field(default_factory=dict)  # {"label": "value"} for GPU stages
    # -- several nodes per training stage (Kubeflow Trainer TrainJobs) --
    num_nodes: int = 1
    trainjob_runtime: str = "torch-distributed"   # ClusterTrainingRuntime
    trainjob_timeout_s: int = 24 * 3600          # a TrainJob still unfinished then is deleted and the task fails
    workspace_size: str = "100Gi"                 # the run's KFP workspace: staged inputs, outputs, resume files
    workspace_storage_class: str = ""             # a ReadWriteMany class ('' = the cluster's default)

    @property
    def multi_node(self) -> bool:
        return self.num_nodes > 1


def resume_root(settings: ClusterSettings) -> str:
    """DCML_RESUME_ROOT of the training stages: ``resume_dir``, under the data mount when relative."""
    if settings.resume_dir.startswith("/"):
        return settings.resume_dir
    return f"{settings.data_mount.rstrip('/')}/{settings.resume_dir}"


def image_for(registry: str, tag: str, task: str) -> str:
    if not tag or tag == "latest":
        raise ValueError("images must be pinned to a unique tag (e.g. the git commit), never 'latest'")
    return f"{registry}/dcml-{IMAGE_OF[task]}:{tag}"


def _components(registry: str, tag: str, multi_node: bool = False) -> dict:
    funcs = {
        "ingest": ingest_fn, "extract": extract_fn, "extract-with-model": extract_with_model_fn,
        "cluster": cluster_fn, "train-shared": train_shared_fn, "train-worker": train_worker_fn,
        "train-dfml": train_dfml_fn, "finetune": finetune_fn, "merge-finetune": merge_finetune_fn,
        "evaluate": evaluate_fn, "compress": compress_fn, "track": track_fn, "index": index_fn,
    }
    passthroughs = None
    if multi_node:  # what the TrainJob launcher hands on to its job (dsl.TaskConfig)
        passthroughs = [dsl.TaskConfigField.RESOURCES, dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
                        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR, dsl.TaskConfigField.KUBERNETES_AFFINITY,
                        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
                        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True)]
    return {
        name: dsl.component(func, base_image=image_for(registry, tag, name), install_kfp_package=False,
                            **({"task_config_passthroughs": passthroughs} if passthroughs and name in TRAINING_STAGES
                               else {}))
        for name, func in funcs.items()
    }


def _apply_cluster_settings(task, name: str, settings: ClusterSettings | None, gpus_per_task=None):
    """Resources, volumes, secrets and scheduling for one task (cluster only).

    ``gpus_per_task``: the pipeline parameter's channel; training stages request
    that many GPUs unless ``settings.gpus_per_task`` fixes the count. With
    several nodes the training tasks are TrainJob launchers: their resources,
    tolerations and node selector describe each node of the job (handed over
    through dsl.TaskConfig), not the launcher's pod.
    """
    if settings is None:
        return task
    from kfp import kubernetes

    kubernetes.mount_pvc(task, pvc_name=settings.data_pvc, mount_path=settings.data_mount)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=settings.shm_size)
    if name == "track":
        kubernetes.use_secret_as_env(task, secret_name=settings.mlflow_secret,
                                     secret_key_to_env=settings.mlflow_secret_keys)
    if name in TRAINING_STAGES:
        # Resume files on the data volume: a retried pod (or a re-submitted TrainJob) finds the
        # checkpoint of its last finished epoch (named by the training's fingerprint, dcml.stagekit).
        task.set_env_variable(name=RESUME_ROOT_ENV, value=resume_root(settings))
    if name in GPU_STAGES:
        gpus = settings.gpus_per_task or (gpus_per_task if name in TRAINING_STAGES and gpus_per_task is not None else 1)
        task.set_accelerator_type(settings.gpu_resource).set_accelerator_limit(gpus)
        task.set_cpu_request(settings.gpu_cpu_request).set_memory_request(settings.gpu_memory_request)
        for tol in settings.tolerations:
            kubernetes.add_toleration(task, **tol)
        for key, value in settings.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
    else:
        task.set_cpu_request(settings.cpu_request).set_memory_request(settings.memory_request)
    return task


def build_pipeline(mode: str = "shared", method: str = "dc", rounds: int = 1, merge: str = "average",
                   freeze_backbone: bool = False, max_parallel_workers: int = 0,
                   image_registry: str = "dcml", image_tag: str = "dev",
                   cluster: ClusterSettings | None = None, defaults: dict | None = None):
    """Return the pipeline function for one structure (see module docstring).

    ``defaults``: checked parameter values (dcml.contracts.params.validate) that replace the
    parameters' own defaults in the compiled YAML (`dcml compile --config/--set`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    multi_node = cluster is not None and cluster.multi_node
    if cluster is not None and cluster.num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {cluster.num_nodes}")
    if cluster is not None and cluster.gpus_per_task is not None and cluster.gpus_per_task < 1:
        raise ValueError(f"gpus per task must be >= 1, got {cluster.gpus_per_task}")
    comp = _components(image_registry, image_tag, multi_node)
    channels: dict = {}

    def task(name, **kwargs):
        if name in TRAINING_STAGES:
            kwargs["gpus_per_task"] = channels["gpus_per_task"]
            if multi_node:
                kwargs.update(num_nodes=cluster.num_nodes, workspace_path=dsl.WORKSPACE_PATH_PLACEHOLDER,
                              trainjob={"runtime": cluster.trainjob_runtime,
                                        "image": image_for(image_registry, image_tag, name),
                                        "timeout_s": cluster.trainjob_timeout_s, "shm_size": cluster.shm_size})
        t = comp[name](**kwargs)
        t.set_display_name(name)
        return _apply_cluster_settings(t, name, cluster, channels.get("gpus_per_task"))

    name = f"dcml-{method}" if method == "dfml" else f"dcml-{method}-{mode}"
    names = [p.name for p in params.pipeline_params()]

    def pick(p: dict, *keys: str) -> dict:
        return {k: p[k] for k in keys}

    def dcml_pipeline(*values) -> Metrics:
        # KFP calls this with one channel per parameter, in signature order.
        p = dict(zip(names, values))
        channels["gpus_per_task"] = p["gpus_per_task"]
        model_args = pick(p, "backbone", "weights", "image_size", "embedding_dim", "train_blocks", "freeze_bn")
        train_args = pick(p, "loss", "margin", "miner", "classes_per_batch", "images_per_class", "lr_backbone",
                          "lr_embedding", "lr_proxies", "weight_decay", "batches_per_epoch", "head_init",
                          "warmup_epochs", "schedule", "select_on", "patience", "eval_every", "seed", "num_workers")
        ingest = task("ingest", **pick(p, "dataset", "data_root", "split_mode", "max_per_class", "check_images",
                                       "val_fraction", "data_version"))
        manifest = ingest.outputs["manifest"]
        cluster_args = pick(p, "num_clusters", "niter", "nredo", "seed", "cluster_grouping")

        if method == "dfml":
            model = task("train-dfml", manifest=manifest, **{k: v for k, v in model_args.items() if k != "train_blocks"},
                         **pick(p, "dfml_groups", "lr_router", "epochs", "baseline_candidate", "fusion"),
                         **train_args).outputs["model"]
        else:
            extracted = task("extract", manifest=manifest, **pick(p, "backbone", "weights", "image_size", "train_blocks",
                                                                   "fast_views", "batch_size", "num_workers", "seed"))
            activations = extracted.outputs["activations"]
            if mode == "shared":
                clusters = task("cluster", features=extracted.outputs["features"], **cluster_args).outputs["clusters"]
                trained = task("train-shared", manifest=manifest, clusters=clusters, activations=activations,
                               **model_args, **train_args, epochs=p["epochs"],
                               **pick(p, "recluster_every", "whole_embedding_after", "embedding_slices",
                                      "embedding_masks", "mask_orthogonality", "cluster_grouping")).outputs["model"]
                model = task("finetune", manifest=manifest, checkpoint=trained, activations=activations,
                             finetune_epochs=p["finetune_epochs"], baseline_candidate=p["baseline_candidate"],
                             fusion=p["fusion"],
                             **train_args).outputs["model"]
            else:
                model, features = None, extracted.outputs["features"]
                for round_ in range(rounds):
                    if model is not None:
                        # Later rounds cluster the merged model's own backbone features; the
                        # frozen lower part never changes, so the fast mode's cache still holds.
                        features = task("extract-with-model", manifest=manifest, model=model,
                                        **pick(p, "batch_size", "num_workers")).outputs["features"]
                    clustered = task("cluster", features=features, **cluster_args)
                    with dsl.ParallelFor(items=clustered.outputs["Output"],
                                         parallelism=max_parallel_workers) as cluster_id:
                        extra = {"init": model} if model is not None else {}
                        worker = task("train-worker", manifest=manifest, clusters=clustered.outputs["clusters"],
                                      activations=activations, cluster_id=cluster_id,
                                      freeze_backbone=freeze_backbone, **model_args, **train_args,
                                      epochs=p["epochs"], **extra)
                    model = task("merge-finetune", manifest=manifest,
                                 checkpoints=dsl.Collected(worker.outputs["model"]), activations=activations,
                                 clusters=clustered.outputs["clusters"], merge=merge,
                                 **pick(p, "finetune_epochs", "finetune_cluster_epochs", "recluster_every",
                                        "cluster_grouping"),
                                 # the pretrained features compete with the last round's model only
                                 baseline_candidate=p["baseline_candidate"] if round_ == rounds - 1 else False,
                                 fusion=p["fusion"],
                                 **train_args).outputs["model"]

        evaluated = task("evaluate", manifest=manifest, model=model, ks=p["ks"], batch_size=p["eval_batch_size"],
                         num_workers=p["num_workers"])
        tracked = task("track", metrics=evaluated.outputs["metrics"], model=model,
                       embeddings=evaluated.outputs["embeddings"], manifest=manifest,
                       **pick(p, "experiment", "run_name"), pipeline_params=dict(p))
        tracked.set_caching_options(False)  # a new MLflow run every time, cached stages included

        with dsl.If(p["compress_bits"] > 0, name="compress-enabled"):
            compressed = task("compress", manifest=manifest, model=model, bits=p["compress_bits"],
                              method=p["compress_method"], loss=p["loss"], seed=p["seed"],
                              finetune_steps=p["compress_finetune_steps"]).outputs["compressed"]
            evaluated_q = task("evaluate", manifest=manifest, model=compressed, ks=p["ks"],
                               batch_size=p["eval_batch_size"], num_workers=p["num_workers"])
            task("track", metrics=evaluated_q.outputs["metrics"], model=compressed,
                 embeddings=evaluated_q.outputs["embeddings"], manifest=manifest,
                 **pick(p, "experiment", "run_name"), pipeline_params=dict(p)).set_caching_options(False)

        with dsl.If(p["index_gallery"] == True, name="index-enabled"):  # noqa: E712 (a pipeline channel)
            indexed = task("index", manifest=manifest, model=model, index_type=p["index_type"],
                           target_recall=p["index_target_recall"], false_match_rate=p["index_false_match_rate"],
                           batch_size=p["eval_batch_size"],
                           num_workers=p["num_workers"], seed=p["seed"])
            task("track", metrics=indexed.outputs["metrics"], model=model, embeddings=evaluated.outputs["embeddings"],
                 manifest=manifest, **pick(p, "experiment", "run_name"),
                 pipeline_params=dict(p)).set_caching_options(False)
        return evaluated.outputs["metrics"]

    # The parameters, their types and defaults: dcml.contracts.params, nowhere else -- but values
    # baked in at compile time (--config/--set) are the YAML's defaults, and a cluster compiled
    # for a fixed GPU count (--gpus N) trains with N processes by default.
    signature = params.pipeline_signature()
    baked = dict(defaults or {})
    unknown = sorted(set(baked) - set(names))
    if unknown:
        raise ValueError(f"not pipeline parameters: {', '.join(unknown)}")
    if cluster is not None and cluster.gpus_per_task:
        baked.setdefault("gpus_per_task", cluster.gpus_per_task)
    signature = signature.replace(parameters=[p.replace(default=baked[p.name]) if p.name in baked else p
                                              for p in signature.parameters.values()])
    dcml_pipeline.__signature__ = signature.replace(return_annotation=Metrics)
    dcml_pipeline.__name__ = name.replace("-", "_")
    config = None
    if multi_node:
        patch = {"accessModes": ["ReadWriteMany"]}
        if cluster.workspace_storage_class:
            patch["storageClassName"] = cluster.workspace_storage_class
        config = dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(
            size=cluster.workspace_size, kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=patch)))
    return dsl.pipeline(name=name, description="Divide-and-conquer deep metric learning (dcml)",
                        pipeline_config=config)(dcml_pipeline)


def compile_pipeline(out: str, **kwargs) -> None:
    """Compile to Kubeflow YAML (IR)."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(**kwargs), package_path=out)
