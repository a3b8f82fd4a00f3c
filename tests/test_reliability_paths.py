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


def test_dcml_run_from_a_3000_character_folder_is_refused_before_the_first_stage(capsys, tmp_path, monkeypatch):
    """Was: six stages trained, then the MLflow step failed after 112 s (SQLite's path limit)."""
    from dcml_app import preflight

    deep = tmp_path.joinpath(*["d" * 200] * 15)  # about 3,000 characters
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for uri in ([], ["--tracking-uri", "sqlite:///mlflow.db"]):  # the default store (./mlflow) and a relative one
        code, err = dcml(capsys, "run", "--config", "demo", *uri)
        assert code == 2
        one_line(err, "MLflow store", f"SQLite's {preflight.SQLITE_PATH_MAX}-byte limit", "shorter")
        assert sorted(p.name for p in deep.iterdir()) == []  # nothing made: no runs/, no mlflow/
    # the limit is SQLite's own: a database at the limit opens and writes, one byte more does not
    import sqlite3

    for length, works in ((preflight.SQLITE_PATH_MAX, True), (preflight.SQLITE_PATH_MAX + 1, False)):
        folder = tmp_path / "s"
        while length - len(str(folder)) > 201:
            folder = folder / ("e" * 100)
        folder.mkdir(parents=True, exist_ok=True)
        db = folder / ("f" * (length - len(str(folder)) - 1))
        assert len(os.fsencode(str(db))) == length
        try:
            with contextlib.closing(sqlite3.connect(db)) as con:
                con.execute("create table t (a)")
                con.commit()
            opened = True
        except sqlite3.OperationalError:
            opened = False
        assert opened == works, length


@pytest.mark.parametrize("sets, fragments", [
    (["embedding_masks=true", "num_clusters=1"], ["embedding_masks=true", "num_clusters >= 2"]),
    (["backbone=efficientnet_lite0", "fast_views=2", "train_blocks=99"], ["train_blocks=99", "has 16 blocks", "0..16"]),
    (["fast_views=2"], ["fast_views=2", "train_blocks=-1", "set train_blocks"]),
    (["backbone=small_cnn", "train_blocks=3"], ["train_blocks=3", "small_cnn has 2 blocks"])])
def test_parameter_combinations_are_refused_before_any_stage_runs(capsys, tmp_path, sets, fragments):
    """Was: refused by train-shared after extract and cluster ran, or by extract after ingest (runs/ left)."""
    runs = tmp_path / "runs"
    args = [a for value in sets for a in ("--set", value)]
    code, err = dcml(capsys, "run", "--config", "demo", *args, "--output-dir", runs,
                     "--tracking-uri", f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}")
    assert code == 2
    one_line(err, *fragments)
    assert not runs.exists() and not (tmp_path / "ml").exists()


def test_dcml_params_states_the_rules_between_parameters(capsys):
    from dcml.contracts import params

    capsys.readouterr()
    try:
        cli.main(["params", "train_blocks"])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    assert "between parameters" in out and "train_blocks is at most the backbone's blocks" in out
    assert "fast_views > 0 needs train_blocks >= 0" in out and "embedding_masks" not in out
    with pytest.raises(Exception, match="extract: views=3 caches the frozen lower part"):
        params.resolve(("fast_views", "train_blocks"), {"views": 3}, "extract", rename={"fast_views": "views"})


@pytest.mark.parametrize("backbone", list(__import__("dcml.contracts.params", fromlist=["x"]).BACKBONE_BLOCKS))
def test_the_block_counts_the_rules_use_are_the_models(backbone):
    from dcml.algorithm.models import build_model
    from dcml.contracts.params import BACKBONE_BLOCKS

    net = build_model({"backbone": backbone, "weights": "none", "embedding_dim": 8}, load_weights=False)
    assert net.backbone.num_blocks == BACKBONE_BLOCKS[backbone]


def test_a_symlink_swapped_in_after_ingest_is_refused_when_read(capsys, data, tmp_path):
    """Was: `dcml index` followed it (outside-the-root was checked at ingestion only)."""
    from PIL import Image

    root = tmp_path / "root"
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * c + i, np.uint8)).save(root / f"class{c}" / f"{i}.png")
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(secret)
    manifest = tmp_path / "m.parquet"
    code, err = dcml(capsys, "ingest", "--dataset", "folder", "--root", root, "--out", manifest,
                     "--split-mode", "class-disjoint", "--val-fraction", "0")
    assert code == 0, err
    swapped = root / "class3" / "1.png"
    swapped.unlink()
    swapped.symlink_to(secret)  # after ingestion
    out = tmp_path / "index"
    code, err = dcml(capsys, "index", "--model", data["model"], "--manifest", manifest, "--split", "all",
                     "--out", out)
    assert code == 2
    one_line(err, str(swapped), f"outside the dataset root {root}", "re-run `dcml ingest`")
    assert not out.exists()


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


