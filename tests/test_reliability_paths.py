"""Adversarial inputs as one line (`error: <path or param>: <problem>; <fix>`, exit 2, nothing
left behind): full disks, read-only and /sys-style roots, over-long names, GPUs that are not
there, files that contradict their own metadata, K above the training classes, pickled
checkpoints, and `dcml run` checking every place it writes before the first stage.

In-process through the real `dcml` entry point (dcml_app.cli.main), tiny real data.
"""

import contextlib
import errno
import importlib.util
import os
import pathlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.contracts import io as dcml_io
from dcml_app import cli

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fmnist_data", ROOT / "components" / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)

MODEL = {"backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 8}


def dcml(capsys, *args) -> tuple[int, str]:
    """Run `dcml ARGS` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def one_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A manifest (4 training classes), a random-weights checkpoint, its embeddings and an index."""
    from dcml import stagekit
    from dcml.algorithm.models import build_model

    folder = tmp_path_factory.mktemp("data")
    manifest = fmnist_data.make_manifest(folder / "m.parquet", per_class=4, train_classes=(0, 1, 2, 3),
                                         test_classes=(6, 7), test_per_class=4)
    torch.manual_seed(0)
    stagekit.write_output(folder / "model.pt", build_model(MODEL), {"stage": "test"})
    from components.evaluate import stage as evaluate
    from components.index import stage as index

    evaluate.run(out=folder / "metrics.json", model=folder / "model.pt", manifest=manifest,
                 embeddings_out=folder / "emb.parquet", ks="1")
    index.run(model=folder / "model.pt", manifest=manifest, out=folder / "index", split="test")
    return {"manifest": manifest, "model": folder / "model.pt", "embeddings": folder / "emb.parquet",
            "index": folder / "index", "image": folder / "q.png"}


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled up (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs mount rights); test_an_injected_full_disk covers it")
    try:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- full disks -----------------------------------------------------------------------

def test_a_full_disk_during_evaluate_and_export_is_one_line_and_leaves_nothing(capsys, data, full_disk):
    out = full_disk / "new" / "metrics.json"
    code, err = dcml(capsys, "evaluate", "--embeddings", data["embeddings"], "--out", out, "--ks", "1")
    assert code == 2
    one_line(err, str(out), "No space left on device", "free space")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # not even the empty folder

    onnx = full_disk / "e" / "model.onnx"
    code, err = dcml(capsys, "export", "--model", data["model"], "--format", "onnx", "--out", onnx,
                     "--manifest", data["manifest"])
    assert code == 2
    one_line(err, str(onnx), "No space left on device")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_an_injected_full_disk_is_one_line(capsys, data, tmp_path, monkeypatch):
    """The same without mount rights: the metrics file's write fails with ENOSPC."""
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", no_space)
    out = tmp_path / "deep" / "er" / "metrics.json"
    code, err = dcml(capsys, "evaluate", "--embeddings", data["embeddings"], "--out", out, "--ks", "1")
    assert code == 2
    one_line(err, str(out), "No space left on device")
    assert not (tmp_path / "deep").exists()


# -- unwritable roots, over-long names -----------------------------------------------------

def test_a_sys_style_output_root_is_one_line_before_anything_runs(capsys, tmp_path):
    code, err = dcml(capsys, "run", "--output-dir", "/sys/fs/dcml-test/runs",
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 2
    one_line(err, "/sys/fs/dcml-test", "cannot write here")


def test_an_unwritable_mlflow_store_is_refused_before_the_first_stage(capsys, tmp_path):
    runs = tmp_path / "runs"
    code, err = dcml(capsys, "run", "--output-dir", runs, "--tracking-uri", "sqlite:////proc/dcml-test/mlflow.db")
    assert code == 2
    one_line(err, "MLflow store", "/proc/dcml-test")
    assert not runs.exists()  # the folders made to check are gone again


def test_dcml_run_from_a_read_only_folder_is_refused_up_front(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only file system here (needs mount rights)")
    try:
        monkeypatch.chdir(folder)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        code, err = dcml(capsys, "run", "--config", "demo")
    finally:
        monkeypatch.chdir(tmp_path)
        subprocess.run(["umount", str(folder)], check=False)
    assert code == 2
    one_line(err, "Read-only file system", "writable file system")


def test_a_300_character_folder_name_is_one_line(capsys, tmp_path):
    out = tmp_path / ("a" * 300) / "m.parquet"
    code, err = dcml(capsys, "ingest", "--dataset", "fashion-mnist", "--out", out)
    assert code == 2
    one_line(err, "300 bytes", "shorter name")


# -- devices ------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:3"])
def test_a_gpu_that_is_not_there_is_one_line(capsys, data, tmp_path, device):
    code, err = dcml(capsys, "index", "--model", data["model"], "--manifest", data["manifest"],
                     "--out", tmp_path / "idx", "--device", device)
    assert code == 2
    one_line(err, f"--device {device}", "cpu")
    assert not (tmp_path / "idx").exists()
    code, err = dcml(capsys, "search", "--index", data["index"], "--image", data["model"], "--device", device)
    assert code == 2
    one_line(err, f"--device {device}")


# -- inputs that contradict themselves -----------------------------------------------------

def test_features_whose_width_disagrees_with_their_metadata_are_refused(capsys, tmp_path):
    import pandas as pd

    rows = pd.DataFrame({"image_id": [f"i{i}" for i in range(8)], "label": np.arange(8) % 4, "split": "train"})
    features = tmp_path / "f.parquet"
    table = dcml_io.vectors_table(rows, np.random.default_rng(0).random((8, 64), dtype=np.float32), "feature")
    dcml_io.write_parquet(features, table, {"vector_column": "feature", "dim": 128})
    code, err = dcml(capsys, "cluster", "--features", features, "--out", tmp_path / "c.parquet", "--k", "2")
    assert code == 2
    one_line(err, str(features), "64-d", "128-d")
    assert not (tmp_path / "c.parquet").exists()


def test_more_clusters_than_training_classes_are_refused_with_the_count(capsys, tmp_path):
    import pandas as pd

    rows = pd.DataFrame({"image_id": [f"i{i}" for i in range(12)], "label": np.arange(12) % 3, "split": "train"})
    features = tmp_path / "f.parquet"
    dcml_io.write_vectors(features, rows, np.random.default_rng(0).random((12, 16), dtype=np.float32), "feature", {})
    code, err = dcml(capsys, "cluster", "--features", features, "--out", tmp_path / "c.parquet", "--k", "5")
    assert code == 2
    one_line(err, "k=5", "only 3 training classes", "k <= 3")


def test_dcml_run_refuses_num_clusters_above_the_training_classes(capsys, tmp_path):
    from PIL import Image

    root = tmp_path / "shapes"
    for c in range(8):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 30 * c + i, np.uint8)).save(root / f"class{c}" / f"{i}.png")
    runs = tmp_path / "runs"
    code, err = dcml(capsys, "run", "--set", "dataset=folder", "--set", f"data_root={root}", "--set",
                     "split_mode=class-disjoint", "--set", "num_clusters=9", "--output-dir", runs,
                     "--tracking-uri", f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}")
    assert code == 2
    one_line(err, "num_clusters=9", "only 4 classes", "num_clusters <= 4")  # class-disjoint: half of 8 train
    assert not runs.exists() and not (tmp_path / "ml").exists()


def test_a_pickled_checkpoint_is_refused_in_one_line_with_the_safe_way(capsys, data, tmp_path):
    bad = tmp_path / "pickled.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Path("/x")}, bad)  # a pickled object (pathlib)
    code, err = dcml(capsys, "evaluate", "--model", bad, "--manifest", data["manifest"], "--out", tmp_path / "m.json")
    assert code == 2
    line = one_line(err, str(bad), "refused", "pickled Python objects", "state_dict")
    assert "weights_only=False" not in line and "pathlib" in line
    assert not (tmp_path / "m.json").exists()


# -- lock files ---------------------------------------------------------------------------

def test_the_resume_lock_is_exclusive_and_leaves_no_file(tmp_path):
    from dcml.algorithm.training import resume_lock

    resume = tmp_path / "resume" / "m.pt.resume.pt"
    lock = resume_lock.lock_file(resume)
    with resume_lock.hold(resume) as first:
        assert first == resume and lock.is_file()
        with resume_lock.hold(resume) as second:  # the same training at once: a private file
            assert second != resume and second.parent == resume.parent and str(os.getpid()) in second.name
        assert lock.is_file()  # still held by the first
    assert not lock.exists()
    lock.write_text("")  # left by a process killed while holding it: taken over, then removed
    with resume_lock.hold(resume) as again:
        assert again == resume
    assert not lock.exists()


def test_a_training_leaves_no_lock_file(tmp_path, data):
    from components.train import stage

    stage.run(manifest=str(data["manifest"]), out=str(tmp_path / "m.pt"), epochs=1, classes_per_batch=2,
              images_per_class=2, eval_every=0, **MODEL)
    assert (tmp_path / "m.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no resume file, no lock file
