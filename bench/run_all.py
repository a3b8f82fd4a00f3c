"""Run the benchmarks and regenerate BENCHMARKS.md from bench/results/*.json.

    python -m bench.run_all                          # everything (`make bench`)
    python -m bench.run_all --only quality,speed     # a subset
    python -m bench.run_all --quick                  # small smoke versions (results *_quick.json)
    python -m bench.run_all --report-only            # only rewrite BENCHMARKS.md

Each benchmark runs as its own process with its log in runs/bench/logs/;
one failing does not stop the others (the report says which failed). The
report reads nothing but the JSON files, so every number in BENCHMARKS.md
comes from a result file, next to the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import REPO, RESULTS, WORK, log, machine_info, versions, write_result

STEPS = ("quality", "speed", "scaling", "eval", "compress", "dfml")
REPORT = REPO / "BENCHMARKS.md"
PY = ".venv/bin/python"


# ---------------------------------------------------------------- running

def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _best(name: str, quick: bool = False) -> dict | None:
    """The full result, else the quick one (or the reverse when quick)."""
    first, second = (f"{name}_quick", name) if quick else (name, f"{name}_quick")
    return _load(first) or _load(second)


def _quality_run(dataset: str, config: str, quick: bool) -> dict | None:
    report = _best(f"quality_{dataset}", quick)
    if not report:
        return None
    return next((r for r in report.get("runs", []) if r["config"] == config and "error" not in r
                 and r.get("model") and Path(r["model"]).exists() and r.get("manifest")), None)


def commands(step: str, quick: bool, threads: int) -> list[list[str]]:
    """The commands of one step (a list: some steps run once per data set)."""
    q = ["--quick"] if quick else []
    t = ["--threads", str(threads)]
    m = "-m"
    if step == "quality":
        return [[PY, m, "bench.bench_quality", "--dataset", d, *t, *q] for d in ("fashion-mnist", "cars196")]
    if step == "speed":
        return [[PY, m, "bench.bench_speed", *t, *q]]
    if step == "scaling":
        return [[PY, m, "bench.bench_scaling", *t, *q]]
    if step == "eval":
        size = ["--n", "20000", "--classes", "3600", "--out", str(RESULTS / "eval_quick.json")] if quick else []
        return [[PY, m, "bench.bench_eval", *t, *size]]
    if step == "compress":
        out = []
        # The best trained model of the quality benchmark (K=1) per data set.
        sweeps = {"fashion-mnist": [], "cars196": ["--bits", "2", "3", "4", "8", "--finetune-bits", "2", "3", "4"]}
        if quick:
            sweeps = {d: ["--bits", "4", "8", "--finetune-steps", "0"] for d in sweeps}
        for dataset, sweep in sweeps.items():
            run = _quality_run(dataset, "k1", quick)
            if run is None:
                log(f"compress {dataset}: no trained K=1 model of quality_{dataset} on disk; run --only quality first")
                continue
            out.append([PY, m, "bench.bench_compress", "--model", run["model"], "--manifest", run["manifest"],
                        "--dataset", dataset + ("_quick" if quick else ""), *sweep])
        return out
    if step == "dfml":
        run = _quality_run("cars196", "k1", quick)
        if run is None:
            log("dfml: no quality_cars196 manifest yet; run --only quality first")
            return []
        epochs = "1" if quick else "4"  # = the quality runs' 3 training + 1 fine-tuning epochs
        return [[PY, m, "bench.bench_dfml", "--manifest", run["manifest"], "--dataset", "cars196" + ("_quick" if quick else ""),
                 "--epochs", epochs, "--baseline", "--threads", str(threads)]]
    raise ValueError(step)


def run_steps(steps: list[str], quick: bool, threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
              "threads": threads, "steps": [], "machine": machine_info(), "versions": versions()}
    t0 = time.perf_counter()
    for step in steps:
        for i, cmd in enumerate(commands(step, quick, threads)):
            log_path = logs / f"{step}{'_' + str(i) if i else ''}{'_quick' if quick else ''}.log"
            shown = f"OMP_NUM_THREADS={threads} " + shlex.join(cmd)
            log(f"{step}: {shown}  (log: {log_path.relative_to(REPO)})")
            s0 = time.perf_counter()
            with open(log_path, "w") as fh:
                rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
            seconds = round(time.perf_counter() - s0, 1)
            log(f"{step}: exit {rc} after {seconds:.0f} s")
            record["steps"].append({"step": step, "command": shown, "wall_s": seconds, "returncode": rc,
                                    "log": str(log_path.relative_to(REPO))})
            record["total_wall_s"] = round(time.perf_counter() - t0, 1)
    record["total_wall_s"] = round(time.perf_counter() - t0, 1)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # Keep the latest timing of every step across partial runs for the report.
    previous = _load("run_all") or {}
    latest = dict(previous.get("latest_by_step", {}))
    for step in {s["step"] for s in record["steps"]}:
        latest[step] = [s for s in record["steps"] if s["step"] == step]
    record["latest_by_step"] = latest
    record["all_steps"] = sorted(set(steps)) == sorted(STEPS)
    if record["all_steps"] and not quick:
        record["last_full_run"] = {"started": record["started"], "total_wall_s": record["total_wall_s"]}
    elif "last_full_run" in previous:
        record["last_full_run"] = previous["last_full_run"]
    write_result("run_all" + ("_quick" if quick else ""), record)
    return record


# ---------------------------------------------------------------- report

def pct(x, std=None, digits=1) -> str:
    if x is None:
        return "—"
    s = f"{100 * x:.{digits}f}"
    if std is not None:
        s += f" ± {100 * std:.{digits}f}"
    return s


def num(x, digits=1, unit="") -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}{unit}"


def _ms(row: dict, key: str):
    v = row.get(key)
    if isinstance(v, dict):
        return v.get("mean"), v.get("std")
    return v, None


def commands_line(result: dict, fallback: str = "", experiment: str | None = None) -> str:
    """'Command: `...`' for a result (earlier runs first, e.g. seeds added later),
    with the MLflow run it was logged as."""
    commands = [c for c in result.get("earlier_commands", []) if c] + [result.get("command") or fallback]
    line = "Command" + ("s" if len(commands) > 1 else "") + ": " + "; then ".join(f"`{c}`" for c in commands)
    if experiment and result.get("mlflow_run_id"):
        line += f"; MLflow run `{result['mlflow_run_id']}` (experiment {experiment})"
    return line


def _step_command(run_all: dict, step: str, contains: str = "") -> str:
    for s in (run_all or {}).get("latest_by_step", {}).get(step, []):
        if contains in s["command"]:
            return s["command"]
    return ""


def section_machine(run_all: dict | None, any_result: dict | None) -> list[str]:
    src = run_all or any_result or {}
    m, v = src.get("machine", {}), src.get("versions", {})
    lines = ["## Machine and versions", ""]
    if not m:
        return lines + ["(no results yet)", ""]
    lines += [
        f"- CPU: {m.get('cpu_model')}, {m.get('cores')} cores ({m.get('cores_usable')} usable), "
        f"RAM {m.get('ram_gib')} GiB, GPU: {m.get('gpu')}",
        f"- Platform: {m.get('platform')}; load average at start {m.get('load_average')} "
        "(the machine was shared with other jobs: absolute times are noisy, ratios measured in one run less so)",
        f"- Threads: OMP_NUM_THREADS={m.get('threads', {}).get('OMP_NUM_THREADS')} (torch "
        f"{m.get('threads', {}).get('torch')}). On this loaded 2-core box one thread was ~3x faster than two "
        "for EfficientNet-Lite0 training, so every benchmark pins one thread.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "dcml_git_commit"),
        f"- dcml commit: `{v.get('dcml_git_commit')}`",
        "",
    ]
    return lines


QUALITY_NOTES = {
    "cars196": (
        "EfficientNet-Lite0 with the offline ImageNet weights, 128 px, margin loss (beta 1.2) with the reference "
        "miner, P=8 classes x M=4 images per batch, Adam (backbone 1e-4, embedding 1e-3), frozen BatchNorm. "
        "Training on the 98 train classes (4,052 images), retrieval among the 98 unseen test classes "
        "(4,092 images; only the official *training* half of Stanford Cars is available here, so the "
        "numbers are not comparable with published Cars196 results)."),
    "fashion-mnist": (
        "Small CNN from scratch (28 px, 64-d embedding), class-disjoint split: train on classes 0-4, retrieve among "
        "the unseen classes 5-9. 'pretrained only' is the randomly initialised network (there are no pretrained "
        "weights for it)."),
}


def section_quality(dataset: str, result: dict | None) -> list[str]:
    title = {"cars196": "Stanford Cars (cars196)", "fashion-mnist": "Fashion-MNIST"}[dataset]
    lines = [f"### {title}", ""]
    if not result:
        return lines + [f"Not run yet: `{PY} -m bench.bench_quality --dataset {dataset}`.", ""]
    summary = result.get("summary", {})
    args = result.get("pipeline_args", {})
    seeds = result.get("seeds", [])
    if result.get("quick"):
        lines += ["**Quick (smoke) run: tiny data and epochs, not a quality figure.**", ""]
    if not result.get("complete"):
        lines += ["**Incomplete: the run was still going or stopped; rows below are what finished.**", ""]
    lines += [QUALITY_NOTES[dataset], ""]
    lines += [f"Equal budget for every trained row: {args.get('epochs')} training epochs + "
              f"{args.get('finetune_epochs')} fine-tuning epoch(s), re-clustering every {args.get('recluster_every')} "
              f"epochs (K=4 shared), seed(s) {', '.join(map(str, seeds))}"
              + ("; mean ± sample standard deviation over the seeds." if len(seeds) > 1 else "; one seed (no spread).")
              , ""]
    lines += ["| configuration | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | wall (s) | training compute (s) | images trained on |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = ["pretrained", "k1", "k4-shared", "k4-parallel"]
    for config in sorted(summary, key=lambda c: order.index(c) if c in order else len(order)):
        row = summary[config]
        cells = [row["label"]]
        for key in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r"):
            cells.append(pct(*_ms(row, key)))
        wall, wall_std = _ms(row, "wall_s")
        cells.append(num(wall, 0) + (f" ± {wall_std:.0f}" if wall_std else ""))
        train, _ = _ms(row, "train_s")
        cells.append(num(train, 0) if config != "pretrained" else "0")
        images = images_trained(result, config)
        cells.append(f"{images:,.0f}" if images is not None else "0")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    pre = summary.get("pretrained")
    if pre:
        run = next((r for r in result["runs"] if r["config"] == "pretrained" and "error" not in r), {})
        lines += [f"'pretrained only' row: {run.get('what', '')}. The untrained K=1 model scores R@1 "
                  f"{pct(*_ms(pre, 'random_head_recall@1'))}, MAP@R {pct(*_ms(pre, 'random_head_map@r'))}.", ""]
    lines += ["Wall time is the pipeline's end-to-end time in `kfp.local`; stages shared with an earlier row "
              "(ingest, extract) come from the cache, so the first trained row pays for them. "
              "Training compute = the train + fine-tune stages' own seconds. Images trained on = images in all "
              "training batches (every epoch, train + fine-tune stages): equal epochs are not equal images, "
              "because the sampler's epoch is one pass over each cluster in P-class batches.", ""]
    lines += verdict(dataset, summary, result)
    failed = [r for r in result.get("runs", []) if "error" in r]
    for r in failed:
        lines.append(f"- FAILED: {r['config']} seed {r['seed']}: {r['error']}")
    if failed:
        lines.append("")
    if result.get("plot"):
        lines += [f"![{dataset} quality](bench/results/{result['plot']})", ""]
    lines += [commands_line(result), ""]
    return lines


def images_trained(result: dict, config: str) -> float | None:
    """Mean over seeds of the images the training stages stepped on (all epochs, train + fine-tune)."""
    totals = []
    for run in result.get("runs", []):
        if run["config"] == config and "error" not in run and run.get("history"):
            totals.append(sum(e.get("images", 0) for stage in run["history"] for e in stage["history"]))
    return sum(totals) / len(totals) if totals else None


def images_by_phase(result: dict, config: str) -> tuple[float, float] | None:
    """(images in the K-learner phase, images in fine-tuning) of the first seed's run."""
    run = next((r for r in result.get("runs", []) if r["config"] == config and r.get("history")), None)
    if run is None:
        return None
    train = sum(e.get("images", 0) for s in run["history"] for e in s["history"] if e.get("phase") != "finetune")
    tune = sum(e.get("images", 0) for s in run["history"] for e in s["history"] if e.get("phase") == "finetune")
    return train, tune


