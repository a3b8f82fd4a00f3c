"""Run the benchmarks and regenerate BENCHMARKS.md from bench/results/*.json.

    python -m bench.run_all                          # everything (`make bench`)
    python -m bench.run_all --only quality,speed     # a subset
    python -m bench.run_all --quick                  # small smoke versions (results *_quick.json)
    python -m bench.run_all --report-only            # only rewrite BENCHMARKS.md

Each benchmark runs as its own process with its log in runs/bench/logs/;
one failing does not stop the others (the report says which failed). The
report reads nothing but the JSON files, so every number in BENCHMARKS.md
comes from a result file, next to the command that produced it.

A step is a benchmark module listed in STEPS (in the order the steps run and
their sections appear in the report). The module provides

    commands(quick: bool, threads: int) -> list[list[str]]
        the step's command lines, run from the repository root (one per data
        set, or none when what the step needs is missing);
    report(results: bench.report.Results) -> list[str]
        its section of BENCHMARKS.md (markdown lines) from its result files;
    elapsed(results: bench.report.Results) -> list[str]    (optional)
        "<result> N min" per result file, for the timing section until one
        `make bench` has timed every step;

and imports nothing heavy at module level, so the report stays quick to
write. This module only runs the steps and puts the machine section, the
steps' sections and the timing section together.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import (bench_compress, bench_dc, bench_dc_time, bench_dfml, bench_eval, bench_fast, bench_head,
                   bench_quality, bench_recipe, bench_rerank, bench_retrieval, bench_scale, bench_scaling, bench_small,
                   bench_speed)
from bench.common import REPO, THREAD_VARIABLES, WORK, log, machine_info, versions, write_result
from bench.report import PY, Results, machine_section

STEPS = {"recipe": bench_recipe, "small": bench_small, "head": bench_head, "fast": bench_fast, "dc": bench_dc, "dc_time": bench_dc_time,
         "quality": bench_quality, "speed": bench_speed, "scaling": bench_scaling, "eval": bench_eval,
         "compress": bench_compress, "dfml": bench_dfml, "retrieval": bench_retrieval, "rerank": bench_rerank,
         "scale": bench_scale}
# Results whose header gives the machine section when run_all has not run yet, first found wins.
MACHINE_SOURCES = ("quality_cars196", "quality_fashion-mnist", "speed", "scaling")
REPORT = REPO / "BENCHMARKS.md"


# ---------------------------------------------------------------- running

def run_steps(steps: list[str], quick: bool, threads: int) -> dict:
    env = dict(os.environ)
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    record = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
              "threads": threads, "steps": [], "machine": machine_info(), "versions": versions()}
    t0 = time.perf_counter()
    for step in steps:
        for i, cmd in enumerate(STEPS[step].commands(quick, threads)):
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
    previous = Results().load("run_all") or {}
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

def section_timing(results: Results) -> list[str]:
    lines = ["## How long `make bench` takes", ""]
    run_all = results.run_all
    if not run_all:
        parts = [part for module in STEPS.values() if hasattr(module, "elapsed") for part in module.elapsed(results)]
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
    results = Results(quick)
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
    lines += machine_section(results.run_all or next(filter(None, map(results.best, MACHINE_SOURCES)), None))
    for module in STEPS.values():
        lines += module.report(results)
    lines += section_timing(results)
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
