"""`dcml run`: the whole pipeline on this machine (kfp.local). `dcml compile` / `dcml submit`: dcml_app.kubeflow."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import click

from dcml.contracts import params, records
from dcml_app import preflight, presets
from dcml.contracts.errors import DcmlError

DEFAULT_OUTPUT_DIR = "runs"


# ----------------------------------------------------------------- parameters
def resolve_arguments(config: str | None, overrides: tuple[str, ...]) -> dict:
    """Preset/JSON values, then --set overrides, each checked against dcml.contracts.params.

    Everything is checked here, before any stage runs: unknown names, types,
    ranges, finiteness, allowed values and the dataset's name; a bad value is
    a one-line error naming where it came from.
    """
    from data_prep import registry

    source = f"--config {config}" if config else "--config"
    values = params.validate(presets.load(config), source, between=False)
    sets = {}
    for item in overrides:
        if "=" not in item:
            raise DcmlError(f"--set {item}: expected key=value, e.g. --set epochs=6")
        key, value = item.split("=", 1)
        sets[key.strip().replace("-", "_")] = value
    values.update(params.validate(sets, "--set", between=False))
    # the rules between parameters on the preset and --set together
    params.check_constraints(values, (f"{source} with --set" if config else "--set") if sets else source)
    if "dataset" in values:
        registry.canonical(values["dataset"])
    if values.get("dataset") == "folder" and not values.get("data_root"):
        raise DcmlError(f"{source}: dataset=folder needs the folder; pass --set data_root=DIR (one sub-folder of "
                        "images per class)")
    named = "experiment" in sets or ("experiment" in values and config not in presets.PRESETS)
    if values.get("dataset") == "folder" and values.get("data_root") and not named:
        # A user's own folder gets its own experiment, not a built-in preset's.
        name = Path(values["data_root"]).expanduser().resolve().name or "folder"
        values["experiment"] = presets.FOLDER_EXPERIMENT.format(name=name)
    return _passable(values)


def _absolute_data_root(args: dict) -> dict:
    root = args.get("data_root")
    if root:
        path = Path(root).expanduser()
        if not path.exists():
            raise DcmlError(f"data_root {root}: no such directory; pass --set data_root=DIR")
        args["data_root"] = str(path.resolve())
    return args


def _passable(args: dict) -> dict:
    """Values the pipeline can hand over: the track step gets every parameter in one dict (the MLflow run's
    parameters), and kfp.local writes that dict's text into JSON unescaped."""
    for name, value in args.items():
        if isinstance(value, str) and ('"' in value or "\\" in value):
            raise DcmlError(f"{name}={value!r}: a double quote or backslash cannot pass through the pipeline's "
                            "parameters; rename it without them")
    return args


