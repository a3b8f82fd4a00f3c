"""The parallel mode's claim, speed, measured as time to quality on Omniglot.

Divide and conquer's parallel mode trains one sub-model per cluster, each on its
own machine, then merges them and fine-tunes the merged model on all data. What
it promises is wall time: does K=4 parallel reach K=1's quality sooner on K
machines than one learner does, and sooner than K=1 trained data-parallel on
the same K machines?

* ``k1``: one learner (bench_dc's Omniglot spec, the e16 budget), validation
  Recall@1 after every epoch;
* ``parallel-w<E>``: K=4 workers of E epochs each (an epoch of a worker is 1/K
  of a K=1 epoch's batches, as in bench_dc), merged, then fine-tuned K=1 on all
  data for ``--finetune-epochs`` epochs with validation after every epoch (the
  merged model's own score is the fine-tuning's epoch 0).

The target is 95 % of K=1's converged validation Recall@1 (the best validation
score of the 30-epoch K=1 run of bench_dc, ``omniglot-k1-e30-s0``). Seconds
are each stage's own compute: the training loops' epoch times (validation and
checkpoints not counted, for every configuration alike), and for the parallel
mode the clustering of the backbone features. Its critical path on K machines
is clustering + the slowest worker + fine-tuning epochs until the target.
K=1 data-parallel on K machines is not measured (this machine has 2 cores): it
is K=1's time divided by K at best (linear speed-up), and bench_scale's
measured 2-process speed-up says what a real all-reduce leaves of that.

    python -m bench.bench_dc_time --budgets 2,4,8,16 --threads 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS, WORK, log, log_to_mlflow, result_header, save_png, set_threads, write_result
from bench.report import PY, Results, num, pct

NAME = "dc_time_omniglot"
K = 4
TARGET_SHARE = 0.95
CONVERGED_SOURCE = RESULTS / "dc" / "omniglot-k1-e30-s0.json"


def _spec(epochs: int) -> dict:
    from bench.bench_dc import DATASETS

    spec = json.loads(json.dumps(DATASETS["omniglot"]))
    spec["epochs"] = epochs
    spec["training"]["eval_every"] = 1
    return spec


def _points(record: dict) -> list[dict]:
    """(epoch, validation R@1, images, training seconds) per epoch of a stage record."""
    return [{"epoch": h["epoch"], "val_recall@1": h.get("val_recall@1"), "images": h.get("images") or 0,
             "seconds": h.get("seconds") or 0.0} for h in record["history"]]


def run_k1(seed: int, epochs: int, work: Path) -> dict:
    from bench.bench_dc import natural_batches, prepared
    from components.train.stage import run as train

    spec = _spec(epochs)
    inputs = prepared("omniglot", spec, seed)
    rec = train(out=str(work / "k1.pt"), clusters=None, num_slices=1, mode="shared", epochs=epochs,
                recluster_every=spec["recluster_every"], batches_per_epoch=natural_batches(inputs["manifest"], spec),
                manifest=str(inputs["manifest"]), activations=None,
                **{**spec["model"], **spec["training"], "seed": seed})
    return {"config": "k1", "epochs": epochs, "train": _points(rec)}


def run_parallel(seed: int, worker_epochs: int, finetune_epochs: int, work: Path) -> dict:
    from bench.bench_dc import natural_batches, prepared
    from components.cluster.stage import run as cluster
    from components.finetune import stage as finetune_stage
    from components.train.stage import run as train

    spec = _spec(worker_epochs)
    inputs = prepared("omniglot", spec, seed)
    batches = natural_batches(inputs["manifest"], spec)
    hyper = {**spec["model"], **spec["training"], "seed": seed}
    common = {"manifest": str(inputs["manifest"]), "activations": None}
    clusters = work / "clusters.parquet"
    clustered = cluster(features=inputs["features"], out=clusters, k=K, seed=seed)
    workers, checkpoints = [], []
    for k in range(K):
        path = work / f"worker{k}.pt"
        rec = train(out=str(path), clusters=clusters, mode="worker", cluster_id=k, epochs=worker_epochs,
                    batches_per_epoch=-(-batches // K), **common, **{**hyper, "eval_every": 0})
        workers.append(_points(rec))
        checkpoints.append(str(path))
    ft = finetune_stage.run(out=str(work / "model.pt"), checkpoints=checkpoints, epochs=finetune_epochs,
                            baseline_candidate=False, batches_per_epoch=batches, **common,
                            **{k: v for k, v in hyper.items() if k in finetune_stage.PARAMS})
    return {"config": f"parallel-w{worker_epochs}", "worker_epochs": worker_epochs,
            "cluster_s": round(clustered["duration_s"], 3), "workers": workers, "finetune": _points(ft)}


# ----------------------------------------------------------------- analysis

def converged() -> float | None:
    """K=1's converged validation R@1: the best validation score of bench_dc's 30-epoch K=1 run."""
    if not CONVERGED_SOURCE.is_file():
        return None
    history = json.loads(CONVERGED_SOURCE.read_text())["history"]
    return max(h["val_recall@1"] for h in history if h.get("val_recall@1") is not None)


def reach(points: list[dict], target: float) -> dict | None:
    """Seconds and images of training until the first epoch whose validation R@1 reaches ``target``."""
    seconds = images = 0.0
    for p in points:
        seconds += p["seconds"]
        images += p["images"]
        if p["val_recall@1"] is not None and p["val_recall@1"] >= target:
            return {"epoch": p["epoch"], "seconds": round(seconds, 1), "images": int(images),
                    "val_recall@1": p["val_recall@1"]}
    return None


def analyse(result: dict) -> dict:
    """Time to the target per configuration (parallel: on K machines, the critical path)."""
    target = result["target"]
    out = {}
    k1 = result["runs"].get("k1")
    if k1:
        out["k1"] = reach(k1["train"], target)
    for name, run in result["runs"].items():
        if name == "k1":
            continue
        slowest = max(sum(p["seconds"] for p in w) for w in run["workers"])
        worker_images = max(sum(p["images"] for p in w) for w in run["workers"])
        tuned = reach(run["finetune"], target)
        merged = run["finetune"][0]["val_recall@1"]
        out[name] = {"merged_val_recall@1": merged, "slowest_worker_s": round(slowest, 1),
                     "cluster_s": run["cluster_s"], "worker_images": worker_images,
                     "reached": tuned is not None,
                     "spent_s": round(run["cluster_s"] + slowest + sum(p["seconds"] for p in run["finetune"]), 1),
                     "finetune_epochs": tuned["epoch"] if tuned else None,
                     "seconds": round(run["cluster_s"] + slowest + tuned["seconds"], 1) if tuned else None,
                     "images": worker_images + tuned["images"] if tuned else None,
                     "best_val_recall@1": max(p["val_recall@1"] for p in run["finetune"]
                                              if p["val_recall@1"] is not None)}
    return out


def data_parallel(result: dict, machines: int = K) -> dict | None:
    """K=1 data-parallel on ``machines``: its time at linear speed-up, and at bench_scale's measured one."""
    k1 = (result.get("analysis") or {}).get("k1")
    if not k1:
        return None
    scale = Results().load("scale") or {}
    small = next((c for c in scale.get("cases", []) if c["case"] == "fashion-mnist"), None)
    two = next((r for r in (small or {}).get("configs", []) if r["processes"] == 2), None)
    return {"machines": machines, "linear_s": round(k1["seconds"] / machines, 1),
            "measured_2proc_speedup": two["speedup"] if two else None}