def verdict(dataset: str, summary: dict, result: dict) -> list[str]:
    """The comparison the acceptance criteria ask about, in words, from the numbers."""
    def r1(config):
        return _ms(summary[config], "recall@1")[0] if config in summary else None

    k1, shared, parallel, pre = r1("k1"), r1("k4-shared"), r1("k4-parallel"), r1("pretrained")
    out = []
    if k1 is None:
        return out
    for name, value in (("K=4 shared", shared), ("K=4 parallel", parallel)):
        if value is not None:
            out.append(f"- {name} vs K=1: {100 * (value - k1):+.1f} R@1 points.")
    if pre is not None:
        trained = {"K=1": k1, "K=4 shared": shared, "K=4 parallel": parallel}
        out.append("- Trained vs pretrained-only: " + ", ".join(
            f"{name} {100 * (v - pre):+.1f}" for name, v in trained.items() if v is not None) + " R@1 points.")
    if None not in (k1, shared, parallel, pre):
        met = shared > k1 and parallel > k1 and min(k1, shared, parallel) - pre >= 0.05
        out.append(f"- Goal (K=4 above K=1 on R@1, every trained row far above pretrained-only): "
                   f"**{'met' if met else 'not met'}** in this run.")
    per_seed = {}
    for run in result.get("runs", []):
        if "error" not in run and run.get("metrics"):
            per_seed.setdefault(run["config"], {})[run["seed"]] = run["metrics"]["recall@1"]
    seeds = sorted(per_seed.get("k1", {}))
    if len(seeds) > 1:
        out.append("- R@1 per seed (" + ", ".join(map(str, seeds)) + "): " + "; ".join(
            f"{summary[c]['label']} " + " / ".join(pct(per_seed[c].get(s)) for s in seeds)
            for c in ("pretrained", "k1", "k4-shared", "k4-parallel") if c in per_seed) + ".")
        for config in ("k4-shared", "k4-parallel"):
            paired = [s for s in seeds if s in per_seed.get(config, {})]
            if paired:
                wins = sum(per_seed[config][s] > per_seed["k1"][s] for s in paired)
                out.append(f"- {summary[config]['label']} beats K=1 in {wins} of {len(paired)} seeds (same seed = "
                           "same initial head and data order).")
    spread = [_ms(summary[c], "recall@1")[1] for c in summary if _ms(summary[c], "recall@1")[1]]
    if spread:
        out.append(f"- Seed spread (std of R@1) is up to {100 * max(spread):.1f} points: "
                   "differences smaller than that are noise.")
    notes = ANALYSIS.get(dataset)
    if notes:
        text = notes(summary, result)
        if text:
            out += ["", text]
    return out + [""] if out else out


