"""A killed run (kill -9) leaves no stage process behind, and running it again
resumes training after the last finished epoch and ends with the weights an
uninterrupted run ends with (real pipeline runs, real processes)."""

import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dcml.contracts import checkpoint
from dcml.contracts.records import read, walk

pytestmark = pytest.mark.slow  # whole runs in processes: `make test` starts this module first

_spec = importlib.util.spec_from_file_location("cli_runs", Path(__file__).with_name("cli_runs.py"))
cli_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_runs)
bmp_dataset, dcml_run, statuses, tiny_config = (cli_runs.bmp_dataset, cli_runs.dcml_run, cli_runs.statuses,
                                                cli_runs.tiny_config)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return bmp_dataset(tmp_path_factory.mktemp("data") / "shapes")


def _stage_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment or command line mentions ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in blob and state != "Z":
            found.append(int(proc.name))
    return found


def _final_weights(summary: dict) -> dict:
    return checkpoint.load(Path(summary["run_dir"]) / "finetune" / "model" / "model.pt")["model"]


def test_a_killed_run_leaves_no_process_and_resumes_to_identical_weights(data, tmp_path):
    config = tiny_config(data, epochs=5, recluster_every=0, num_clusters=1)
    straight, _ = dcml_run(tmp_path, config, tmp_path / "straight")

    out = tmp_path / "killed"
    proc, _ = dcml_run(tmp_path, config, out, background=True)
    resume = out / "resume"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # wait for the second finished epoch of training
        files = list(resume.glob("*.resume.pt")) if resume.is_dir() else []
        if files and checkpoint.load(files[0]).get("epoch", 0) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    else:
        pytest.fail("training never wrote its second epoch")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker = str(out)
    deadline = time.monotonic() + 15
    while _stage_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _stage_processes(marker), "stage processes outlived the killed run"

    resumed, _ = dcml_run(tmp_path, config, out)
    assert statuses(resumed)["ingest"] == "cached" and statuses(resumed)["train-shared"] == "ok"
    train = next(r for r in walk(read(resumed["metrics_file"])) if r["stage"] == "train")
    assert train["metrics"]["resumed_from_epoch"] >= 2
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