def plot(result: dict) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    k1 = result["runs"].get("k1")
    if k1:
        t, pts = 0.0, []
        for p in k1["train"]:
            t += p["seconds"]
            if p["val_recall@1"] is not None:
                pts.append((t, p["val_recall@1"]))
        ax.plot(*zip(*pts), marker=".", color="black", label="K=1, one process")
        ax.plot([x / K for x, _ in pts], [y for _, y in pts], ls=":", color="black",
                label=f"K=1 data-parallel on {K} machines (linear speed-up, not measured)")
    parallel = sorted((r for n, r in result["runs"].items() if n != "k1"), key=lambda r: r["worker_epochs"])
    for i, run in enumerate(parallel):
        t = run["cluster_s"] + max(sum(p["seconds"] for p in w) for w in run["workers"])
        pts = []
        for p in run["finetune"]:
            t += p["seconds"]
            if p["val_recall@1"] is not None:
                pts.append((t, p["val_recall@1"]))
        ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}",
                label=f"K={K} parallel, workers {run['worker_epochs']} epochs, then fine-tuning")
    ax.axhline(result["target"], color="green", ls="--", lw=0.8,
               label=f"target: {TARGET_SHARE:.0%} of K=1's converged {result['converged']:.3f}")
    ax.set(xlabel="critical-path seconds (training compute; parallel: clustering + slowest worker + fine-tuning)",
           ylabel="validation Recall@1", title=f"Omniglot: time to quality, K={K} parallel vs one learner")
    ax.set_ylim(top=1.0)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, RESULTS / f"{NAME}.png", dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2,4,8,16", help="worker epochs of the K=4 parallel runs")
    parser.add_argument("--k1-epochs", type=int, default=16)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-mlflow", action="store_true")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    if not budgets or min(budgets) < 1:
        parser.error("--budgets: comma-separated worker epochs, each >= 1")
    best = converged()
    if best is None:
        parser.error(f"{CONVERGED_SOURCE} is missing: run `{PY} -m bench.bench_dc --configs k1 --epochs 30 "
                     "--tag e30` first (K=1's converged validation score)")
    set_threads(args.threads)
    path = RESULTS / f"{NAME}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    runs = previous.get("runs", {}) if previous.get("seed") == args.seed else {}
    header = result_header("dc_time", "bench.bench_dc_time", argv)
    result = {**header, "dataset": "omniglot", "seed": args.seed, "k": K, "converged": best,
              "target": TARGET_SHARE * best, "finetune_epochs": args.finetune_epochs, "runs": runs}
    work = WORK / "dc_time" / f"s{args.seed}"
    todo = [("k1", None)] + [(f"parallel-w{b}", b) for b in budgets]
    for name, budget in todo:
        if name in runs:
            log(f"{name}: stored; skipped")
            continue
        log(f"{name}: training")
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        runs[name] = (run_k1(args.seed, args.k1_epochs, folder) if budget is None
                      else run_parallel(args.seed, budget, args.finetune_epochs, folder))
        result["analysis"] = analyse(result)
        result["data_parallel"] = data_parallel(result)
        write_result(path, result, complete=all(n in runs for n, _ in todo))
        log(f"{name}: {result['analysis'].get(name)}")
    png = plot(result)
    if args.log_mlflow:
        metrics = {f"{n}.seconds_to_target": a["seconds"] for n, a in result["analysis"].items()
                   if a and a.get("seconds") is not None}
        log_to_mlflow("bench-dc", "omniglot time to quality", {"k": K, "target": result["target"], "seed": args.seed},
                      metrics, [p for p in (png, path) if p])