def _history(result: dict, config: str) -> list[dict]:
    run = next((r for r in result.get("runs", []) if r["config"] == config and r.get("history")), None)
    return run["history"] if run else []


def _last_k_phase_loss(result: dict, config: str) -> float | None:
    """Mean loss of the last epoch before fine-tuning (over workers in parallel mode)."""
    losses = [stage["history"][-1]["loss"] for stage in _history(result, config)
              if stage["history"] and stage["history"][-1].get("phase") != "finetune"]
    return sum(losses) / len(losses) if losses else None


def _first_cluster_sizes(result: dict, config: str) -> list[int] | None:
    for stage in _history(result, config):
        for epoch in stage["history"]:
            if epoch.get("cluster_sizes") and len(epoch["cluster_sizes"]) > 1:
                return epoch["cluster_sizes"]
    return None


def _cars_analysis(summary: dict, result: dict) -> str:
    def r1(config):
        return _ms(summary.get(config, {}), "recall@1")[0]

    k1, shared, parallel, pre = r1("k1"), r1("k4-shared"), r1("k4-parallel"), r1("pretrained")
    if None in (k1, shared, parallel):
        return ""
    args = result.get("pipeline_args", {})
    epochs, tune = args.get("epochs"), args.get("finetune_epochs")
    lines = ["Why we think it comes out this way:", ""]
    if pre is not None and "pretrained" in summary:
        head = _ms(summary["pretrained"], "random_head_recall@1")[0]
        lines.append(
            f"- The training budget is tiny: {epochs} + {tune} epochs, where the reference code trains 200 "
            f"(fine-tuning from epoch 190). In that budget the 128-d embedding only just gets past the "
            f"1280-d pretrained features ({pct(pre)} R@1): K=1 starts from its random head's {pct(head)} and "
            f"ends at {pct(k1)}. Every trained row is therefore close to pretrained-only, not far above it.")
    loss1, loss4 = _last_k_phase_loss(result, "k1"), _last_k_phase_loss(result, "k4-shared")
    sizes = _first_cluster_sizes(result, "k4-shared")
    if shared < k1:
        text = ("- K=4 shared trails K=1: each learner's 32-d slice gets only its cluster's batches (a quarter "
                "of the steps) and has not converged when the single fine-tuning epoch merges the four slices "
                "into one embedding.")
        if loss1 is not None and loss4 is not None:
            text += (" The clusters do make the task harder, as intended: the margin loss at the last "
                     f"K-learner epoch is {loss4:.3f} within clusters vs {loss1:.3f} for K=1.")
        if sizes:
            text += (f" The first clustering is unbalanced ({', '.join(map(str, sizes))} images); the sampler "
                     "interleaves clusters with an equal number of batches each, so the smallest cluster's "
                     "images are repeated several times per epoch while K=4 steps on more images in total "
                     f"({images_trained(result, 'k4-shared'):,.0f} vs {images_trained(result, 'k1'):,.0f}) and still "
                     "scores lower.")
        lines.append(text)
    if parallel < k1:
        lines.append("- K=4 parallel trails too: the four workers train their own copies of the backbone on a "
                     "quarter of the data each, and the merge averages those copies; the averaged backbone fits "
                     "none of the four slices well, and one fine-tuning epoch does not repair that.")
    lines.append("- What would settle it: tens of epochs per configuration, which this 2-core CPU cannot do "
                 "in a `make bench` (one cars196 epoch is 2-5 minutes here); on a GPU, "
                 "`python -m bench.bench_quality --dataset cars196 --set epochs=40 --set finetune_epochs=4 "
                 "--seeds 0,1,2` is the same benchmark at a meaningful budget.")
    return "\n".join(lines)


