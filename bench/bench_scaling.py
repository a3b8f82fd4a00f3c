"""How clustering and evaluation time grow with the number of vectors (10k -> 200k).

For each size n: n x 128 float32 unit embeddings in classes of 5-10 images
(``bench.common.class_embeddings``: class centre + noise, Recall@1 ~ 0.8),

* clustering: ``dcml.algorithm.clustering.kmeans`` with k=8 (a pipeline's K) and k=64,
  100 iterations (the cluster stage's default), on every point; scikit-learn's
  KMeans (Lloyd, k-means++) at k=64 alongside;
* evaluation: ``dcml.algorithm.metrics.evaluate_embeddings`` of the set against itself,
  every metric (Recall@1/2/4/8, R-Precision, MAP@R, NMI, AMI; NMI/AMI run
  k-means with k = number of classes, as PML does), in a fresh process so its
  peak memory is its own; time split into the exact kNN search and the k-means.

The growth exponent b of time ~ n^b is fitted over the sizes measured.

    python -m bench.bench_scaling                       # 10k,25k,50k,100k,200k
    python -m bench.bench_scaling --sizes 10000,50000 --out /tmp/scaling.json

writes bench/results/scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, RESULTS, log, result_header, save_png, set_threads, write_result
from bench.report import PY, Results, commands_line, num, pct

SIZES = (10_000, 25_000, 50_000, 100_000, 200_000)
QUICK_SIZES = (10_000, 25_000, 50_000)
DIM = 128
CLUSTER_KS = (8, 64)
SKLEARN_K = 64
NITER = 100


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_evaluate(n: int, seed: int) -> None:
    """Evaluate one size in this (fresh) process; print a JSON line."""
    import sklearn.metrics  # noqa: F401  (imported lazily by the NMI step; keep import time out of the timing)

    from bench.common import class_embeddings
    from dcml.algorithm.metrics import evaluate_embeddings

    x, y = class_embeddings(n, DIM, seed)
    before = _peak_rss_mib()
    details: dict = {}
    w0, c0 = time.perf_counter(), time.process_time()
    metrics = evaluate_embeddings(x, y, ks=(1, 2, 4, 8), gpu=False, details=details)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(json.dumps({
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "knn_s": round(details.get("seconds_knn", float("nan")), 3),
        "kmeans_s": round(details.get("seconds_kmeans", float("nan")), 3),
        "nmi_ami_s": round(details.get("seconds_nmi_ami", float("nan")), 3),
        "knn_k": details.get("k"), "classes": int(len(np.unique(y))),
        "peak_rss_mib": round(_peak_rss_mib(), 1), "rss_before_mib": round(before, 1),
        "recall@1": metrics["recall@1"], "map@r": metrics["map@r"], "nmi": metrics["nmi"],
    }))


def evaluate_in_child(n: int, seed: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_scaling", "--child-evaluate", str(n), "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation of n={n} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_clustering(x: np.ndarray, seed: int, with_sklearn: bool) -> dict:
    from dcml.algorithm.clustering import kmeans, l2_normalize

    out = {}
    for k in CLUSTER_KS:
        t0 = time.perf_counter()
        kmeans(x, k, niter=NITER, seed=seed, gpu=False)
        out[f"dcml_k{k}_s"] = round(time.perf_counter() - t0, 3)
    if with_sklearn:
        from sklearn.cluster import KMeans

        xn = l2_normalize(x)
        t0 = time.perf_counter()
        km = KMeans(n_clusters=SKLEARN_K, init="k-means++", n_init=1, max_iter=NITER, tol=0.0, algorithm="lloyd",
                    random_state=seed).fit(xn)
        out[f"sklearn_k{SKLEARN_K}_s"] = round(time.perf_counter() - t0, 3)
        out[f"sklearn_k{SKLEARN_K}_iterations"] = int(km.n_iter_)
    return out


def growth_exponent(sizes: list[int], times: list[float]) -> float | None:
    """b in time ~ n^b, least squares in log-log."""
    pts = [(n, t) for n, t in zip(sizes, times) if t and t > 0]
    if len(pts) < 2:
        return None
    ln_n, ln_t = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return round(float(np.polyfit(ln_n, ln_t, 1)[0]), 2)


SERIES = [  # (row key, label, style)
    (f"dcml_k{CLUSTER_KS[0]}_s", f"clustering: dcml k={CLUSTER_KS[0]}", "o-"),
    (f"dcml_k{CLUSTER_KS[1]}_s", f"clustering: dcml k={CLUSTER_KS[1]}", "o-"),
    (f"sklearn_k{SKLEARN_K}_s", f"clustering: scikit-learn k={SKLEARN_K}", "x--"),
    ("eval_wall_s", "evaluation: all metrics", "s-"),
    ("eval_knn_s", "evaluation: exact kNN", "s:"),
    ("eval_kmeans_s", "evaluation: k-means for NMI/AMI", "s:"),
]


def plot(rows: list[dict], dest: Path, threads) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sizes = [r["n"] for r in rows]
    for key, label, style in SERIES:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(sizes, values, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vectors (128-d)")
    ax.set_ylabel("seconds (wall)")
    ax.set_title(f"Clustering (100 iterations) and evaluation time vs size, {threads} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, dest)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated sizes (default 10k,25k,50k,100k,200k)")
    parser.add_argument("--quick", action="store_true", help="sizes 10k, 25k, 50k")
    parser.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn's KMeans")
    parser.add_argument("--threads", type=int, default=1, help="faiss/BLAS threads (0 = library default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child-evaluate", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    threads = set_threads(a.threads or None)
    if a.child_evaluate:
        child_evaluate(a.child_evaluate, a.seed)
        return {}

    from bench.common import class_embeddings

    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else list(QUICK_SIZES if a.quick else SIZES)
    out_path = a.out or RESULTS / f"scaling{'_quick' if a.quick else ''}.json"
    report = result_header("scaling: clustering and evaluation time vs size", "bench.bench_scaling", argv)
    report.update(dim=DIM, cluster_ks=list(CLUSTER_KS), sklearn_k=SKLEARN_K, niter=NITER, threads=threads or "default",
                  class_sizes="5-10", rows=[])
    t_start = time.perf_counter()
    for n in sizes:
        log(f"scaling n={n}: clustering ...")
        x, y = class_embeddings(n, DIM, a.seed)
        row = {"n": n, "classes": int(len(np.unique(y)))}
        row.update(time_clustering(x, a.seed, not a.no_sklearn))
        del x, y
        log(f"  {row}; evaluation ...")
        ev = evaluate_in_child(n, a.seed, threads)
        row.update({f"eval_{k}": v for k, v in ev.items() if k in ("wall_s", "cpu_s", "knn_s", "kmeans_s", "nmi_ami_s", "peak_rss_mib", "rss_before_mib", "knn_k")})
        row["eval_metrics"] = {k: ev[k] for k in ("recall@1", "map@r", "nmi")}
        log(f"  evaluation {ev['wall_s']:.1f} s (kNN {ev['knn_s']:.1f} s, k-means {ev['kmeans_s']:.1f} s), "
            f"peak {ev['peak_rss_mib']:.0f} MiB")
        report["rows"].append(row)
        report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        write_result(out_path, report, complete=False)
    rows = report["rows"]
    report["growth_exponent"] = {key: growth_exponent([r["n"] for r in rows], [r.get(key) for r in rows])
                                 for key, _, _ in SERIES}
    png = out_path.with_suffix(".png")
    plot(rows, png, threads or "default")
    report["plot"] = png.name
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    write_result(out_path, report, complete=True)
    log(f"wrote {out_path} in {report['total_wall_s']:.0f} s")
    return report


# ----------------------------------------------------------------- running and report

def commands(quick: bool, threads: int) -> list[list[str]]:
    return [[PY, "-m", "bench.bench_scaling", "--threads", str(threads), *(["--quick"] if quick else [])]]


def elapsed(results: Results) -> list[str]:
    return results.wall_time("scaling")


def report(results: Results) -> list[str]:
    result = results.best("scaling")
    lines = ["## Scaling: clustering and evaluation, 10k to 200k vectors", ""]
    if not result:
        return lines + [f"Not run yet: `{PY} -m bench.bench_scaling`.", ""]
    if result.get("quick"):
        lines += ["**Quick run: up to 50k only.**", ""]
    k1, k2 = result.get("cluster_ks", [8, 64])
    sk = result.get("sklearn_k", 64)
    lines += [f"128-d unit embeddings in classes of {result.get('class_sizes')} images; k-means "
              f"{result.get('niter')} iterations on every point; evaluation = every metric of the set against "
              f"itself (NMI/AMI cluster into as many clusters as classes); {result.get('threads')} thread(s); "
              "evaluation in a fresh process (peak RSS includes ~0.7 GB of imported libraries).", "",
              f"| vectors | classes | k-means k={k1} (s) | k-means k={k2} (s) | scikit-learn k={sk} (s) "
              "| evaluation wall (s) | evaluation CPU (s) | of which kNN (s) | of which k-means (s) | evaluation peak RSS (MiB) | R@1 |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.get("rows", []):
        lines.append(f"| {r['n']:,} | {r['classes']:,} | {num(r.get(f'dcml_k{k1}_s'), 2)} | {num(r.get(f'dcml_k{k2}_s'), 2)} "
                     f"| {num(r.get(f'sklearn_k{sk}_s'), 2)} | {num(r.get('eval_wall_s'), 1)} | {num(r.get('eval_cpu_s'), 1)} "
                     f"| {num(r.get('eval_knn_s'), 1)} "
                     f"| {num(r.get('eval_kmeans_s'), 1)} | {num(r.get('eval_peak_rss_mib'), 0)} "
                     f"| {pct(r.get('eval_metrics', {}).get('recall@1'))} |")
    g = result.get("growth_exponent", {})
    if g:
        lines += ["", "Growth exponent b (time ~ n^b, fitted): " + ", ".join(
            f"{key.replace('_s', '')} {val}" for key, val in g.items() if val is not None) + ". "
            "The k-means stage is linear in n at fixed k; the exact kNN of evaluation is quadratic, and so is "
            "the k-means for NMI because its k (the number of classes) grows with n."]
    lines.append("")
    if result.get("plot"):
        lines += [f"![scaling](bench/results/{result['plot']})", ""]
    lines += [commands_line(result), ""]
    return lines


if __name__ == "__main__":
    main()
