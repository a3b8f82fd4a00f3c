"""A data-parallel stage command killed with SIGKILL leaves no process behind, and a rank
that dies is reported in one line (real torchrun, real processes, gloo on CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcml import launch

ROOT = Path(__file__).resolve().parents[1]
DCML = [sys.executable, "-m", "dcml_app.cli"]
MODEL = ["--backbone", "small_cnn", "--weights", "none", "--image-size", "28", "--embedding-dim", "16",
         "--freeze-bn", "false", "--classes-per-batch", "4", "--images-per-class", "4", "--eval-every", "0"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location("fmnist_data", ROOT / "components" / "train" / "tests" / "fmnist_data.py")
    fmnist = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fmnist)
    return fmnist.make_manifest(tmp_path_factory.mktemp("fm") / "m.parquet", per_class=8,
                                train_classes=(0, 1, 2, 3), test_per_class=4)


def children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    tree, found, todo = children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_training(manifest, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([*DCML, "train", "--manifest", str(manifest), "--out", str(tmp_path / "m.pt"),
                             "--epochs", "300", "--nproc", "2", *MODEL], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def is_rank(pid: int) -> bool:
    """A training process (``dcml.launch --call``), not torchrun's agent (whose arguments hold the same call)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--call" in args and b"--agent" not in args


def wait_for_ranks(stage: subprocess.Popen, deadline_s: float = 120) -> list[int]:
    """The stage's process tree once both ranks run: [agent, rank, rank, ...]."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        tree = descendants(stage.pid)
        if len([p for p in tree if is_rank(p)]) == 2:
            time.sleep(2.0)  # into training: process group joined
            return descendants(stage.pid)
        assert stage.poll() is None, stage.communicate()
        time.sleep(0.2)
    raise AssertionError("the two training processes did not start")


@pytest.mark.slow  # two torchrun ranks start: ~9 s on an idle 2-core machine, up to 60 s on a loaded one
def test_kill_9_of_a_two_process_stage_command_leaves_no_process(manifest, tmp_path):
    stage = start_training(manifest, tmp_path)
    tree: list[int] = []
    try:
        tree = wait_for_ranks(stage)
        assert len(tree) >= 3  # torchrun's agent and two ranks
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait()
        end = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < end:
            time.sleep(0.1)
        left = [p for p in tree if alive(p)]
        assert not left, f"still running 10 s after kill -9 of the stage command: {left}"
    finally:  # whatever the test left (only if it failed)
        for p in tree + (descendants(stage.pid) if stage.poll() is None else []):
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if stage.poll() is None:
            stage.kill()


@pytest.mark.slow  # as above
def test_a_rank_killed_mid_training_is_one_line(manifest, tmp_path):
    stage = start_training(manifest, tmp_path)
    try:
        tree = wait_for_ranks(stage)
        ranks = [p for p in tree if is_rank(p)]
        os.kill(ranks[-1], signal.SIGKILL)
        out, err = stage.communicate(timeout=60)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    assert lines[-1].startswith("error: 2 training processes failed: process ") and "signal SIGKILL" in lines[-1], err
    assert len(lines) <= 2, err  # the other rank's "stopped" line, then the error
    assert not (tmp_path / "m.pt").exists()


def test_a_launched_process_asks_to_die_with_its_parent():
    """PR_SET_PDEATHSIG is set (read back with PR_GET_PDEATHSIG) in a child that calls die_with_parent."""
    code = ("import ctypes, os, sys; from dcml import launch; assert launch.die_with_parent(os.getppid());"
            "libc = ctypes.CDLL(None); sig = ctypes.c_int(0); libc.prctl(2, ctypes.byref(sig), 0, 0, 0);"
            "print(sig.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert int(out) == signal.SIGKILL
    assert launch.describe_exit(-9) == "signal SIGKILL" and launch.describe_exit(2) == "exit status 2"