def _fashion_analysis(summary: dict, result: dict) -> str:
    pre = _ms(summary.get("pretrained", {}), "recall@1")[0]
    k1 = _ms(summary.get("k1", {}), "recall@1")[0]
    map_pre = _ms(summary.get("pretrained", {}), "map@r")[0]
    map_k1 = _ms(summary.get("k1", {}), "map@r")[0]
    if None in (pre, k1):
        return ""
    lines = ["Why we think it comes out this way:", "",
             f"- The five test classes (sandal, shirt, sneaker, bag, ankle boot) are already well apart for a "
             f"randomly initialised CNN ({pct(pre)} R@1), so R@1 has little room; MAP@R, which scores the whole "
             f"ranking, shows what training does ({pct(map_pre)} → {pct(map_k1)} for K=1)."]
    i1, i4 = images_trained(result, "k1"), images_trained(result, "k4-shared")
    if i1 and i4:
        lines.append(f"- Training sees only 5 classes, so K=4 clusters are nearly class-pure and split those 5 classes "
                     f"between learners: a P=4-class batch can rarely be filled inside one cluster, and the K=4 runs "
                     f"step on fewer images ({i4:,.0f} vs {i1:,.0f} for K=1 at equal epochs). Divide and conquer "
                     "needs many training classes per cluster; this data set has too few to show it, and the "
                     "trained rows differ by about the seed spread.")
    return "\n".join(lines)


ANALYSIS = {"cars196": _cars_analysis, "fashion-mnist": _fashion_analysis}


