"""dcml: divide-and-conquer deep metric learning as a Kubeflow pipeline."""

__version__ = "0.1.0"

# The Python API (dcml/retrieval/api.py), imported on first use so `import dcml` stays light:
# dcml.load_model(path) -> Model (.embed), dcml.Index (.build / .open / .add / .remove / .search / .save).
# Training from Python is the application's: dcml_app.train(...) (dcml_app/python_api.py).
# `import dcml` changes no process-wide setting; stage processes tune their own (dcml.stagekit.stage_process,
# components/__init__.py).
_API = {"load_model": "dcml.retrieval.api", "Model": "dcml.retrieval.api", "Index": "dcml.retrieval.api",
        "MAX_K": "dcml.retrieval.api", "DcmlError": "dcml.contracts.errors"}
__all__ = ["load_model", "Model", "Index", "DcmlError", "MAX_K", "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dcml' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (what tab completion offers); the runner machinery below is internal."""
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})


RUNNER: str | None = None  # the `dcml run` this process works for (its runner_token), if any


def runner_token(pid: int) -> str:
    """"pid:start-time" of a process (the start time tells a reused pid from the original)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def _die_with_runner() -> None:
    """A stage process started by `dcml run` ends when that run's process ends.

    `dcml run` puts its own ``runner_token`` (plus "#<run id>", so two runs
    from one process differ) in DCML_RUNNER in the environment
    its stage processes inherit (through kfp's ``sh`` wrapper). Such a process
    watches the runner from a daemon thread and terminates itself (SIGTERM)
    within a second of the runner's end, so killing the run (even with kill
    -9) leaves no training process running on in the background. The variable
    is removed here, so this process's own children (data-loader workers,
    which end with it) do not watch anything.
    """
    import os
    import signal
    import threading
    import time

    global RUNNER
    token = os.environ.pop("DCML_RUNNER", None)
    RUNNER = token
    if not token or not os.path.isdir("/proc"):
        return

    process = token.split("#", 1)[0]  # "pid:start#run-id": the run's process, then which of its runs

    def watch():
        pid = int(process.split(":")[0])
        while runner_token(pid) == process:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dcml-runner-watch", daemon=True).start()


_die_with_runner()