# ------------------------------------------------------------------ structure
def structure_options(f):
    """Compile-time options shared by run / compile / submit."""
    options = [
        click.option("--mode", type=click.Choice(["shared", "parallel"]), default="shared", show_default=True,
                     help="shared: the paper's K learners over one backbone; parallel: one worker per cluster, then merge."),
        click.option("--method", type=click.Choice(["dc", "dfml"]), default="dc", show_default=True,
                     help="dc: divide and conquer; dfml: factorised backbone with a router."),
        click.option("--rounds", type=int, default=1, show_default=True, help="parallel mode: cluster -> fan-out -> merge rounds."),
        click.option("--merge", type=click.Choice(["average", "first"]), default="average", show_default=True,
                     help="parallel mode: how worker backbones merge."),
        click.option("--freeze-backbone/--train-backbone", default=False, show_default=True,
                     help="parallel mode: keep the backbone frozen in the per-cluster phase."),
        click.option("--image-registry", default="dcml", show_default=True),
        click.option("--image-tag", default=None, help="Image tag; defaults to the git commit (never 'latest')."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _build(mode, method, rounds, merge, freeze_backbone, image_registry, image_tag,
           max_parallel_workers=0, cluster=None, defaults=None):
    import pipeline

    tag = image_tag or records.git_commit()
    if tag in ("", "unknown"):
        tag = "dev"
    try:
        return pipeline.build_pipeline(mode=mode, method=method, rounds=rounds, merge=merge,
                                       freeze_backbone=freeze_backbone,
                                       max_parallel_workers=max_parallel_workers,
                                       image_registry=image_registry, image_tag=tag, cluster=cluster,
                                       defaults=defaults), tag
    except ValueError as exc:
        raise DcmlError(str(exc)) from None


# ------------------------------------------------------------------------ run
def _new_run_folder(parent: Path) -> tuple[str, Path]:
    """A run folder no other run (of any process, or of this one) has: "<time>-<pid>[-n]"."""
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for n in range(1000):
        run_id = stem if n == 0 else f"{stem}-{n}"
        try:
            (parent / run_id).mkdir()
            return run_id, parent / run_id
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {parent}")


def run_local(args: dict, *, mode="shared", method="dc", rounds=1, merge="average", freeze_backbone=False,
              output_dir=DEFAULT_OUTPUT_DIR, cache=True, runner="subprocess", image_registry="dcml",
              image_tag=None, tracking_uri=None, max_parallel_workers=1, verbose=False, terminal=None) -> dict:
    """Run the pipeline with kfp.local; returns {run_dir, log_dir, stages, metrics, mlflow, ...}.

    Each run gets its own folder ``<output_dir>/pipelines/<run id>/``: the
    KFP run folder inside it, and ``logs/`` (run.log and one log per task).
    The terminal (``terminal``, default stdout) gets one line per stage
    (dcml_app.console); ``verbose`` echoes everything. The cache
    (``<output_dir>/cache``) and the training resume files
    (``<output_dir>/resume``) are shared by all runs of the folder.
    """
    from kfp import local

    import dcml
    from dcml import tracking
    from dcml.stagekit import RESUME_ROOT_ENV
    from dcml_app.console import PipelineConsole

    args = _passable(_absolute_data_root(params.validate(dict(args), "pipeline parameters")))
    output_dir = Path(output_dir).resolve()
    tracking_uri = tracking_uri or tracking.default_tracking_uri()
    preflight.check_places(output_dir, tracking_uri)  # every place the run writes, before the first stage
    args = _with_data_version(args, clusters=method == "dc")
    pipeline_fn, _ = _build(mode, method, rounds, merge, freeze_backbone, image_registry, image_tag,
                            max_parallel_workers=max_parallel_workers)
    run_id, run_root = _new_run_folder(output_dir / "pipelines")

    # Stages run in subprocesses that inherit this environment: the MLflow
    # store is chosen here, not passed as a (cache-busting) pipeline input;
    # stages report progress as events, resume from the shared folder and end
    # with this process.
    environment = {"MLFLOW_TRACKING_URI": tracking_uri,
                   "DCML_EVENTS": "1", RESUME_ROOT_ENV: str(output_dir / "resume"),
                   "DCML_RUNNER": f"{dcml.runner_token(os.getpid())}#{run_id}"}
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    local_runner = _docker_runner(args, output_dir) if runner == "docker" else local.SubprocessRunner(use_venv=False)
    local.init(runner=local_runner, pipeline_root=str(run_root), enable_caching=cache,
               cache_root=str(output_dir / "cache"))
    served = _serve_only_sealed_outputs(output_dir / "cache") if cache else set()
    console = PipelineConsole(run_root / "logs", terminal=terminal or sys.stdout, verbose=verbose)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console), warnings.catch_warnings(), \
                _info_logs_to(console):
            warnings.simplefilter("always")  # known-harmless kfp warnings: into the log, once per task
            task = pipeline_fn(**args)
    except RuntimeError as exc:
        failed = [s for s in console.stages if s["status"] == "failed"]
        if failed:
            raise DcmlError(f"stage {failed[0]['name']} failed: {failed[0]['error']}; "
                            f"full log: {failed[0]['log']}") from None
        raise DcmlError(f"pipeline failed: {exc}; full log: {console.log_path}") from None
    finally:
        console.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    elapsed = time.perf_counter() - started
    run_dir = next(p for p in run_root.iterdir() if p.is_dir() and p.name != "logs")
    _link_cached_tasks(run_dir, served)
    latest = output_dir / "latest"
    tmp_link = output_dir / f".latest.{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(run_dir, target_is_directory=True)
    os.replace(tmp_link, latest)  # atomic: concurrent runs never see it missing

    metrics_path = Path(task.output.path) / "metrics.json"
    metrics = json.loads(metrics_path.read_text())["metrics"]

    def tracked(task_name):
        info = run_dir / task_name / "mlflow_run" / "record.json"
        return json.loads(info.read_text()) if info.is_file() else {}

    summary = {"run_dir": str(run_dir), "log_dir": str(console.log_dir), "stages": console.stages,
               "metrics_file": str(metrics_path), "metrics": metrics, "mlflow": tracked("track"),
               "seconds": round(elapsed, 2), "training": _training_effect(metrics_path)}
    compressed = run_dir / "evaluate-2" / "metrics" / "metrics.json"
    if compressed.is_file():  # the compress_bits > 0 branch
        summary["compressed"] = {"metrics_file": str(compressed),
                                 "metrics": json.loads(compressed.read_text())["metrics"],
                                 "mlflow": tracked("track-2")}
    index = run_dir / "index" / "gallery"
    if index.is_dir():  # the index_gallery branch
        summary["index"] = {"path": str(index), "metrics": json.loads((index / "index.json").read_text())["metrics"],
                            "mlflow": tracked("track-3")}
    return summary


@contextlib.contextmanager
def _info_logs_to(stream):
    """kfp.local logs some task events (cache hits) at INFO outside its own log set-up: catch them."""
    import logging

    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _with_data_version(args: dict, clusters: bool = False) -> dict:
    """Set ``data_version`` to the dataset's content fingerprint (unless given).

    kfp.local keys its cache on parameter strings, so without it a dataset
    folder whose images changed would be served from the cache; with it, any
    changed byte re-runs ingestion and so everything after it. The per-file
    digests are cached (dcml.contracts.digests): on unchanged data this costs
    a listing and a stat per file.
    """
    if args.get("data_version"):
        return args
    from data_prep import registry

    defaults = params.defaults(("dataset", "split_mode", "max_per_class"))
    get = lambda k: args.get(k, defaults[k])  # noqa: E731
    rows, meta = registry.read_dataset(get("dataset"), args.get("data_root") or None, get("split_mode") or None,
                                       max_per_class=get("max_per_class") or None)
    if clusters:  # K clusters need K training classes (the data is read here anyway)
        k = args.get("num_clusters", params.PARAMS["num_clusters"].default)
        val = args.get("val_fraction", params.PARAMS["val_fraction"].default)
        preflight.check_clusters(k, preflight.training_classes(rows, val), get("dataset"))
    return {**args, "data_version": meta["fingerprint"]}


def _link_cached_tasks(run_dir: Path, served: set) -> None:
    """Make the run folder show the whole run: each task served from the cache gets a link
    ``<run_dir>/<task>`` to the folder its cached outputs live in (an earlier run's), so
    ``runs/latest/finetune/model/model.pt`` exists whether finetune ran or was cached."""
    for task_dir in sorted(served):
        link = run_dir / task_dir.name
        if task_dir.is_dir() and not link.exists() and not link.is_symlink() and task_dir.parent != run_dir:
            link.symlink_to(task_dir, target_is_directory=True)


def _serve_only_sealed_outputs(cache_root: Path) -> set:
    """Make kfp.local's cache check the outputs it would serve.

    kfp.local serves a cache entry while its artifacts' folders exist; a file
    deleted or changed inside one would make a later stage fail. Every dcml
    component seals its output folders (dcml.contracts.io.seal); this cache
    serves an entry only while all its seals hold, else the stage runs again.
    (Installed as kfp.local's cache object, a module-level singleton of the
    pinned kfp version.)
    """
    import logging

    from kfp import dsl
    from kfp.local import cache as kfp_cache

    from dcml.contracts.io import check_seal

    class SealedCache(kfp_cache.LocalCache):
        def get(self, key):
            outputs = super().get(key)
            for value in (outputs or {}).values():
                for artifact in value if isinstance(value, list) else [value]:
                    problem = isinstance(artifact, dsl.Artifact) and check_seal(artifact.path)
                    if problem:
                        logging.info(f"cache entry {key[:12]} not served: {problem}; running the task again")
                        return None
            for value in (outputs or {}).values():
                for artifact in value if isinstance(value, list) else [value]:
                    if isinstance(artifact, dsl.Artifact) and artifact.path:
                        served.add(Path(artifact.path).parent)  # <earlier run>/<pipeline>/<task>
            return outputs

    served: set = set()
    kfp_cache._cache_singleton = SealedCache(str(cache_root))
    kfp_cache._cache_singleton_root = str(cache_root)
    return served


def _training_effect(metrics_file: Path) -> dict:
    """Test R@1 of the pretrained features (every run's baseline), of the model training
    started from (the first training stage's initial model) and of the final one, and which
    candidate was delivered, from the lineage of the final metrics (dcml.algorithm.baseline)."""
    from dcml.algorithm import baseline

    lineage = list(records.walk(records.read(metrics_file)))
    trained = [r for r in lineage if r.get("stage") in ("train", "train-dfml")]
    final = next((r for r in lineage if r.get("stage") == "evaluate"), {}).get("metrics", {})
    start = trained[-1].get("metrics", {}).get("initial_recall@1") if trained else None
    end = final.get("recall@1")
    effect = baseline.from_lineage(lineage, final)
    if start is not None and end is not None:
        effect.update({"untrained_recall@1": start, "trained_recall@1": end})
    return effect


def training_lines(effect: dict) -> list[str]:
    """The run's headline: pretrained features -> trained (test), the untrained head beside it,
    and which candidate the validation classes chose."""
    from dcml.algorithm import baseline

    lines = []
    head = baseline.headline(effect)
    if head:
        if "untrained_recall@1" in effect and "skipped" not in effect:
            head += f"  [untrained head: R@1 {effect['untrained_recall@1']:.4f}]"
        lines.append(head)
    if "untrained_recall@1" in effect and (not head or "skipped" in effect):
        before, after = effect["untrained_recall@1"], effect["trained_recall@1"]
        lines.append(f"training: R@1 {before:.4f} untrained -> {after:.4f} trained ({100 * (after - before):+.1f} points)")
    if "delivered" in effect.get("choice", {}):
        lines.append(baseline.choice_line(effect["choice"]))
        warning = baseline.noise_warning(effect["choice"])
        if warning:
            lines.append(warning)
    return lines


def _docker_runner(args: dict, output_dir: Path):
    """DockerRunner with the dataset and the MLflow store mounted at the same paths."""
    import docker.types
    from kfp import local

    from dcml import tracking

    mounts = []
    if args.get("data_root"):
        mounts.append(docker.types.Mount(target=args["data_root"], source=args["data_root"], type="bind", read_only=True))
    fm = Path("/usr/share/datasets/fashion-mnist")
    if not args.get("data_root") and fm.is_dir():
        mounts.append(docker.types.Mount(target=str(fm), source=str(fm), type="bind", read_only=True))
    store = tracking.default_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    mounts.append(docker.types.Mount(target=str(store), source=str(store), type="bind"))
    extra = {}
    if shutil.which("nvidia-smi"):
        extra["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    # The images run as a non-root user; run as the host user so the executor
    # can write task folders under the mounted pipeline root.
    return local.DockerRunner(mounts=mounts, environment={"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]},
                              shm_size="2g", user=f"{os.getuid()}:{os.getgid()}", **extra)


def format_metrics(metrics: dict) -> str:
    keys = [k for k in metrics if k.startswith("recall@")] + [k for k in ("nmi", "ami", "map@r", "r_precision") if k in metrics]
    width = max(len(k) for k in keys)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    lines += [f"{k.ljust(width)}  {metrics[k]:.4f}" for k in keys]
    return "\n".join(lines)


@click.command("run")
@click.option("--config", default=None, help=f"Preset ({', '.join(presets.PRESETS)}) or a JSON file of pipeline parameters.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a pipeline parameter (repeatable).")
@structure_options
@click.option("--output-dir", default=DEFAULT_OUTPUT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Pipeline outputs and the local cache; <dir>/latest points at the newest run.")
@click.option("--cache/--no-cache", default=True, show_default=True, help="Serve unchanged stages from the local cache.")
@click.option("--runner", type=click.Choice(["subprocess", "docker"]), default="subprocess", show_default=True,
              help="subprocess: this Python environment; docker: the stage images (make images).")
@click.option("--workers", "max_parallel_workers", type=int, default=1, show_default=True,
              help="parallel mode: workers run at once on this machine.")
@click.option("--tracking-uri", default=None, help="MLflow store; defaults to $MLFLOW_TRACKING_URI or sqlite:///./mlflow/mlflow.db.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the run summary as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show everything the stages and KFP print (it always goes to the logs).")
def run_cli(config, overrides, mode, method, rounds, merge, freeze_backbone, image_registry, image_tag,
            output_dir, cache, runner, max_parallel_workers, tracking_uri, json_out, verbose):
    """Run the whole pipeline on this machine (kfp.local), with caching."""
    args = resolve_arguments(config, overrides)
    _build(mode, method, rounds, merge, freeze_backbone, image_registry, image_tag)  # structure errors first
    if json_out:
        _check_writable(json_out)
    click.echo(f"dcml run: {args.get('dataset', params.PARAMS['dataset'].default)}, "
               f"{'dfml' if method == 'dfml' else f'{mode} mode'} (every line in the log: --verbose)")
    summary = run_local(args, mode=mode, method=method, rounds=rounds, merge=merge,
                        freeze_backbone=freeze_backbone, output_dir=output_dir, cache=cache, runner=runner,
                        image_registry=image_registry, image_tag=image_tag, tracking_uri=tracking_uri,
                        max_parallel_workers=max_parallel_workers, verbose=verbose)
    click.echo("")
    click.echo(format_metrics(summary["metrics"]))
    for line in training_lines(summary["training"]):
        click.echo(line)
    if "compressed" in summary:
        click.echo("after weight quantisation (compress_bits):")
        click.echo(format_metrics(summary["compressed"]["metrics"]))
    if "index" in summary:
        click.echo(f"index      : {summary['index']['path']} ({summary['index']['metrics']['images']} images; "
                   f"`dcml serve --index` it)")
    click.echo(f"run folder : {summary['run_dir']}")
    click.echo(f"logs       : {summary['log_dir']}")
    if summary["mlflow"]:
        from dcml.tracking.store import ui_command

        info = summary["mlflow"]
        click.echo(f"MLflow     : run {info['mlflow_run_id']} in {info['tracking_uri']}; UI: "
                   f"{ui_command(info['tracking_uri'])}")
        if info.get("ui_url"):
            click.echo(f"             {info['ui_url']}")
    click.echo(f"wall time  : {summary['seconds']:.1f} s")
    if json_out:
        from dcml.contracts.io import write_json

        write_json(json_out, summary)


def _check_writable(path) -> None:
    """A file can be written at ``path`` (checked before any work starts)."""
    from dcml.contracts.io import check_writable

    check_writable(path)
