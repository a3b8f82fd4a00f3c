"""Start a training stage as N data-parallel processes with torchrun.

One node (``dcml train ... --nproc N``, the pipeline's ``gpus_per_task``): the
stage's ``run`` sees ``nproc > 1`` outside a torchrun process and calls
:func:`run_processes`, which starts ``torchrun --standalone --nproc-per-node N``
on this module; every process calls the same ``run`` with the same arguments
(torchrun sets ``WORLD_SIZE``, so they do not launch again), joins the process
group (:func:`dcml.algorithm.distributed.setup`) and trains; rank 0 writes the
output and its record comes back as ``run``'s return value.

Several nodes (a Kubeflow TrainJob, :mod:`dcml.trainjob`): every node runs
``torchrun -m dcml.launch --call JSON``; the ``torch-distributed`` runtime sets
torchrun's node count, rank and rendezvous address (``PET_*`` variables).

The call is JSON: ``{"target": "components.train.stage:run", "kwargs": {...}}``.

No orphans (Linux): on one node torchrun runs as ``python -m dcml.launch --agent
...`` and every rank as ``python -m dcml.launch --call ...``; each asks the
kernel for SIGKILL when its parent ends (:func:`die_with_parent`), so killing
the stage command, even with ``kill -9``, ends torchrun and then every rank at
once instead of leaving them training on under PID 1. The agent also turns
torchrun's own report of a failed rank (a ChildFailedError traceback and log
lines) into one line; a rank's user error (exit status 2) is reported once, by
the stage command.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from dcml.algorithm import distributed
from dcml.contracts.errors import DcmlError


def needed(nproc) -> bool:
    """``nproc`` processes were asked for and this process is not one of a group yet."""
    return int(nproc or 1) > 1 and not distributed.launched()


def call_json(target: str, kwargs: dict) -> str:
    """The call every process makes: ``target`` ("module:function") with ``kwargs``."""
    return json.dumps({"target": target, "kwargs": kwargs}, default=str)


def module_command(target: str, kwargs: dict, result: str | None = None) -> list[str]:
    """Arguments after ``torchrun ... -m``: this module, the call, where rank 0 puts its return value."""
    return ["dcml.launch", "--call", call_json(target, kwargs)] + (["--result", result] if result else [])


def _source_roots(target: str) -> list[str]:
    """Folders the processes need on their path to import the code this process runs
    (the same checkout, not another installed copy)."""
    roots = []
    for name in (target.split(":")[0].split(".")[0], "dcml"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.append(str(Path(list(spec.submodule_search_locations)[0]).parent))
        elif spec is not None and spec.origin:
            roots.append(str(Path(spec.origin).parent))
    return list(dict.fromkeys(roots))


def run_processes(target: str, kwargs: dict, nproc: int) -> dict:
    """Run ``target(**kwargs)`` in ``nproc`` processes on this node (torchrun standalone);
    returns rank 0's return value. A user error in the processes is re-raised here."""
    nproc = int(nproc)
    with launch_folder() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "dcml.launch", "--agent", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", *module_command(target, kwargs, str(result))]
        env = dict(os.environ)
        env[PARENT_ENV] = str(os.getpid())
        env[REPORT_ENV] = str(Path(tmp) / "failure.txt")
        env["PYTHONPATH"] = os.pathsep.join(_source_roots(target) + [p for p in [env.get("PYTHONPATH")] if p])
        # One thread per process unless told otherwise (torchrun's own default, without its warning).
        env.setdefault("OMP_NUM_THREADS", "1")
        sys.stdout.flush()
        sys.stderr.flush()
        code = subprocess.run(cmd, env=env).returncode
        answer = json.loads(result.read_text()) if result.is_file() else None
        report = Path(env[REPORT_ENV])
        failure = report.read_text().strip() if report.is_file() else f"torchrun ended with {describe_exit(code)}"
    if isinstance(answer, dict) and "error" in answer:
        raise DcmlError(answer["error"])
    if code != 0 or answer is None:
        raise DcmlError(f"{nproc} training processes failed: {failure}; the processes' output above says why")
    return answer["result"]


LAUNCH_PREFIX = "dcml-launch-"


def launch_folder() -> tempfile.TemporaryDirectory:
    """The temporary folder of one launch (rank 0's answer, the agent's failure report): named
    ``dcml-launch-<pid>-*``. A stage command killed with ``kill -9`` cannot remove its own, so every launch
    first removes those whose process is gone (the ranks and torchrun died with it: nothing writes there)."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob(f"{LAUNCH_PREFIX}*-*"):
        pid = stale.name[len(LAUNCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and stale.is_dir() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{LAUNCH_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


PARENT_ENV = "DCML_LAUNCH_PARENT"  # the pid a launched process must die with (its parent's)
REPORT_ENV = "DCML_LAUNCH_REPORT"  # where the agent says which rank failed how
USER_ERROR = 2  # a rank's exit status for a DcmlError (reported by the stage command)


def die_with_parent(parent: int | str | None = None) -> bool:
    """Have the kernel SIGKILL this process when its parent ends (Linux ``PR_SET_PDEATHSIG``).

    ``parent``: the pid this process was started by; when it is already gone
    (this process was re-parented before the request took effect) this process
    ends now. Returns whether the request was made (False off Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and str(parent).isdigit() and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def agent(argv: list[str]) -> None:
    """torchrun (``torch.distributed.run``) tied to the stage command that started it.

    The ranks it starts are told to die with it; a failed rank ends it with one
    line (nothing for a user error, which the stage command reports) instead of
    torchrun's ChildFailedError traceback.
    """
    die_with_parent(os.environ.pop(PARENT_ENV, None))
    os.environ[PARENT_ENV] = str(os.getpid())  # for the ranks: their parent is this process
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        what = f"process {rank} (pid {failure.pid}) ended with {describe_exit(failure.exitcode)}"
        report = os.environ.get(REPORT_ENV)
        if report:
            Path(report).write_text(what + "\n")
        elif failure.exitcode != USER_ERROR:
            print(f"error: training {what}; the processes' output above says why", file=sys.stderr)
        sys.exit(1)


def describe_exit(code: int) -> str:
    """"exit status 1" or "signal SIGKILL" (a negative code: killed by that signal)."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another process of the group is gone (gloo / NCCL wording)."""
    text = str(exc)
    return any(s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                                   "NCCL communicator was aborted", "Socket Timeout"))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--agent"]:
        return agent(argv[1:])
    die_with_parent(os.environ.pop(PARENT_ENV, None))
    parser = argparse.ArgumentParser(prog="python -m dcml.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--call", required=True, help='JSON: {"target": "module:function", "kwargs": {...}}')
    parser.add_argument("--result", help="Where rank 0 writes the return value (JSON).")
    args = parser.parse_args(argv)
    call = json.loads(args.call)
    module, _, name = call["target"].partition(":")
    function = getattr(importlib.import_module(module), name)
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0
    try:
        value = function(**call["kwargs"])
    except DcmlError as exc:
        if main_rank:
            _write(args.result, {"error": str(exc)})
            if not args.result:  # else the stage command prints it
                print(f"error: {exc}", file=sys.stderr)
        sys.exit(USER_ERROR)
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        # Another process died (its own output, or the agent's line, says how): no traceback here.
        print(f"process {os.environ.get('RANK', '?')}: stopped, another training process is gone", file=sys.stderr)
        sys.exit(1)
    if main_rank:
        _write(args.result, {"result": value})


def _write(path, value) -> None:
    if path:
        from dcml.contracts.io import write_json

        write_json(path, value)


if __name__ == "__main__":
    main()
