"""Helpers shared by the benchmarks: machine and versions, threads, timing, JSON results.

Every result file in bench/results carries ``machine``, ``versions``,
``command`` (the exact command line that produced it) and ``finished``; the
report (bench/run_all.py --report-only) reads nothing else from the system.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
# Pipeline outputs, caches and MLflow stores of benchmark runs (git-ignored /runs/).
WORK = REPO / "runs" / "bench"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def set_threads(threads: int | None) -> int | None:
    """Pin OpenMP/BLAS/torch/faiss threads here and in every child process.

    On an oversubscribed machine torch's default (one OpenMP thread per core)
    spins and can be several times slower than one thread, so the benchmarks
    pin the count and report it. Stages of the local pipeline are subprocesses
    that inherit the environment set here.
    """
    if not threads:
        return None
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import faiss
    import torch

    torch.set_num_threads(int(threads))
    faiss.omp_set_num_threads(int(threads))
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(threads))
    except ImportError:  # scikit-learn brings threadpoolctl; without it the env vars still apply
        pass
    return int(threads)


def command_line(module: str, argv: list[str] | None) -> str:
    """The exact command that reproduces a result, from the repository root."""
    args = sys.argv[1:] if argv is None else list(argv)
    prefix = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    return f"{prefix}.venv/bin/python -m {module} {shlex.join(args)}".rstrip()


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def machine_info() -> dict:
    import torch

    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": _ram_gib(),
        "gpu": gpu,
        "platform": platform.platform(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def git_state() -> dict:
    """Commit and whether the working tree had uncommitted changes."""
    import subprocess

    from dcml.contracts.records import git_commit

    dirty = None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        dirty = bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": git_commit(), "dirty": dirty}


def versions() -> dict:
    import dcml

    names = {"torch": "torch", "torchvision": "torchvision", "faiss": "faiss", "kfp": "kfp", "mlflow": "mlflow",
             "numpy": "numpy", "scikit-learn": "sklearn", "pytorch-metric-learning": "pytorch_metric_learning"}
    out = {"python": platform.python_version(), "dcml": dcml.__version__}
    out.update({name: _version(module) for name, module in names.items()})
    git = git_state()
    out["dcml_git_commit"] = git["commit"] + ("-dirty" if git["dirty"] else "")
    return out


def result_header(benchmark: str, module: str, argv: list[str] | None) -> dict:
    """The fields every result file starts with."""
    return {
        "benchmark": benchmark,
        "command": command_line(module, argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
    }


def write_result(name: str | Path, payload: dict, complete: bool = True) -> Path:
    """Write bench/results/<name>.json (or the path ``name``) atomically, also after partial steps."""
    from dcml.contracts.io import write_json

    payload = dict(payload)
    payload["complete"] = complete
    payload["finished" if complete else "updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    payload["machine"] = {**payload.get("machine", {}), "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    path = name if isinstance(name, Path) else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)
    return path


def save_png(fig, dest: Path, dpi: int = 110) -> Path:
    """Lay out, write atomically (no half-written plot beside a finished JSON) and close a figure."""
    import matplotlib.pyplot as plt

    from dcml.contracts.io import atomic_path

    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return dest


BENCH_TRACKING_URI = f"sqlite:///{(WORK / 'mlflow.db').resolve()}"


def log_to_mlflow(experiment: str, run_name: str, params: dict, metrics: dict, artifacts: list[Path],
                  tags: dict | None = None, children: list[tuple[str, dict, dict]] = ()) -> str:
    """One MLflow run per benchmark result (in the benchmarks' sqlite store, or
    $MLFLOW_TRACKING_URI): params, headline metrics, the JSON and plots as
    artifacts, and one nested run per (name, params, metrics) in ``children`` so
    the rows can be compared in the UI. Returns the parent run id."""
    import mlflow

    from dcml import tracking

    experiment_id = tracking.setup(experiment, os.environ.get("MLFLOW_TRACKING_URI") or BENCH_TRACKING_URI)

    def clean(values: dict) -> dict:  # numbers only: None, strings and nested dicts are not metrics
        return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    # experiment_id explicitly: the default experiment's artifacts would go to ./mlruns.
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                          tags={"dcml.benchmark": experiment, **(tags or {})}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({tracking.metric_key(k): v for k, v in clean(metrics).items()})
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for name, child_params, child_metrics in children:
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True):
                mlflow.log_params({k: str(v)[:500] for k, v in child_params.items()})
                mlflow.log_metrics({tracking.metric_key(k): v for k, v in clean(child_metrics).items()})
        return run.info.run_id


class Stopwatch:
    """Wall and CPU seconds of a block (CPU = this process only)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    @contextmanager
    def __call__(self):
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.wall += time.perf_counter() - w0
            self.cpu += time.process_time() - c0


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    import statistics

    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def class_embeddings(n: int, dim: int = 128, seed: int = 0, noise: float = 1.42, min_size: int = 5,
                     max_size: int = 10) -> tuple:
    """(x [n, dim] float32 unit rows, labels [n]): classes of min_size..max_size images.

    Each image is its class's random unit centre plus Gaussian noise of norm
    ``noise`` (1.42 overlaps the classes about as much as real test
    embeddings: Recall@1 around 0.8), L2-normalised, in random order.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = []
    total = 0
    while total < n:
        size = int(min(rng.integers(min_size, max_size + 1), n - total))
        sizes.append(size)
        total += size
    if sizes[-1] < min_size and len(sizes) > 1:  # fold a short last class into the previous one
        last = sizes.pop()
        sizes[-1] += last
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * np.float32(noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return np.ascontiguousarray(x[order], dtype=np.float32), labels[order]
