"""What `dcml run` guarantees, replayed as a user would break it (real pipeline runs, real processes).

- the cache never serves stale data: changed image bytes (same name and size)
  re-run ingestion and everything after it; a deleted or changed file in a
  cached output re-runs that stage; unchanged data is served from the cache;
- a killed run (kill -9) leaves no stage process behind, and running it again
  resumes training after the last finished epoch and ends with the weights an
  uninterrupted run ends with;
- three runs at once in one folder all finish, each with its own run folder
  and MLflow run, and the store stays intact;
- bad input is one line and exit status 2, before anything runs.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcml.contracts import checkpoint
from dcml.contracts.io import read_parquet_meta
from dcml.contracts.records import read, walk

ROOT = Path(__file__).resolve().parents[1]
DCML = [sys.executable, "-m", "dcml_app.cli"]
CLASSES, PER_CLASS = 8, 6


def tiny_config(root: Path, **overrides) -> dict:
    return {"dataset": "folder", "data_root": str(root), "split_mode": "class-disjoint", "val_fraction": 0.0,
            "backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 16, "freeze_bn": "false",
            "num_clusters": 2, "niter": 5, "classes_per_batch": 2, "images_per_class": 2, "lr_backbone": 1e-3,
            "lr_embedding": 1e-3, "epochs": 2, "recluster_every": 1, "finetune_epochs": 1, "eval_every": 1,
            "batch_size": 32, "ks": "1,2", "experiment": "reliability", **overrides}


def bmp_dataset(root: Path, seed: int = 0) -> Path:
    """Class folders of 28x28 grey BMP drawings (fixed-size files: an edit keeps the size)."""
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        base = rng.integers(0, 2, size=(28, 28)) * 255
        for i in range(PER_CLASS):
            noisy = np.where(rng.random((28, 28)) < 0.1, 255 - base, base).astype(np.uint8)
            Image.fromarray(noisy, mode="L").save(d / f"{i:02d}.bmp")
    return root


def dcml_run(tmp: Path, config: dict, out: Path, *extra: str, env: dict | None = None, background=False):
    cfg = tmp / f"config-{len(list(tmp.glob('config-*.json')))}.json"
    cfg.write_text(json.dumps(config))
    summary = tmp / f"summary-{time.monotonic_ns()}.json"
    args = [*DCML, "run", "--config", str(cfg), "--output-dir", str(out), "--json-out", str(summary),
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DCML_CACHE_DIR": str(tmp / "digests"), **(env or {})}
    if background:
        return subprocess.Popen(args, cwd=tmp, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True), summary
    done = subprocess.run(args, cwd=tmp, env=full_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(summary.read_text()), done.stdout


def statuses(summary: dict) -> dict:
    return {s["name"]: s["status"] for s in summary["stages"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return bmp_dataset(tmp_path_factory.mktemp("data") / "shapes")


def test_changed_bytes_rerun_everything_and_unchanged_data_is_served_from_the_cache(data, tmp_path):
    out = tmp_path / "runs"
    first, stdout = dcml_run(tmp_path, tiny_config(data), out)
    assert set(statuses(first).values()) == {"ok"}
    assert len(stdout.splitlines()) < 30 and "executor" not in stdout  # quiet: one line per stage
    again, _ = dcml_run(tmp_path, tiny_config(data), out)
    assert {k: v for k, v in statuses(again).items() if k != "track"} == {
        k: "cached" for k in statuses(first) if k != "track"}

    # Same name, same size, other bytes.
    victim = data / "class0" / "00.bmp"
    size = victim.stat().st_size
    pixels = np.array(Image.open(victim))
    Image.fromarray(255 - pixels, mode="L").save(victim)
    assert victim.stat().st_size == size
    changed, _ = dcml_run(tmp_path, tiny_config(data), out)
    assert all(status == "ok" for status in statuses(changed).values()), statuses(changed)
    manifests = [Path(s["run_dir"]) / "ingest" / "manifest" / "manifest.parquet" for s in (first, changed)]
    assert read_parquet_meta(manifests[0])["fingerprint"] != read_parquet_meta(manifests[1])["fingerprint"]


def test_a_damaged_cached_output_is_not_served(data, tmp_path):
    out = tmp_path / "runs"
    first, _ = dcml_run(tmp_path, tiny_config(data), out)
    (Path(first["run_dir"]) / "ingest" / "manifest" / "manifest.parquet").unlink()
    clusters = Path(first["run_dir"]) / "cluster" / "clusters" / "clusters.parquet"
    clusters.write_bytes(clusters.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    again, _ = dcml_run(tmp_path, tiny_config(data), out)
    states = statuses(again)
    assert states["ingest"] == "ok" and states["cluster"] == "ok", states


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


def test_three_runs_at_once_in_one_folder(data, tmp_path):
    out = tmp_path / "shared"
    procs = [dcml_run(tmp_path, tiny_config(data, seed=s), out, background=True) for s in range(3)]
    results = []
    for proc, summary in procs:
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, stdout + stderr
        results.append(json.loads(summary.read_text()))
    assert len({r["run_dir"] for r in results}) == 3
    assert len({r["mlflow"]["mlflow_run_id"] for r in results}) == 3
    with sqlite3.connect(out / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("config,set_args,fragment", [
    ({"epochs": 1.5}, [], "epochs=1.5: expected a whole number"),
    ({"epochs": None}, [], "epochs=None: a value is required"),
    ({}, ["lr_backbone=nan"], "lr_backbone='nan': must be a finite number"),
    ({}, ["epochs=-1"], "epochs='-1': out of range"),
    ({}, ["loss=hinge"], "loss='hinge': not allowed"),
])
def test_bad_parameters_are_one_line_before_anything_runs(tmp_path, config, set_args, fragment):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(config))
    args = [*DCML, "run", "--config", str(cfg), "--output-dir", str(tmp_path / "runs")]
    for item in set_args:
        args += ["--set", item]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "runs").exists()


def test_a_decompression_bomb_is_one_line_naming_the_limit(tmp_path):
    root = bmp_dataset(tmp_path / "bomb")
    Image.new("1", (20000, 20000)).save(root / "class0" / "bomb.png")  # 400 Mpx, a few kB on disk
    out = tmp_path / "f.parquet"
    manifest = tmp_path / "m.parquet"
    subprocess.run([*DCML, "ingest", "--dataset", "folder", "--root", str(root), "--out", str(manifest)],
                   check=True, capture_output=True)
    done = subprocess.run([*DCML, "extract", "--manifest", str(manifest), "--out", str(out), "--backbone", "small_cnn",
                           "--image-size", "28"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "bomb.png" in done.stderr and "DCML_MAX_IMAGE_PIXELS" in done.stderr and "limit" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-o", "bind,ro", str(folder), str(folder)], capture_output=True).returncode:
        if os.geteuid() == 0:
            pytest.skip("cannot make a read-only mount here (needs mount rights)")
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_unwritable_outputs_and_overlong_names_are_one_line(tmp_path, read_only_dir):
    root = bmp_dataset(tmp_path / "d")
    cases = [read_only_dir / "m.parquet",                     # read-only file system
             tmp_path / "file.txt" / "m.parquet",             # a file where a folder should be
             tmp_path / ("x" * 300 + ".parquet")]             # over the name limit
    (tmp_path / "file.txt").write_text("not a folder")
    for dest in cases:
        done = subprocess.run([*DCML, "ingest", "--dataset", "folder", "--root", str(root), "--out", str(dest)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    legal = tmp_path / ("y" * 245 + ".parquet")  # 253 bytes: legal, and the temporary name must fit too
    done = subprocess.run([*DCML, "ingest", "--dataset", "folder", "--root", str(root), "--out", str(legal)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and legal.is_file(), done.stderr
