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
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
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
    with tempfile.TemporaryDirectory(prefix="dcml-launch-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", *module_command(target, kwargs, str(result))]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(_source_roots(target) + [p for p in [env.get("PYTHONPATH")] if p])
        # One thread per process unless told otherwise (torchrun's own default, without its warning).
        env.setdefault("OMP_NUM_THREADS", "1")
        sys.stdout.flush()
        sys.stderr.flush()
        code = subprocess.run(cmd, env=env).returncode
        answer = json.loads(result.read_text()) if result.is_file() else None
    if isinstance(answer, dict) and "error" in answer:
        raise DcmlError(answer["error"])
    if code != 0 or answer is None:
        raise DcmlError(f"{nproc} training processes failed (torchrun exit status {code}); "
                        "the processes' errors are in the log above")
    return answer["result"]


def main(argv=None) -> None:
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
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if main_rank:
        _write(args.result, {"result": value})


def _write(path, value) -> None:
    if path:
        from dcml.contracts.io import write_json

        write_json(path, value)


if __name__ == "__main__":
    main()