class RunsCode:
    """Unpickling it calls os.system: a malicious checkpoint's payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def _malicious(kind: str, bad: Path, marker: Path) -> None:
    payload = {"os.system": RunsCode(marker), "eval": RunsEval(), "class": pathlib.PurePosixPath("/x")}
    legacy = kind.endswith("(legacy format)")
    obj = {"format": "dcml.checkpoint/1", "model_config": MODEL,
           "model": {"w": torch.ones(1), "x": payload[kind.split(" ")[0]]}}
    torch.save(obj, bad, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("kind", ["os.system", "os.system (legacy format)", "eval", "class"])
@pytest.mark.parametrize("option", ["evaluate --model", "train --init", "finetune --checkpoint", "train --weights",
                                    "dcml.load_model", "an index's model"])
def test_every_malicious_pickle_gets_dcmls_refusal_and_never_runs(capsys, data, tmp_path, kind, option):
    """Was: torch's own text, cut at "Re-running `torch.load` with `weights_only` set to `False`" -- the one
    advice that must never be given -- for every kind of global but one."""
    import shutil

    from dcml.contracts.errors import DcmlError
    from dcml.retrieval.api import Index, load_model

    marker = tmp_path / "PAYLOAD-RAN"
    bad = tmp_path / "evil.pt"
    _malicious(kind, bad, marker)
    out = tmp_path / "out"
    commands = {"evaluate --model": ["evaluate", "--model", bad, "--manifest", data["manifest"], "--out", out / "m.json"],
                "train --init": ["train", "--init", bad, "--manifest", data["manifest"], "--out", out / "m.pt"],
                "finetune --checkpoint": ["finetune", "--checkpoint", bad, "--manifest", data["manifest"],
                                          "--out", out / "m.pt"],
                "train --weights": ["train", "--weights", bad, "--backbone", "small_cnn", "--manifest",
                                    data["manifest"], "--out", out / "m.pt"]}
    if option in commands:
        code, err = dcml(capsys, *commands[option])
        assert code == 2
        line = one_line(err, str(bad))
    else:
        if option == "dcml.load_model":
            where = bad
        else:  # an index folder whose model.pt was swapped for the malicious file
            shutil.copytree(data["index"], tmp_path / "index")
            shutil.copyfile(bad, tmp_path / "index" / "model.pt")
            where = tmp_path / "index"
        with pytest.raises(DcmlError) as refused:
            load_model(where) if option == "dcml.load_model" else Index.open(where)
        line = str(refused.value)
    assert "refused: it holds pickled Python objects" in line and "re-save the weights as a plain state_dict" in line
    assert "weights_only" not in line and "torch.load" not in line and "\n" not in line
    assert not marker.exists()  # the payload never ran
    assert not out.exists()


def test_a_parquet_file_given_as_a_model_is_one_correct_line(capsys, data):
    from dcml.contracts.errors import DcmlError
    from dcml.retrieval.api import load_model

    with pytest.raises(DcmlError) as refused:
        load_model(data["manifest"])
    assert str(refused.value) == f"{data['manifest']}: not a readable checkpoint (a Parquet table, not a PyTorch " \
                                 "file); pass a model file written by dcml"
    code, err = dcml(capsys, "embed", "--model", data["manifest"], "--manifest", data["manifest"], "--out",
                     data["manifest"].parent / "never.parquet")
    assert code == 2
    one_line(err, "not a readable checkpoint (a Parquet table, not a PyTorch file)")


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


def test_a_launch_folder_left_by_a_killed_stage_is_removed_by_the_next_launch(tmp_path, monkeypatch):
    import tempfile

    from dcml import launch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"dcml-launch-{dead.pid}-abc"  # its stage command was killed with kill -9
    stale.mkdir()
    (stale / "result.json").write_text("{}")
    live = tmp_path / f"dcml-launch-{os.getppid()}-xyz"  # a stage command still running
    live.mkdir()
    foreign = tmp_path / "dcml-launch-tmpname"  # not named by a pid: not ours to judge
    foreign.mkdir()
    with launch.launch_folder() as tmp:
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(f"dcml-launch-{os.getpid()}-")
        assert not stale.exists() and live.is_dir() and foreign.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])


@pytest.mark.full
def test_kill_9_of_a_two_process_training_leaves_no_launch_folder_after_the_next_launch(tmp_path, data, monkeypatch):
    """A real `dcml train --nproc 2` killed with SIGKILL: its dcml-launch-<pid>-* folder (which nothing can
    remove at that moment) goes at the next launch."""
    import signal
    import sys
    import tempfile
    import time

    from dcml import launch

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    stage = subprocess.Popen([sys.executable, "-m", "dcml_app.cli", "train", "--manifest", str(data["manifest"]),
                              "--out", str(tmp_path / "m.pt"), "--epochs", "300", "--nproc", "2",
                              "--classes-per-batch", "2", "--images-per-class", "2", "--eval-every", "0",
                              *[f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()]],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list(tmp.glob(f"dcml-launch-{stage.pid}-*")):
        assert stage.poll() is None and time.monotonic() < deadline, "the training did not launch"
        time.sleep(0.2)
    time.sleep(3)  # the ranks are up
    stage.send_signal(signal.SIGKILL)
    stage.wait(timeout=30)
    assert list(tmp.glob(f"dcml-launch-{stage.pid}-*"))  # left behind: nobody could remove it
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with launch.launch_folder():
        pass
    assert not list(tmp.glob("dcml-launch-*"))


def test_a_training_leaves_no_lock_file(tmp_path, data):
    from components.train import stage

    stage.run(manifest=str(data["manifest"]), out=str(tmp_path / "m.pt"), epochs=1, classes_per_batch=2,
              images_per_class=2, eval_every=0, **MODEL)
    assert (tmp_path / "m.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no resume file, no lock file
