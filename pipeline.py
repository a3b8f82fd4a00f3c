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
TRAINING_STAGES = frozenset({"train-shared", "train-worker", "train-dfml", "finetune", "merge-finetune"})
GPU_STAGES = frozenset({"extract", "extract-with-model", "train-shared", "train-worker", "train-dfml",
                        "finetune", "merge-finetune", "evaluate", "compress", "index"})


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
    gpus_per_task: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    gpu_cpu_request: str = "4"
    gpu_memory_request: str = "16Gi"
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    shm_size: str = "8Gi"                         # in-memory /dev/shm for DataLoader workers
    resume_dir: str = ".dcml/resume"              # training resume files, under data_mount
    tolerations: list = field(default_factory=list)   # [{"key":..., "operator":..., "value":..., "effect":...}]
    node_selector: dict = field(default_factory=dict)  # {"label": "value"} for GPU stages


def image_for(registry: str, tag: str, task: str) -> str:
    if not tag or tag == "latest":
        raise ValueError("images must be pinned to a unique tag (e.g. the git commit), never 'latest'")
    return f"{registry}/dcml-{IMAGE_OF[task]}:{tag}"


def _components(registry: str, tag: str) -> dict:
    funcs = {
        "ingest": ingest_fn, "extract": extract_fn, "extract-with-model": extract_with_model_fn,
        "cluster": cluster_fn, "train-shared": train_shared_fn, "train-worker": train_worker_fn,
        "train-dfml": train_dfml_fn, "finetune": finetune_fn, "merge-finetune": merge_finetune_fn,
        "evaluate": evaluate_fn, "compress": compress_fn, "track": track_fn, "index": index_fn,
    }
    return {
        name: dsl.component(func, base_image=image_for(registry, tag, name), install_kfp_package=False)
        for name, func in funcs.items()
    }


def _apply_cluster_settings(task, name: str, settings: ClusterSettings | None):
    """Resources, volumes, secrets and scheduling for one task (cluster only)."""
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
        # Resume files on the data volume: a retried pod finds the checkpoint of its
        # last finished epoch (named by the training's fingerprint, dcml.stagekit).
        task.set_env_variable(name="DCML_RESUME_ROOT", value=f"{settings.data_mount}/{settings.resume_dir}")
    if name in GPU_STAGES:
        task.set_accelerator_type(settings.gpu_resource).set_accelerator_limit(settings.gpus_per_task)
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
                   cluster: ClusterSettings | None = None):
    """Return the pipeline function for one structure (see module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    comp = _components(image_registry, image_tag)

    def task(name, **kwargs):
        t = comp[name](**kwargs)
        t.set_display_name(name)
        return _apply_cluster_settings(t, name, cluster)

    name = f"dcml-{method}" if method == "dfml" else f"dcml-{method}-{mode}"
    names = [p.name for p in params.pipeline_params()]

    def pick(p: dict, *keys: str) -> dict:
        return {k: p[k] for k in keys}

    def dcml_pipeline(*values) -> Metrics:
        # KFP calls this with one channel per parameter, in signature order.
        p = dict(zip(names, values))
        model_args = pick(p, "backbone", "weights", "image_size", "embedding_dim", "train_blocks", "freeze_bn")
        train_args = pick(p, "loss", "margin", "miner", "classes_per_batch", "images_per_class", "lr_backbone",
                          "lr_embedding", "lr_proxies", "weight_decay", "batches_per_epoch", "head_init",
                          "warmup_epochs", "schedule", "select_on", "patience", "eval_every", "seed", "num_workers")
        ingest = task("ingest", **pick(p, "dataset", "data_root", "split_mode", "max_per_class", "check_images",
                                       "val_fraction", "data_version"))
        manifest = ingest.outputs["manifest"]
        cluster_args = pick(p, "num_clusters", "niter", "nredo", "seed")

        if method == "dfml":
            model = task("train-dfml", manifest=manifest, **{k: v for k, v in model_args.items() if k != "train_blocks"},
                         **pick(p, "dfml_groups", "lr_router", "epochs"), **train_args).outputs["model"]
        else:
            extracted = task("extract", manifest=manifest, **pick(p, "backbone", "weights", "image_size", "train_blocks",
                                                                   "fast_views", "batch_size", "num_workers", "seed"))
            activations = extracted.outputs["activations"]
            if mode == "shared":
                clusters = task("cluster", features=extracted.outputs["features"], **cluster_args).outputs["clusters"]
                trained = task("train-shared", manifest=manifest, clusters=clusters, activations=activations,
                               **model_args, **train_args, epochs=p["epochs"],
                               recluster_every=p["recluster_every"]).outputs["model"]
                model = task("finetune", manifest=manifest, checkpoint=trained, activations=activations,
                             finetune_epochs=p["finetune_epochs"], **train_args).outputs["model"]
            else:
                model, features = None, extracted.outputs["features"]
                for _ in range(rounds):
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
                                 merge=merge, finetune_epochs=p["finetune_epochs"], **train_args).outputs["model"]

        evaluated = task("evaluate", manifest=manifest, model=model, ks=p["ks"], batch_size=p["eval_batch_size"],
                         num_workers=p["num_workers"])
        tracked = task("track", metrics=evaluated.outputs["metrics"], model=model,
                       embeddings=evaluated.outputs["embeddings"], manifest=manifest,
                       **pick(p, "experiment", "run_name"))
        tracked.set_caching_options(False)  # a new MLflow run every time, cached stages included

        with dsl.If(p["compress_bits"] > 0, name="compress-enabled"):
            compressed = task("compress", manifest=manifest, model=model, bits=p["compress_bits"],
                              method=p["compress_method"], loss=p["loss"], seed=p["seed"],
                              finetune_steps=p["compress_finetune_steps"]).outputs["compressed"]
            evaluated_q = task("evaluate", manifest=manifest, model=compressed, ks=p["ks"],
                               batch_size=p["eval_batch_size"], num_workers=p["num_workers"])
            task("track", metrics=evaluated_q.outputs["metrics"], model=compressed,
                 embeddings=evaluated_q.outputs["embeddings"], manifest=manifest,
                 **pick(p, "experiment", "run_name")).set_caching_options(False)

        with dsl.If(p["index_gallery"] == True, name="index-enabled"):  # noqa: E712 (a pipeline channel)
            indexed = task("index", manifest=manifest, model=model, index_type=p["index_type"],
                           target_recall=p["index_target_recall"], batch_size=p["eval_batch_size"],
                           num_workers=p["num_workers"], seed=p["seed"])
            task("track", metrics=indexed.outputs["metrics"], model=model, embeddings=evaluated.outputs["embeddings"],
                 manifest=manifest, **pick(p, "experiment", "run_name")).set_caching_options(False)
        return evaluated.outputs["metrics"]

    # The parameters, their types and defaults: dcml.contracts.params, nowhere else.
    dcml_pipeline.__signature__ = params.pipeline_signature().replace(return_annotation=Metrics)
    dcml_pipeline.__name__ = name.replace("-", "_")
    return dsl.pipeline(name=name, description="Divide-and-conquer deep metric learning (dcml)")(dcml_pipeline)


def compile_pipeline(out: str, **kwargs) -> None:
    """Compile to Kubeflow YAML (IR)."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(**kwargs), package_path=out)
