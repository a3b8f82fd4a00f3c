"""What the report sections share: the result files they read, number formatting,
command lines, per-data-set headings and the machine section.

A benchmark's section of BENCHMARKS.md lives in its own module (the protocol
is in bench/run_all.py's docstring); this module only holds what several
sections use. It imports nothing heavy, so ``run_all --report-only`` stays fast.
"""

from __future__ import annotations

import json

from bench.common import RESULTS

PY = ".venv/bin/python"


class Results:
    """The JSON files in bench/results a section reads. ``quick``: prefer the smoke
    runs' <name>_quick.json (a report after ``run_all --quick``)."""

    def __init__(self, quick: bool = False):
        self.quick = quick

    def load(self, name: str) -> dict | None:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def best(self, name: str) -> dict | None:
        """The full result, else the quick one (or the reverse when quick)."""
        first, second = (f"{name}_quick", name) if self.quick else (name, f"{name}_quick")
        return self.load(first) or self.load(second)

    def per_dataset(self, pattern: str, skip: str | None = None) -> list[tuple[str, dict]]:
        """(dataset, result) of every file matching ``pattern`` (one file per data set)."""
        out = []
        for path in sorted(RESULTS.glob(pattern)):
            if skip and path.name.startswith(skip):
                continue
            result = json.loads(path.read_text())
            out.append((result.get("dataset", path.stem), result))
        return out

    def image(self, name: str, alt: str) -> list[str]:
        """A blank line and the plot bench/results/<name>, if it exists."""
        return ["", f"![{alt}](bench/results/{name})"] if (RESULTS / name).exists() else []

    @property
    def run_all(self) -> dict | None:
        """bench/run_all.py's own record: the commands it ran and how long they took."""
        return self.load("run_all_quick" if self.quick else "run_all") or self.load("run_all")

    def step_command(self, step: str, contains: str = "") -> str:
        """The latest command ``run_all`` ran for ``step`` (containing ``contains``), or ''."""
        for s in (self.run_all or {}).get("latest_by_step", {}).get(step, []):
            if contains in s["command"]:
                return s["command"]
        return ""

    def wall_time(self, name: str) -> list[str]:
        """['<name> N min'] from a result's total time, for the report's timing section; [] without one."""
        r = self.load(name)
        seconds = r and (r.get("total_wall_s") or r.get("total_s"))
        if not seconds:
            return []
        return [f"{name} {seconds / 60:.0f} min" + (" (its last run only)" if r.get("earlier_commands") else "")]


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


def commands_line(result: dict, fallback: str = "", experiment: str | None = None) -> str:
    """'Command: `...`' for a result (earlier runs first, e.g. seeds added later),
    with the MLflow run it was logged as."""
    commands = [c for c in result.get("earlier_commands", []) if c] + [result.get("command") or fallback]
    line = "Command" + ("s" if len(commands) > 1 else "") + ": " + "; then ".join(f"`{c}`" for c in commands)
    if experiment and result.get("mlflow_run_id"):
        line += f"; MLflow run `{result['mlflow_run_id']}` (experiment {experiment})"
    return line


def dataset_heading(dataset: str, result: dict) -> list[str]:
    return [f"### {dataset}", ""] + ([] if result.get("complete") else ["**Incomplete run.**", ""])


def machine_section(source: dict | None) -> list[str]:
    """The machine and versions recorded in ``source`` (run_all's record or a result's header)."""
    src = source or {}
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