def section_speed(speed: dict | None, eval_result: dict | None, run_all: dict | None) -> list[str]:
    lines = ["## Speed against the alternatives", ""]
    if not speed:
        lines += [f"Not run yet: `{PY} -m bench.bench_speed`.", ""]
    else:
        if speed.get("quick"):
            lines += ["**Quick (smoke) run: small inputs.**", ""]
        goals = speed.get("goals", {})
        commands = {part: speed[part]["command"] for part in ("clustering", "training", "extraction", "pipeline")
                    if isinstance(speed.get(part), dict) and speed[part].get("command")}
        lines += [f"Threads: {speed.get('threads')} for both sides of every ratio. Commands: "
                  + ("; ".join(f"{part}: `{cmd}`" for part, cmd in commands.items()) or f"`{speed.get('command')}`"), ""]
        lines += ["| figure | dcml | alternative | ratio | goal | met |", "|---|---:|---:|---:|---:|:---:|"]
        cl = speed.get("clustering", {})
        for case in cl.get("cases", []):
            met = "yes" if case["inertia_within_1pct"] else "NO"
            if not case.get("checked", True):
                met = "(not held)"
            lines.append(
                f"| k-means: {case['case']} ({case['n']:,} x {case['dim']}, k={case['k']}, {case['niter']} it.) "
                f"| {case['dcml_s']:.2f} s | scikit-learn {case['sklearn_s']:.2f} s ({case['sklearn_iterations']} it.) "
                f"| {case['speedup']:.2f}x faster; inertia {100 * case['inertia_rel_diff']:+.2f}% "
                f"| inertia ≤ +1% | {met} |")
        if eval_result and eval_result.get("summary"):
            s = eval_result["summary"]
            lines.append(
                f"| evaluation vs PML AccuracyCalculator ({eval_result['data']['n']:,} x {eval_result['data']['dim']}, "
                f"all metrics; bench_eval) | {eval_result['runs']['all']['dcml']['wall_s']:.1f} s, "
                f"{s['dcml_peak_rss_gib']:.2f} GiB | {eval_result['runs']['all']['pml']['wall_s']:.1f} s, "
                f"{s['pml_peak_rss_gib']:.2f} GiB | {s['speedup_wall']:.2f}x wall, {s['speedup_cpu']:.2f}x CPU; "
                f"values identical: {'yes' if s['identical_to_1e-6'] else 'NO'} "
                f"| {eval_result.get('goal', {}).get('speedup_at_least', '—')}x | "
                f"{'yes' if s.get('meets_speed_goal_wall') else 'NO'} |")
        for dataset, tr in (speed.get("training") or {}).items():
            if "variants" not in tr:
                continue
            for v in tr["variants"]:
                ok = v["ratio"] >= goals.get("training_ratio_min", 0.9)
                lines.append(f"| training images/s, {dataset} ({tr['model']['backbone']}), DataLoader workers={v['num_workers']} "
                             f"| {v['real_images_per_s']:.1f} (real data) | {v['synthetic_images_per_s']:.1f} (synthetic tensors) "
                             f"| {v['ratio']:.2f} | ≥ {goals.get('training_ratio_min', 0.9)} | {'yes' if ok else 'NO'} |")
        for dataset, ex in (speed.get("extraction") or {}).items():
            if "ratio" not in ex:
                continue
            lines.append(f"| feature extraction images/s, {dataset} ({ex['model']['backbone']}) "
                         f"| {ex['real_images_per_s']:.1f} (real data) | {ex['synthetic_images_per_s']:.1f} (synthetic) "
                         f"| {ex['ratio']:.2f}" + (f" (1 DataLoader worker: {ex['ratio_1_worker']:.2f})" if "ratio_1_worker" in ex else "")
                         + " | none set | — |")
        for name, p in (speed.get("pipeline") or {}).items():
            if not isinstance(p, dict) or "cached_rerun_ratio" not in p:
                continue
            label = {"demo": "demo preset", "cars196_k1": "cars196 K=1 (bench_quality's run)"}.get(name, name)
            lines.append(f"| pipeline cached re-run / first run, {label} | {p['cached_rerun']['wall_s']:.1f} s "
                         f"| first run {p['first_run']['wall_s']:.1f} s | {p['cached_rerun_ratio']:.3f} "
                         f"| ≤ {goals.get('cached_rerun_ratio_max')} | {'yes' if p['meets_cached_goal'] else 'NO'} |")
            lines.append(f"| pipeline orchestration overhead, {label} | {p['orchestration_s']:.1f} s "
                         f"({p['orchestration_s_per_stage']:.1f} s per stage) | stage compute "
                         f"{p['first_run']['compute_s_executed']:.1f} s | {100 * p['orchestration_overhead']:.1f}% "
                         f"| ≤ {100 * goals.get('orchestration_overhead_max', 0.1):.0f}% "
                         f"| {'yes' if p['meets_overhead_goal'] else 'NO'} |")
        lines.append("")
        for part in ("clustering", "training", "extraction", "pipeline"):
            if isinstance(speed.get(part), dict) and "error" in speed[part]:
                lines.append(f"- FAILED: {part}: {speed[part]['error']}")
        lines += speed_notes(speed, eval_result)
    if eval_result:
        lines += [f"Evaluation figure: `{eval_result.get('command') or _step_command(run_all, 'eval')}` "
                  "(bench/results/eval.json: both implementations in fresh processes, values compared to 1e-6).", ""]
    return lines


def speed_notes(speed: dict, eval_result: dict | None) -> list[str]:
    """What the numbers mean, and why a goal is missed."""
    out = ["How to read it:", ""]
    cl = speed.get("clustering", {})
    if cl.get("cases"):
        out.append("- k-means: both sides get the same L2-normalised rows, k, 100-iteration cap and thread count. "
                   "faiss always runs all 100 iterations; scikit-learn stops when no label changes (its "
                   "iteration count is shown), so the ratio is per stage call, not per iteration. "
                   "Lower inertia is better; dcml must not be more than 1% worse. The well-separated-blobs case "
                   "is a stress case for faiss's random initialisation (k-means++ places one seed per blob), "
                   "reported but not held to the check; the cluster stage's `nredo` is the knob for it.")
    tr = speed.get("training") or {}
    misses = [d for d, t in tr.items() if isinstance(t, dict) and t.get("ratio") is not None and not t.get("meets_goal")]
    if tr:
        out.append("- Training: real = `dcml.algorithm.training.Trainer` for one epoch over a class subset (manifest -> decode "
                   "-> augmentation -> batch -> step); synthetic = the same trainer's model, loss, miner and "
                   "optimiser stepping over ready random tensors with the same label batches. Real and synthetic "
                   "passes alternate; the ratio is the median of the pairs.")
    if misses:
        out.append(f"- Training data-path goal (≥ 0.9) missed for {', '.join(misses)} with the pipeline's default "
                   "`num_workers=0`: decoding and augmenting run in the training process, between steps, so they "
                   "add to the step time instead of overlapping it. With one DataLoader worker the loading "
                   "overlaps the step (see the workers=1 rows), but on a 2-core machine shared with other jobs "
                   "the worker competes with the training thread for CPU. The small CNN's step is so cheap "
                   "that PNG decoding alone is a large part of it.")
    pipe = speed.get("pipeline") or {}
    if pipe:
        out.append("- Pipeline: orchestration = wall time of a cold run minus the sum of `duration_s` of every "
                   "stage record in the final metrics' lineage (the stages' own compute, measured inside "
                   "them). It includes, per stage, starting a Python process and importing torch, faiss and "
                   "kfp (several seconds each on this loaded box), kfp.local's bookkeeping, and the never-cached "
                   "MLflow tracking step (it logs the model, plots and the run tree). A fixed few seconds per "
                   "stage is a large share of a small demo run and a small share of a real one; the cached "
                   "re-run still runs the MLflow step, which sets its floor.")
        floor = pipe.get("process_start_and_imports_s")
        if floor:
            out.append(f"- Measured floor: a fresh Python process that imports what a stage imports "
                       f"(`{pipe.get('imports')}`) takes {floor:.1f} s here, before the stage's timer starts.")
    return out + [""]