# ----------------------------------------------------------------- report

def commands(quick: bool, threads: int) -> list[list[str]]:
    from bench.bench_dc import SHARED

    if quick or not (SHARED / "omniglot").is_dir() or not CONVERGED_SOURCE.is_file():
        return []
    return [[PY, "-m", "bench.bench_dc_time", "--budgets", "2,4,8,16", "--threads", str(threads), "--log-mlflow"]]


def report(results: Results) -> list[str]:
    lines = [f"## Time to quality: K={K} parallel vs one learner (bench_dc_time)", ""]
    r = results.load(NAME)
    if not r:
        return lines + [f"Not run yet: `{PY} -m bench.bench_dc_time --budgets 2,4,8,16`.", ""]
    a, dp = analyse(r), r.get("data_parallel") or {}
    lines += [f"Omniglot (bench_dc's spec, seed {r['seed']}). Target: {TARGET_SHARE:.0%} of K=1's converged validation "
              f"R@1 ({r['converged']:.3f}, the 30-epoch K=1 run) = **{r['target']:.3f}**. Seconds: training compute of "
              "each stage (epoch loops; validation and checkpoints not counted), one thread, the other core busy "
              "with another benchmark. Parallel rows: the critical path on K machines (clustering + the slowest "
              "worker + fine-tuning epochs until the target; a worker epoch is 1/K of a K=1 epoch's batches).", "",
              "| configuration | merged val R@1 | best val R@1 | reaches target | seconds to target | "
              "images on the critical path |", "|---|---:|---:|:---:|---:|---:|"]
    k1 = a.get("k1")
    if k1:
        lines.append(f"| K=1, one process | — | — | epoch {k1['epoch']} | {num(k1['seconds'], 0)} | "
                     f"{k1['images']:,} |")
    elif "k1" in r["runs"]:
        lines.append(f"| K=1, one process ({r['runs']['k1']['epochs']} epochs) | — | — | no | — | — |")
    if dp and k1:
        lines.append(f"| K=1 data-parallel, {dp['machines']} machines (not measured: K=1 / {dp['machines']}) | — | — | "
                     f"epoch {k1['epoch']} | {num(dp['linear_s'], 0)} (linear speed-up) | "
                     f"{k1['images'] // dp['machines']:,} per machine |")
    for name, row in sorted(((n, v) for n, v in a.items() if n != "k1"),
                            key=lambda item: r["runs"][item[0]]["worker_epochs"]):
        run = r["runs"][name]
        reached = f"fine-tuning epoch {row['finetune_epochs']}" if row["reached"] else "no"
        seconds = num(row["seconds"], 0) if row["seconds"] is not None else f"> {num(row['spent_s'], 0)} (not reached)"
        images = f"{row['images']:,}" if row["images"] is not None else "—"
        lines.append(f"| K={K} parallel, workers {run['worker_epochs']} epochs | {pct(row['merged_val_recall@1'])} | "
                     f"{pct(row['best_val_recall@1'])} | {reached} | {seconds} | {images} |")
    lines += results.image(f"{NAME}.png", "time to quality")
    lines += ["", verdict(r), "", f"Command: `{r.get('command')}`", ""]
    return lines


