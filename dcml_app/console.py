"""Quiet local runs: the terminal gets one line per stage and a progress bar, the logs get everything.

While `dcml run` executes the pipeline with kfp.local, everything KFP and the
stages print (executor JSON, warnings, tracebacks) goes through
:class:`PipelineConsole`, which writes it to ``<log_dir>/run.log`` and to one
log file per task, and shows on the terminal only:

- one line per stage when it ends: its name, "cached" or its seconds, and the
  key figure the stage reported (a ``summary`` event, dcml.contracts.events),
  and under it each ``warning`` event of the stage (``    warning: ...``);
- while a stage runs, a progress bar drawn from its ``progress`` events (on a
  terminal only; a pipe or file gets no bar);
- for a failed stage, its error (the last exception line of its log) and the
  path of its full log.

``verbose=True`` also echoes every line to the terminal, as kfp prints it.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import TextIO

from dcml.contracts import events

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([^']+)'")
CACHED = re.compile(r"Task '?([\w.-]+)'? cache hit")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
ERROR = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)): (.+)$")


class PipelineConsole:
    """A text stream to put in place of sys.stdout / sys.stderr during a local run."""

    def __init__(self, log_dir: Path, terminal: TextIO | None = None, verbose: bool = False):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / "run.log"
        self._log = open(self.log_path, "a", encoding="utf-8")
        self.terminal = terminal or sys.__stdout__
        self.verbose = verbose
        self.tty = bool(getattr(self.terminal, "isatty", lambda: False)())
        self._pending = ""
        self._task: str | None = None
        self._task_log: TextIO | None = None
        self._started = 0.0
        self._summary: dict[str, str] = {}
        self._warnings: dict[str, list[str]] = {}
        self._error: dict[str, str] = {}
        self._bar = False
        self.stages: list[dict] = []  # {"name", "status", "seconds", "summary", "warnings", "log"}

    # -- the stream protocol -------------------------------------------------------
    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        if self._task_log:
            self._task_log.flush()

    def isatty(self) -> bool:
        return False  # stages and tqdm in this process must not draw on the terminal themselves

    def close(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""
        self._clear_bar()
        if self._task_log:
            self._task_log.close()
        self._log.close()

    # -- lines -----------------------------------------------------------------------
    def _line(self, raw: str) -> None:
        line = ANSI.sub("", raw).rstrip("\r")
        self._log.write(line + "\n")
        if self._task_log:
            self._task_log.write(line + "\n")
        if self.verbose:
            self._echo(raw)
        event = events.parse(line)
        if event:
            self._event(event)
            return
        started = STARTED.search(line)
        if started:
            self._start(started.group(1))
            return
        cached = CACHED.search(line)
        if cached:
            self._end(cached.group(1), "cached")
            return
        finished = FINISHED.search(line)
        if finished:
            self._end(finished.group(1), "ok" if finished.group(2) == "SUCCESS" else "failed")
            return
        error = ERROR.match(line)
        if error and self._task:
            self._error[self._task] = f"{error.group(1)}: {error.group(2)}" if error.group(1) != "DcmlError" else error.group(2)

    def _event(self, event: dict) -> None:
        if event["event"] == "summary" and self._task:
            self._summary[self._task] = str(event.get("text", ""))
        elif event["event"] == "warning" and self._task:
            self._warnings.setdefault(self._task, []).append(str(event.get("text", "")))
        elif event["event"] == "progress" and self._task and self.tty and not self.verbose:
            self._draw(event)

    def _start(self, name: str) -> None:
        self._task, self._started = name, time.perf_counter()
        if self._task_log:
            self._task_log.close()
        self._task_log = open(self._task_path(name), "a", encoding="utf-8")

    def _end(self, name: str, status: str) -> None:
        seconds = time.perf_counter() - self._started if status != "cached" else None
        stage = {"name": name, "status": status, "seconds": seconds, "summary": self._summary.get(name, ""),
                 "warnings": self._warnings.get(name, []), "log": str(self._task_path(name)) if status != "cached" else None}
        if status == "failed":
            stage["error"] = as_set_hint(self._error.get(name, "see the log"))
        self.stages.append(stage)
        if self._task_log and status != "cached":
            self._task_log.close()
            self._task_log = None
        self._task = None
        self._clear_bar()
        if not self.verbose:
            self._echo(format_stage(stage))
            for warning in stage["warnings"]:
                self._echo(f"    warning: {warning}")
            if status == "failed":
                self._echo(f"    error: {stage['error']}")
                self._echo(f"    log:   {stage['log']}")

    def _task_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # -- terminal --------------------------------------------------------------------
    def _echo(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def _draw(self, event: dict) -> None:
        n, total = event.get("n") or 0, event.get("total") or 0
        width = 24
        filled = int(width * n / total) if total else 0
        bar = "#" * filled + "." * (width - filled)
        extra = "  ".join(f"{k} {v}" for k, v in event.items() if k not in ("event", "stage", "desc", "n", "total", "done"))
        text = f"  {self._task:<18} {event.get('desc', '')} [{bar}] {n}/{total or '?'}  {extra}"
        self.terminal.write("\r" + text[:120].ljust(120))
        self.terminal.flush()
        self._bar = True

    def _clear_bar(self) -> None:
        if self._bar:
            self.terminal.write("\r" + " " * 120 + "\r")
            self.terminal.flush()
            self._bar = False


def format_stage(stage: dict) -> str:
    status = stage["status"]
    when = "cached" if status == "cached" else f"{stage['seconds']:.1f} s"
    mark = "FAILED " if status == "failed" else ""
    return f"  {stage['name']:<18} {mark}{when:>8}  {stage.get('summary', '')}".rstrip()


_OPTION = re.compile(r"--([a-z][a-z0-9-]*)(?:[ =]([A-Za-z0-9_./-]+))?")
_NOT_VALUES = {"is", "or", "and", "to", "with", "for", "has", "needs", "must", "of", "the", "a", "in", "on"}


def as_set_hint(message: str) -> str:
    """A stage's error as `dcml run` users act on it: ``--split-mode X`` (the stage command's option)
    becomes ``--set split_mode=X`` when the option is a pipeline parameter."""
    from dcml.contracts import params

    names = {p.name for p in params.pipeline_params()}
    renamed = {stage: pipeline for renames in params.STAGE_NAMES.values() for pipeline, stage in renames.items()
               if list(renames.values()).count(stage) == 1 and stage != "epochs"}

    def hint(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        name = renamed.get(name, name)
        if name not in names:
            return match.group(0)
        value = match.group(2)
        if value is None or value in _NOT_VALUES:
            return f"--set {name}=..." + (match.group(0)[len(match.group(1)) + 2:] if value else "")
        return f"--set {name}={value}"

    return _OPTION.sub(hint, message)