def section_scaling(result: dict | None) -> list[str]:
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


def section_eval(result: dict | None, run_all: dict | None) -> list[str]:
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
    lines += ["", commands_line(result, _step_command(run_all, "eval")), ""]
    return lines


def _per_dataset(pattern: str, skip: str | None = None) -> list[tuple[str, dict]]:
    """(dataset, result) of every bench/results file matching ``pattern`` (one file per data set)."""
    out = []
    for path in sorted(RESULTS.glob(pattern)):
        if skip and path.name.startswith(skip):
            continue
        result = json.loads(path.read_text())
        out.append((result.get("dataset", path.stem), result))
    return out


def _dataset_heading(dataset: str, result: dict) -> list[str]:
    return [f"### {dataset}", ""] + ([] if result.get("complete") else ["**Incomplete run.**", ""])


def section_compress(run_all: dict | None) -> list[str]:
    lines = ["## Compression (bench_compress)", "",
             "One section per `bench_compress` run; its Settings line says which corrections around the "
             "clustering were on and what fine-tuning did.", ""]
    # Each data set's main run first, then its variants (cars196, cars196-ft300, cars196-plain, ...).
    found = sorted(_per_dataset("compress_*.json", skip="compress_sensitivity"),
                   key=lambda item: (item[0].partition("-")[0], len(item[0]), item[0]))
    if not found:
        return lines + ["Not run yet (needs a trained model of the quality benchmark): "
                        f"`{PY} -m bench.run_all --only compress`.", ""]
    for dataset, r in found:
        f = r.get("float", {})
        lines += _dataset_heading(dataset, r)
        lines += [f"Model: {r.get('model_config', {}).get('backbone')} (the quality benchmark's K=1 model, seed 0); "
                  f"float32 {f.get('size_bytes', 0) / 2**20:.2f} MiB, R@1 {pct(f.get('recall@1'))}, MAP@R {pct(f.get('map@r'))}.", "",
                  compress_settings(r), "",
                  "| method | bits | centroid fine-tuning steps | size (MiB) | compression | R@1 | MAP@R |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in r.get("runs", []):
            lines.append(f"| {row['method']} | {row['bits']} | {row.get('finetune_steps', 0)} | {row['size_bytes'] / 2**20:.2f} "
                         f"| {row['compression_ratio']:.1f}x | {pct(row['recall@1'])} | {pct(row['map@r'])} |")
        lines += [""] + compress_verdict(r)
        sens = _load(f"compress_sensitivity_{dataset}")
        if sens:
            variants = (("mean_cosine_to_float", "plain"), ("mean_cosine_equalized", "equalised"),
                        ("mean_cosine_equalized_bias_corrected", "equalised + bias correction"))
            variants = [v for v in variants if all(v[0] in g for g in sens["groups"])]
            lines += ["", f"Which layers move the embeddings (`{sens['command']}`): mean cosine between the float "
                      f"model's embeddings and those with only some layers at {sens['bits']} bits ({sens['method']}, "
                      f"{sens['images']} test images, no fine-tuning; 1 = unchanged).", "",
                      "| layers quantised | count | " + " | ".join(label for _, label in variants) + " |",
                      "|---|---:|" + "---:|" * len(variants)]
            for g in sens["groups"]:
                lines.append(f"| {g['quantized']} | {g['layers']} | "
                             + " | ".join(f"{g[key]:.2f}" for key, _ in variants) + " |")
            lines += ["", "Depthwise convolutions are the most sensitive on plain weights: their channels' weight "
                      "ranges differ by orders of magnitude, so one 2^B-value codebook per layer rounds the small "
                      "channels to one value, and the BatchNorm that follows divides by their small running std. "
                      "Channel equalisation (the scale moves into the BatchNorm) removes most of that; bias "
                      "correction removes the mean shift rounding leaves in every layer."]
        png = RESULTS / f"compress_{dataset}.png"
        if png.exists():
            lines += ["", f"![compression {dataset}](bench/results/{png.name})"]
        fallback = (_step_command(run_all, "compress", "--dataset " + dataset)
                    or f"python -m bench.bench_compress --model ... --dataset {dataset}")
        lines += ["", commands_line(r, fallback, "bench-compress"), ""]
    return lines


def compress_settings(r: dict) -> str:
    """One line: which of the preprocessing / fine-tuning options this run used."""
    st = r.get("settings", {})
    if "no_equalize" not in st:  # results from before these options existed
        return ("Settings: no channel equalisation, no bias correction; fine-tuning of the centroids only on the "
                f"metric loss ({st.get('loss')}), Adam lr {st.get('finetune_lr')}.")
    eq = "off" if st["no_equalize"] else f"on ({r.get('equalized_layers')} convs)"
    bc = "off" if st["no_bias_correction"] else f"on ({st.get('calibration_images')} train images)"
    what = "centroids only" if st.get("centroids_only") else "centroids + biases and BatchNorm gamma/beta"
    loss = "distillation to the float model's embeddings" if st.get("finetune_loss") == "distill" \
        else f"the metric loss ({st.get('loss')})"
    bits = st.get("finetune_bits") or r.get("bits")
    return (f"Settings: channel equalisation {eq}; BatchNorm bias correction {bc}; fine-tuning ({', '.join(map(str, bits))} "
            f"bits) trains the {what} on {loss}, {st.get('classes_per_batch')}×{st.get('images_per_class')}-image "
            f"batches, Adam lr {st.get('finetune_lr')}.")


def compress_verdict(r: dict) -> list[str]:
    """The issue's two goals, read off the rows: 4-bit loss-aware within 1 R@1 point
    of float; at 2-3 bits loss-aware above plain k-means."""
    rows = {(x["method"], x["bits"], x.get("finetune_steps", 0)): x for x in r.get("runs", [])}
    base = r.get("float", {}).get("recall@1")
    out = []
    queries = r.get("eval", {}).get("queries")
    se = None
    if queries and base is not None:
        se = 100 * (base * (1 - base) / queries) ** 0.5
        out.append(f"- Noise floor: R@1 is a mean over {queries:,} test queries, so its standard error is "
                   f"≈ {se:.1f} points (binomial); differences under ~{2 * se:.1f} points are not evidence.")
    for ft in sorted({k[2] for k in rows if k[:2] == ("loss-aware", 4)}):
        four = rows[("loss-aware", 4, ft)]
        if base is not None:
            gap = 100 * (base - four["recall@1"])
            label = "4 bits, loss-aware" + (f" + {ft} fine-tuning steps" if ft else "")
            out.append(f"- {label}: R@1 {pct(four['recall@1'])} vs float {pct(base)} "
                       f"({gap:.1f} points lost; goal ≤ 1): **{'met' if gap <= 1 else 'missed'}**.")
    for bits in (2, 3):
        for ft in sorted({k[2] for k in rows if k[1] == bits}):
            ours, theirs = rows.get(("loss-aware", bits, ft)), rows.get(("kmeans", bits, ft))
            if not (ours and theirs):
                continue
            d_r1 = round(100 * (ours["recall@1"] - theirs["recall@1"]), 1) + 0.0  # no "-0.0"
            d_map = round(100 * (ours["map@r"] - theirs["map@r"]), 1) + 0.0
            label = f"{bits} bits{' + centroid fine-tuning' if ft else ''}"
            if se is not None and abs(d_r1) < 2 * se:
                verdict = "no difference beyond noise"
            else:
                verdict = "better" if d_r1 > 0 and d_map > 0 else "worse" if d_r1 < 0 and d_map < 0 else "mixed"
            out.append(f"- {label}: loss-aware vs plain k-means R@1 {d_r1:+.1f}, MAP@R {d_map:+.1f} points: "
                       f"**{verdict}**.")
    return out


def section_dfml(run_all: dict | None) -> list[str]:
    lines = ["## DFML (bench_dfml)", ""]
    found = _per_dataset("dfml_*.json")
    if not found:
        return lines + ["Not run yet (needs the quality benchmark's cars196 manifest): "
                        f"`{PY} -m bench.run_all --only dfml`.", ""]
    for dataset, r in found:
        lines += _dataset_heading(dataset, r)
        keys = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")
        lines += ["| model | loss | epochs | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | training (s) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, label in (("dfml", "DFML (factorised backbone + router, G sub-blocks)"),
                            ("baseline", "same backbone, loss and batches, no DFML (K=1)")):
            if name in r:
                m, params = r[name]["metrics"], r[name].get("params", {})
                lines.append(f"| {label} | {params.get('loss')} | {params.get('epochs')} | "
                             + " | ".join(pct(m.get(k)) for k in keys) + f" | {num(r[name].get('train_seconds'), 0)} |")
        # Divide and conquer at the same number of epochs: the quality benchmark's rows.
        quality = _load(f"quality_{dataset}")
        if quality and quality.get("summary"):
            args = quality.get("pipeline_args", {})
            epochs = f"{args.get('epochs')}+{args.get('finetune_epochs')}"
            n_seeds = len(quality.get("seeds", []))
            for config in ("pretrained", "k1", "k4-shared", "k4-parallel"):
                row = quality["summary"].get(config)
                if not row:
                    continue
                train = _ms(row, "train_s")[0] if config != "pretrained" else 0
                lines.append(f"| quality benchmark: {row['label']} ({n_seeds} seed{'s' if n_seeds > 1 else ''}) | "
                             f"{args.get('loss') if config != 'pretrained' else '—'} | "
                             f"{epochs if config != 'pretrained' else 0} | "
                             + " | ".join(pct(_ms(row, k)[0]) for k in keys) + f" | {num(train, 0)} |")
        lines += [""] + dfml_verdict(r)
        d = r.get("dfml", {})
        if d:
            params = d.get("params", {})
            lines += ["", f"Loss {params.get('loss')}, {params.get('epochs')} epochs, G={params.get('groups')}; routed R@1 "
                      f"{pct(d.get('routed_recall@1'))}, routing entropy {num(d.get('routing_entropy'), 3)}, "
                      f"collapsed units {d.get('collapsed_units')}."]
        png = RESULTS / f"dfml_{dataset}_routing.png"
        if png.exists():
            lines += ["", f"![dfml {dataset}](bench/results/{png.name})"]
        fallback = _step_command(run_all, "dfml") or f"python -m bench.bench_dfml --manifest ... --dataset {dataset}"
        lines += ["", commands_line(r, fallback, "bench-dfml"), ""]
    return lines


def dfml_verdict(r: dict) -> list[str]:
    """DFML against its own baseline (same loss, batches and epochs), in words from the numbers."""
    d, b = r.get("dfml"), r.get("baseline")
    if not (d and b):
        return []
    dm, bm = d["metrics"], b["metrics"]
    out = [f"- DFML vs the same model trained without factorisation: R@1 {100 * (dm['recall@1'] - bm['recall@1']):+.1f}, "
           f"MAP@R {100 * (dm['map@r'] - bm['map@r']):+.1f} points; training took "
           f"{d['train_seconds'] / b['train_seconds']:.2f}x as long (a full and a routed pass per batch)."]
    curve = [(h["epoch"], h["recall@1"]) for h in d.get("history", []) if "recall@1" in h]
    base_curve = [(h["epoch"], h["recall@1"]) for h in b.get("history", []) if "recall@1" in h]
    if curve and base_curve:
        out.append("- R@1 per epoch, DFML: " + ", ".join(pct(v) for _, v in curve)
                   + "; baseline: " + ", ".join(pct(v) for _, v in base_curve) + ".")
    routed = d.get("routed_recall@1")
    if routed is not None:
        out.append(f"- The routed network alone (one sub-block per block, as the router picks) retrieves at R@1 "
                   f"{pct(routed)}: it is trained only through the 0.5-weighted routed and distillation terms and, "
                   f"after {d['params'].get('epochs')} epochs, is not a usable embedding by itself. Inference uses the "
                   f"full (merged) network, as DFML prescribes.")
    if d.get("routing_entropy") is not None:
        out.append(f"- Routing spread: mean normalised entropy {d['routing_entropy']:.2f} (1 = even over the "
                   f"{d['params'].get('groups')} sub-blocks, 0 = one sub-block takes everything); "
                   f"{d.get('collapsed_units', 0)} block(s) send every sample to one sub-block (see the plot).")
    if dm["recall@1"] < bm["recall@1"]:
        out.append("- Why we think DFML trails here: the published method trains for many tens of epochs; in "
                   f"{d['params'].get('epochs')} the "
                   "routed and distillation terms pull the shared weights towards sub-networks that are still poor "
                   "(the routed R@1 above), which costs the full network's own loss progress.")
    return out


def section_timing(run_all: dict | None) -> list[str]:
    lines = ["## How long `make bench` takes", ""]
    if not run_all:
        parts = []
        for name in ("quality_fashion-mnist", "quality_cars196", "scaling", "compress_fashion-mnist", "compress_cars196"):
            r = _load(name)
            seconds = r and (r.get("total_wall_s") or r.get("total_s"))
            if seconds:
                parts.append(f"{name} {seconds / 60:.0f} min" + (" (its last run only)" if r.get("earlier_commands") else ""))
        dfml = _load("dfml_cars196")
        if dfml and dfml.get("dfml"):
            minutes = (dfml["dfml"].get("wall_seconds", 0) + dfml.get("baseline", {}).get("wall_seconds", 0)) / 60
            parts.append(f"dfml_cars196 {minutes:.0f} min")
        return lines + ["Not run as one command yet; the separate runs behind the figures above took "
                        + ", ".join(parts) + " (wall time, often 2-3 jobs sharing the 2 cores).", ""]
    full = run_all.get("last_full_run")
    if full:
        lines += [f"Last full run (`make bench`, started {full['started']}): **{full['total_wall_s'] / 60:.0f} min** "
                  "wall time on this machine.", ""]
    lines += ["| step | command | wall (min) | exit |", "|---|---|---:|:---:|"]
    for step in STEPS:
        for s in run_all.get("latest_by_step", {}).get(step, []):
            lines.append(f"| {step} | `{s['command']}` | {s['wall_s'] / 60:.1f} | {s['returncode']} |")
    return lines + [""]


def write_report(quick: bool = False) -> Path:
    run_all = _load("run_all_quick" if quick else "run_all") or _load("run_all")
    quality = {d: _best(f"quality_{d}", quick) for d in ("cars196", "fashion-mnist")}
    speed = _best("speed", quick)
    scaling = _best("scaling", quick)
    eval_result = _best("eval", quick)
    any_result = next((r for r in (*quality.values(), speed, scaling) if r), None)
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench.run_all --report-only` from bench/results/*.json; do not edit by hand. -->",
        "",
        f"Regenerate everything with `make bench` (= `{PY} -m bench.run_all`; `--only quality,speed,...` for a "
        "subset, `--quick` for a smoke run, `--report-only` to rewrite this file). Every figure below comes "
        "from a JSON file in [bench/results](bench/results) that also records the machine, the versions and "
        "the exact command; pipeline outputs and logs go to `runs/bench/`.",
        "",
        f"Report generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
    ]
    lines += section_machine(run_all, any_result)
    lines += ["## Retrieval quality: divide and conquer vs baselines", "",
              "Each trained row is one run of the whole local pipeline (`dcml run`: ingest → extract → cluster → "
              "train → fine-tune → evaluate → MLflow) at the same epochs and seed; metrics on the test classes, "
              "which training never sees. R@K, NMI and MAP@R in %.", ""]
    lines += section_quality("cars196", quality["cars196"])
    lines += section_quality("fashion-mnist", quality["fashion-mnist"])
    lines += section_speed(speed, eval_result, run_all)
    lines += section_scaling(scaling)
    lines += section_eval(eval_result, run_all)
    lines += section_compress(run_all)
    lines += section_dfml(run_all)
    lines += section_timing(run_all)
    text = "\n".join(lines).rstrip() + "\n"
    from dcml.contracts.io import atomic_path

    with atomic_path(REPORT) as tmp:
        tmp.write_text(text)
    return REPORT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--quick", action="store_true", help="small smoke versions (results in *_quick.json)")
    parser.add_argument("--report-only", action="store_true", help="only regenerate BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / torch threads for every benchmark")
    a = parser.parse_args(argv)
    steps = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--only: unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    failed = []
    if not a.report_only:
        record = run_steps([s for s in STEPS if s in steps], a.quick, a.threads)
        failed = [s for s in record["steps"] if s["returncode"] != 0]
        log(f"benchmarks done in {record['total_wall_s'] / 60:.1f} min")
    path = write_report(a.quick)
    log(f"wrote {path}")
    for s in failed:
        print(f"FAILED ({s['returncode']}): {s['command']} -- see {s['log']}", file=sys.stderr)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
