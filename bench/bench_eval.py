"""Benchmark of evaluation: dcml.algorithm.metrics vs pytorch-metric-learning, SOP-sized.

60,000 x 128 float32 embeddings over 11,000 classes of 2..12 images (the size
of Stanford Online Products' test set), with class structure (a unit class
centre plus Gaussian noise, then L2-normalised). Both implementations compute
Recall@1/2/4/8, R-Precision, MAP@R, NMI and AMI of the set against itself:

* dcml: ``dcml.algorithm.metrics.evaluate_embeddings``;
* PML: ``AccuracyCalculator(k="max_bin_count")`` (Recall@2/4/8 added as
  ``calculate_*`` methods over PML's own kNN labels; Recall@1 = PML's
  precision_at_1).

Each runs in its own subprocess, so its peak RSS is its own; the values must
agree to 1e-6. A second pair runs the retrieval metrics only (no k-means for
NMI/AMI), which shows what the implementations do beyond the k-means both
must run identically. Wall and CPU seconds are reported: the machine may be
shared, and CPU time is the steadier of the two.

    python -m bench.bench_eval            # writes bench/results/eval.json
    python -m bench.bench_eval --n 20000 --classes 3600 --out /tmp/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import PY, Results, commands_line, pct

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
KS = (1, 2, 4, 8)
TOLERANCE = 1e-6
GOAL = {"speedup": 3.0, "peak_gib": 2.0}
RETRIEVAL_KEYS = [f"recall@{k}" for k in KS] + ["r_precision", "map@r"]
ALL_KEYS = RETRIEVAL_KEYS + ["nmi", "ami"]


def make_embeddings(n: int, classes: int, dim: int, seed: int, noise: float, min_size: int = 2, max_size: int = 12):
    """(x [n, dim] float32 unit rows, labels [n]) with SOP-like class sizes."""
    if not min_size * classes <= n <= max_size * classes:
        raise SystemExit(f"cannot split {n} images into {classes} classes of {min_size}..{max_size}")
    rng = np.random.default_rng(seed)
    sizes = np.full(classes, min_size)
    extra = n - sizes.sum()
    while extra > 0:  # grow random classes one image at a time, capped at max_size
        room = np.flatnonzero(sizes < max_size)
        grow = rng.choice(room, size=min(extra, len(room)), replace=False)
        grow = grow[rng.random(len(grow)) < 0.6][:extra]
        sizes[grow] += 1
        extra -= len(grow)
    labels = np.repeat(np.arange(classes), sizes)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + rng.standard_normal((n, dim)).astype(np.float32) * np.float32(noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return np.ascontiguousarray(x[order], dtype=np.float32), labels[order]


# ---------------------------------------------------------------------------
# children: one implementation each, in a fresh process
# ---------------------------------------------------------------------------

def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the
    parent's peak into a child across fork + exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_dcml(x, y, retrieval_only: bool) -> tuple[dict, dict]:
    from dcml.algorithm.metrics import RETRIEVAL_METRICS, evaluate_embeddings

    details: dict = {}
    include = RETRIEVAL_METRICS if retrieval_only else None
    values = evaluate_embeddings(x, y, ks=KS, include=include, details=details)
    phases = {key: round(value, 3) for key, value in details.items() if "seconds_" in key}
    phases["k"] = details.get("k")
    return values, phases


def _run_pml(x, y, retrieval_only: bool) -> tuple[dict, dict]:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKMeans, FaissKNN

    phases: dict[str, float] = {}

    def timed(name, call, *args, **kwargs):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            return call(*args, **kwargs)
        finally:
            phases[f"seconds_{name}"] = phases.get(f"seconds_{name}", 0.0) + time.perf_counter() - wall0
            phases[f"cpu_seconds_{name}"] = phases.get(f"cpu_seconds_{name}", 0.0) + time.process_time() - cpu0

    class TimedKNN(FaissKNN):
        def __call__(self, *args, **kwargs):
            return timed("knn", super().__call__, *args, **kwargs)

    class TimedKMeans(FaissKMeans):
        def __call__(self, *args, **kwargs):
            return timed("kmeans", super().__call__, *args, **kwargs)

    def recall_at(k):
        def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn = knn_labels[not_lone_query_mask][:, :k]
            return torch.any(knn == query_labels[not_lone_query_mask][:, None], dim=1).double().mean().item()
        return calculate

    def timed_ami(self, **kwargs):
        return timed("ami", AccuracyCalculator.calculate_AMI, self, **kwargs)

    extra_recall = {k: f"recall_at_{k}" for k in KS if k != 1}
    methods = {f"calculate_{name}": recall_at(k) for k, name in extra_recall.items()}
    methods["calculate_AMI"] = timed_ami
    methods["requires_knn"] = lambda self: AccuracyCalculator.requires_knn(self) + list(extra_recall.values())
    calculator_class = type("AccuracyCalculatorWithRecall", (AccuracyCalculator,), methods)
    include = ["precision_at_1", *extra_recall.values(), "r_precision", "mean_average_precision_at_r"]
    if not retrieval_only:
        include += ["NMI", "AMI"]
    # The defaults PML would pick on this CPU-only machine, timed.
    calculator = calculator_class(include=tuple(include), k="max_bin_count", device=torch.device("cpu"),
                                  knn_func=TimedKNN(), kmeans_func=TimedKMeans(niter=20, gpu=False))
    got = calculator.get_accuracy(x, y)
    values = {"recall@1": got["precision_at_1"], **{f"recall@{k}": got[name] for k, name in extra_recall.items()},
              "r_precision": got["r_precision"], "map@r": got["mean_average_precision_at_r"]}
    if not retrieval_only:
        values.update(nmi=got["NMI"], ami=got["AMI"])
    return values, {key: round(value, 3) for key, value in phases.items()}


def child(implementation: str, data: str, retrieval_only: bool, threads: int | None) -> None:
    if threads:
        import faiss

        faiss.omp_set_num_threads(threads)
        if implementation == "pml":  # dcml's evaluation doesn't use torch
            import torch

            torch.set_num_threads(threads)
    loaded = np.load(data)
    x, y = loaded["x"], loaded["y"]
    runner = {"dcml": _run_dcml, "pml": _run_pml}[implementation]
    if implementation == "pml":  # import before timing, like dcml's imports below
        import torch  # noqa: F401
        from pytorch_metric_learning.utils import accuracy_calculator  # noqa: F401
    else:
        import dcml.algorithm.metrics  # noqa: F401
        import sklearn.metrics  # noqa: F401
    baseline = _peak_rss_mib()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    values, phases = runner(x, y, retrieval_only)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(json.dumps({"values": values, "phases": phases, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                      "peak_rss_mib": round(_peak_rss_mib(), 1), "rss_before_mib": round(baseline, 1)}))


# ---------------------------------------------------------------------------
# parent: data, runs, comparison, report
# ---------------------------------------------------------------------------

def _spawn(implementation: str, data: Path, retrieval_only: bool, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_eval", "--child", implementation, "--data", str(data)]
    if retrieval_only:
        cmd.append("--retrieval-only")
    env = dict(os.environ)
    if threads:  # OpenMP (faiss), OpenBLAS, MKL and torch all read these at start-up
        cmd += ["--threads", str(threads)]
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    load_before = os.getloadavg()
    print(f"running {implementation}{' (retrieval only)' if retrieval_only else ''} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{implementation} child failed with exit status {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average_before"] = [round(v, 2) for v in load_before]
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(f"  {implementation}: {result['wall_s']} s wall, {result['cpu_s']} s CPU, "
          f"peak {result['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
    return result


def _compare(ours: dict, theirs: dict, keys: list[str]) -> dict:
    diffs = {key: abs(ours["values"][key] - theirs["values"][key]) for key in keys}
    return {
        "identical_to_1e-6": all(d <= TOLERANCE for d in diffs.values()),
        "max_abs_diff": max(diffs.values()),
        "abs_diff": diffs,
        "speedup_wall": round(theirs["wall_s"] / ours["wall_s"], 2),
        "speedup_cpu": round(theirs["cpu_s"] / ours["cpu_s"], 2),
        "peak_rss_ratio": round(theirs["peak_rss_mib"] / ours["peak_rss_mib"], 2),
    }


def _machine() -> dict:
    import faiss
    import pytorch_metric_learning
    import scipy
    import sklearn
    import torch

    import dcml
    from dcml.contracts.records import git_commit

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                     "scikit-learn": sklearn.__version__, "torch": torch.__version__, "faiss": faiss.__version__,
                     "pytorch-metric-learning": pytorch_metric_learning.__version__, "dcml": dcml.__version__},
        "git_commit": git_commit(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--classes", type=int, default=11000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--noise", type=float, default=1.42,
                        help="noise norm relative to the unit class centre (1.42: Recall@1 ~ 0.8, SOP-like)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both implementations (default: the libraries' own, all cores)")
    parser.add_argument("--skip-retrieval-only", action="store_true", help="only the full-metrics pair")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval.json")
    parser.add_argument("--child", choices=["dcml", "pml"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--retrieval-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.retrieval_only, args.threads)
        return

    from dcml.contracts.io import write_json

    x, y = make_embeddings(args.n, args.classes, args.dim, args.seed, args.noise)
    sizes = np.bincount(y)
    report = {
        "benchmark": "evaluation: dcml.algorithm.metrics.evaluate_embeddings vs PML AccuracyCalculator(k='max_bin_count')",
        "command": " ".join(["python -m bench.bench_eval", *(argv if argv is not None else sys.argv[1:])]),
        "machine": _machine(),
        "data": {"n": args.n, "dim": args.dim, "classes": args.classes, "noise": args.noise, "seed": args.seed,
                 "class_size_min": int(sizes.min()), "class_size_max": int(sizes.max()),
                 "class_size_mean": round(float(sizes.mean()), 3), "embedding_mib": round(x.nbytes / 2**20, 1)},
        "ks": list(KS),
        "threads": args.threads or "library default",
        "goal": {"speedup_at_least": GOAL["speedup"], "identical_to": TOLERANCE, "peak_rss_below_gib": GOAL["peak_gib"]},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        data = Path(tmp) / "embeddings.npz"
        np.savez(data, x=x, y=y)
        del x
        pairs = [("all", False)] + ([] if args.skip_retrieval_only else [("retrieval_only", True)])
        for name, retrieval_only in pairs:
            ours = _spawn("dcml", data, retrieval_only, args.threads)
            theirs = _spawn("pml", data, retrieval_only, args.threads)
            keys = RETRIEVAL_KEYS if retrieval_only else ALL_KEYS
            report["runs"][name] = {"dcml": ours, "pml": theirs, "comparison": _compare(ours, theirs, keys)}

    full = report["runs"]["all"]
    ours, theirs = full["dcml"], full["pml"]
    shared_cpu = ours["phases"].get("cpu_seconds_knn", 0) + ours["phases"].get("cpu_seconds_kmeans", 0)
    report["summary"] = {
        "speedup_wall": full["comparison"]["speedup_wall"],
        "speedup_cpu": full["comparison"]["speedup_cpu"],
        "identical_to_1e-6": all(run["comparison"]["identical_to_1e-6"] for run in report["runs"].values()),
        "dcml_peak_rss_gib": round(ours["peak_rss_mib"] / 1024, 3),
        "pml_peak_rss_gib": round(theirs["peak_rss_mib"] / 1024, 3),
        "meets_speed_goal_wall": full["comparison"]["speedup_wall"] >= GOAL["speedup"],
        "meets_speed_goal_cpu": full["comparison"]["speedup_cpu"] >= GOAL["speedup"],
        "meets_memory_goal": ours["peak_rss_mib"] / 1024 < GOAL["peak_gib"],
        # The exact kNN search and the k-means for NMI/AMI are the same faiss calls in
        # both (they must be, for identical values); their CPU time bounds the speed-up.
        "dcml_cpu_share_knn": round(ours["phases"].get("cpu_seconds_knn", 0) / ours["cpu_s"], 3),
        "dcml_cpu_share_kmeans": round(ours["phases"].get("cpu_seconds_kmeans", 0) / ours["cpu_s"], 3),
        "speedup_cpu_bound_with_same_knn_and_kmeans": round(theirs["cpu_s"] / shared_cpu, 2) if shared_cpu else None,
    }
    if "retrieval_only" in report["runs"]:
        retrieval = report["runs"]["retrieval_only"]["comparison"]
        report["summary"].update(retrieval_only_speedup_wall=retrieval["speedup_wall"],
                                 retrieval_only_speedup_cpu=retrieval["speedup_cpu"])
    write_json(args.out, report)
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    if not report["summary"]["identical_to_1e-6"]:
        raise SystemExit("values differ between dcml and PML")


# ----------------------------------------------------------------- running and report

def commands(quick: bool, threads: int) -> list[list[str]]:
    size = ["--n", "20000", "--classes", "3600", "--out", str(RESULTS / "eval_quick.json")] if quick else []
    return [[PY, "-m", "bench.bench_eval", "--threads", str(threads), *size]]


def report(results: Results) -> list[str]:
    result = results.best("eval")
    lines = ["## Evaluation against pytorch-metric-learning (bench_eval)", ""]
    if not result:
        return lines + [f"Not run yet: `{PY} -m bench.bench_eval`.", ""]
    d, s = result.get("data", {}), result.get("summary", {})
    lines += [f"{d.get('n', 0):,} x {d.get('dim')} embeddings, {d.get('classes', 0):,} classes "
              f"({d.get('class_size_min')}-{d.get('class_size_max')} images), threads: {result.get('threads')}.", "",
              "| run | dcml wall (s) | dcml CPU (s) | PML wall (s) | PML CPU (s) | speed-up wall | speed-up CPU | peak RSS dcml / PML (MiB) | identical |",
              "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for name, run in result.get("runs", {}).items():
        c = run["comparison"]
        lines.append(f"| {name.replace('_', ' ')} | {run['dcml']['wall_s']:.1f} | {run['dcml']['cpu_s']:.1f} "
                     f"| {run['pml']['wall_s']:.1f} | {run['pml']['cpu_s']:.1f} | {c['speedup_wall']:.2f}x "
                     f"| {c['speedup_cpu']:.2f}x | {run['dcml']['peak_rss_mib']:.0f} / {run['pml']['peak_rss_mib']:.0f} "
                     f"| {'yes' if c['identical_to_1e-6'] else 'NO'} |")
    if s:
        lines += ["", f"Goal {result.get('goal', {}).get('speedup_at_least')}x: "
                  f"{'met' if s.get('meets_speed_goal_wall') else 'not met'} in wall time, "
                  f"{'met' if s.get('meets_speed_goal_cpu') else 'not met'} in CPU time. Both implementations run "
                  "the same exact faiss kNN search and the same k-means (they must, for identical values); "
                  f"those take {pct(s.get('dcml_cpu_share_knn'), digits=0)}% and "
                  f"{pct(s.get('dcml_cpu_share_kmeans'), digits=0)}% of dcml's CPU time, which bounds any speed-up "
                  f"at {s.get('speedup_cpu_bound_with_same_knn_and_kmeans')}x CPU."]
    lines += ["", commands_line(result, results.step_command("eval")), ""]
    return lines


def speed_row(result: dict) -> str:
    """The all-metrics comparison as a row of the speed section's table."""
    s, d, run = result["summary"], result["data"], result["runs"]["all"]
    return (f"| evaluation vs PML AccuracyCalculator ({d['n']:,} x {d['dim']}, all metrics; bench_eval) "
            f"| {run['dcml']['wall_s']:.1f} s, {s['dcml_peak_rss_gib']:.2f} GiB | {run['pml']['wall_s']:.1f} s, "
            f"{s['pml_peak_rss_gib']:.2f} GiB | {s['speedup_wall']:.2f}x wall, {s['speedup_cpu']:.2f}x CPU; "
            f"values identical: {'yes' if s['identical_to_1e-6'] else 'NO'} "
            f"| {result.get('goal', {}).get('speedup_at_least', '—')}x | "
            f"{'yes' if s.get('meets_speed_goal_wall') else 'NO'} |")


if __name__ == "__main__":
    main()