def verdict(r: dict) -> str:
    a, dp = analyse(r), r.get("data_parallel") or {}
    k1 = a.get("k1")
    reached = [(v["seconds"], n) for n, v in a.items() if n != "k1" and v and v.get("seconds") is not None]
    if "k1" not in r["runs"]:
        return "K=1 not measured yet."
    if not k1:
        return f"K=1 did not reach the target in its {r['runs']['k1']['epochs']} epochs: no time to compare with."
    if not reached:
        longest = max(v["spent_s"] for n, v in a.items() if n != "k1" and v)
        beyond = (f" (the longest critical path, {longest:.0f} s, already exceeds K=1's time)"
                  if longest > k1["seconds"] else "")
        return (f"**No K={K} parallel budget reached the target** within its workers and {r['finetune_epochs']} "
                f"fine-tuning epochs{beyond}; K=1 reaches it in {k1['seconds']:.0f} s on one process "
                f"({dp.get('linear_s', 0):.0f} s data-parallel on {K} machines at linear speed-up). K parallel "
                "workers did not reach K=1's quality sooner than data parallelism would, nor than one process.")
    seconds, name = min(reached)
    line = (f"Fastest K={K} parallel budget: {name} in {seconds:.0f} s on {K} machines, against K=1's "
            f"{k1['seconds']:.0f} s on one process and {dp['linear_s']:.0f} s data-parallel on {K} machines at "
            "linear speed-up")
    speed = dp.get("measured_2proc_speedup")
    if speed:
        line += f" (bench_scale measured {speed:.2f}x for 2 processes of this model on this shared 2-core machine)"
    faster_dp = seconds < dp["linear_s"]
    return line + (". **The parallel mode reaches K=1's quality sooner than data parallelism would.**" if faster_dp
                   else f". **Data parallelism reaches K=1's quality sooner than K={K} parallel workers do**"
                   + (" (the parallel mode still beats one process)." if seconds < k1["seconds"] else "."))


if __name__ == "__main__":
    main()
