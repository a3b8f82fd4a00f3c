"""Index writes under attack: two writers at once (CLI and Python, real processes), a writer killed
with the lock held, a full disk while writing, and wrong widths / types / k in the Python API and
`dcml search` -- each one line (exit 2) or a DcmlError, never a lost update or a traceback.

Real faiss indexes of real Fashion-MNIST images (a random-weights small CNN embeds them).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.contracts.errors import DcmlError
from dcml.retrieval import index as index_lib
from dcml.retrieval import index_lock

ROOT = Path(__file__).resolve().parents[1]
# The in-process `dcml` runner and the one-line check of the other reliability tests (loaded by path: the suite
# imports with importlib), and the tiny Fashion-MNIST manifests they use.
_spec = importlib.util.spec_from_file_location("reliability_paths", Path(__file__).with_name("test_reliability_paths.py"))
_paths = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_paths)
dcml, one_line, fmnist_data = _paths.dcml, _paths.one_line, _paths.fmnist_data

MODEL = {"backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 8}
WAITING = "another process is writing this index; waiting"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A model, a gallery manifest (classes 6, 7: 8 images) and two manifests of new images (class 8, class 9)."""
    from dcml import stagekit
    from dcml.algorithm.models import build_model

    folder = tmp_path_factory.mktemp("index-data")
    torch.manual_seed(0)
    stagekit.write_output(folder / "model.pt", build_model(MODEL), {"stage": "test"})
    make = fmnist_data.make_manifest
    return {"model": folder / "model.pt",
            "gallery": make(folder / "gallery.parquet", per_class=2, train_classes=(0, 1), test_classes=(6, 7),
                            test_per_class=4),
            "new_a": make(folder / "a.parquet", per_class=2, train_classes=(0, 1), test_classes=(8,), test_per_class=5),
            "new_b": make(folder / "b.parquet", per_class=2, train_classes=(0, 1), test_classes=(9,), test_per_class=5)}


def build_index(data, out: Path) -> Path:
    from components.index import stage as index

    index.run(model=data["model"], manifest=data["gallery"], out=out, split="test")
    return out


def image_ids(manifest: Path) -> set[str]:
    from dcml.contracts import manifest as manifest_lib

    return set(manifest_lib.read(manifest).split("test")["image_id"].astype(str))


def wait_for(condition, what: str, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start_both_while_locked(index_dir: Path, commands: list[list[str]], tmp_path: Path):
    """Start ``commands`` while this process holds the index's write lock, wait until each says it waits
    for the lock (so both opened the index before either wrote it), then let them go; return their
    (exit status, stdout, stderr)."""
    lock = index_lock.WriteLock(index_dir).acquire()
    procs = []
    try:
        for n, cmd in enumerate(commands):
            out, err = open(tmp_path / f"out{n}", "w+"), open(tmp_path / f"err{n}", "w+")
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=err, env=env(), cwd=ROOT), out, err))
        wait_for(lambda: all(WAITING in Path(e.name).read_text() or p.poll() is not None for p, _, e in procs),
                 "both writers to wait for the lock")
    finally:
        lock.release()
    results = []
    for proc, out, err in procs:
        proc.wait(timeout=300)
        out.seek(0), err.seek(0)
        results.append((proc.returncode, out.read(), err.read()))
    return results


# -- two writers at once ------------------------------------------------------------------

@pytest.mark.slow
def test_two_cli_appends_at_once_keep_every_image(data, tmp_path):
    """Was: both exit 0, the final index holds one append's images only (the other's silently gone)."""
    out = build_index(data, tmp_path / "index")
    before = index_lib.GalleryIndex.open(out)
    dcml_cmd = [sys.executable, "-c", "from dcml_app.cli import main; main()", "index", "--append", "--out", str(out),
                "--split", "test", "--device", "cpu"]
    results = start_both_while_locked(out, [dcml_cmd + ["--manifest", str(data["new_a"])],
                                            dcml_cmd + ["--manifest", str(data["new_b"])]], tmp_path)
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert WAITING in stderr and "Traceback" not in stderr, stderr  # both really waited: they overlapped
    after = index_lib.GalleryIndex.open(out)
    held = set(after.items["image_id"])
    assert image_ids(data["new_a"]) <= held and image_ids(data["new_b"]) <= held
    assert len(after.items) == after.size == len(before.items) + 10
    assert sorted(after.items["id"]) == list(range(len(before.items) + 10))  # every id once, none lost
    # the second writer saw the first one's images (it read the folder again under the lock)
    said = sorted(re.search(r"(\d+) images \((\d+) added", stdout).groups() for _, stdout, _ in results)
    assert said == [("13", "5"), ("18", "5")]


@pytest.mark.slow
def test_two_fresh_builds_of_one_new_folder_at_once_keep_the_first_and_refuse_the_second(data, tmp_path):
    """Was: both passed the exists-check before either wrote, both exit 0 and the last one replaced the first."""
    out = tmp_path / "new-index"
    build = [sys.executable, "-c", "from dcml_app.cli import main; main()", "index", "--model", str(data["model"]),
             "--split", "test", "--device", "cpu", "--out", str(out)]
    results = start_both_while_locked(out, [build + ["--manifest", str(data["gallery"])],
                                            build + ["--manifest", str(data["new_a"])]], tmp_path)
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(stderr for code, _, stderr in results if code == 2)
    last = refused.strip().splitlines()[-1]
    assert WAITING in refused and "Traceback" not in refused
    assert last.startswith("error: ") and "another process wrote an index there while this one was built" in last
    written = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    held = set(index_lib.GalleryIndex.open(out).items["image_id"])
    assert held == image_ids((data["gallery"], data["new_a"])[written])  # the first one's index, whole


WRITER = """
import json, sys
import dcml
index = dcml.Index.open(sys.argv[1], device="cpu")
ids = index.add(manifest=sys.argv[2], split="test")
index.save()
print(json.dumps([int(i) for i in ids]))
"""


@pytest.mark.slow
def test_two_python_writers_at_once_get_different_ids_and_keep_every_image(data, tmp_path):
    """Was: both processes were handed ids 8..12 and one's images were lost."""
    out = build_index(data, tmp_path / "index")
    n = len(index_lib.GalleryIndex.open(out).items)
    script = [sys.executable, "-c", WRITER, str(out)]
    results = start_both_while_locked(out, [script + [str(data["new_a"])], script + [str(data["new_b"])]], tmp_path)
    handed = []
    for code, stdout, stderr in results:
        assert code == 0 and WAITING in stderr, stderr
        handed.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(handed[0] + handed[1]) == list(range(n, n + 10))  # no id handed out twice
    after = index_lib.GalleryIndex.open(out)
    assert image_ids(data["new_a"]) | image_ids(data["new_b"]) <= set(after.items["image_id"])
    for ids, manifest in zip(handed, (data["new_a"], data["new_b"])):
        assert set(after.items.set_index("id").loc[ids, "image_id"]) == image_ids(manifest)


def test_a_writer_killed_with_the_lock_held_leaves_no_stale_lock(data, tmp_path, monkeypatch):
    out = build_index(data, tmp_path / "index")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dcml.retrieval.index_lock import "
                               "WriteLock; held = WriteLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True, env=env())
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setenv(index_lock.WAIT_ENV, "0")  # no waiting: held or not, at once
    with pytest.raises(DcmlError, match="another process has been writing this index"):
        index_lock.WriteLock(out).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with index_lock.WriteLock(out) as lock:  # the kernel released the dead holder's lock: taken at once
        assert lock.held


def test_a_busy_index_is_one_line_when_the_wait_runs_out(capsys, data, tmp_path, monkeypatch):
    out = build_index(data, tmp_path / "index")
    monkeypatch.setenv(index_lock.WAIT_ENV, "0")
    with index_lock.WriteLock(out):
        code, err = dcml(capsys, "index", "--append", "--out", out, "--manifest", data["new_a"], "--split", "test")
    assert code == 2
    one_line(err, str(out), "another process has been writing this index", index_lock.WAIT_ENV)
    assert len(index_lib.GalleryIndex.open(out).items) == 8  # nothing added


# -- full disk -----------------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["append", "overwrite"])
def test_a_full_disk_while_writing_an_index_is_one_line_and_keeps_the_old_one(capsys, data, tmp_path,
                                                                              monkeypatch, how):
    """Was: 31 lines from faiss.write_index, exit 1."""
    out = build_index(data, tmp_path / "index")
    before = {name: (out / name).read_bytes() for name in ("index.faiss", "items.parquet", "index.json")}
    monkeypatch.setattr(index_lib, "_write_faiss", no_space)
    extra = ["--append"] if how == "append" else ["--overwrite", "--model", data["model"]]
    code, err = dcml(capsys, "index", "--out", out, "--manifest", data["new_a"], "--split", "test", *extra)
    assert code == 2
    one_line(err, str(out), "No space left on device", "free space", "the index there is unchanged")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name != ".index.lock") == ["index"]  # no temp folder


def test_a_full_disk_in_the_python_api_is_a_dcml_error_and_a_retry_saves(data, tmp_path, monkeypatch):
    import dcml

    out = build_index(data, tmp_path / "index")
    index = dcml.Index.open(out, device="cpu")
    ids = index.add(manifest=data["new_a"], split="test")
    with monkeypatch.context() as patched:
        patched.setattr(index_lib, "_write_faiss", no_space)
        with pytest.raises(DcmlError, match="No space left on device") as failed:
            index.save()
    assert "\n" not in str(failed.value) and str(out) in str(failed.value)
    assert len(index_lib.GalleryIndex.open(out).items) == 8  # the old index survived
    index.save()  # space again: the changes were kept
    assert set(index_lib.GalleryIndex.open(out).items["id"]) >= set(ids)


def test_a_real_full_disk_while_appending_is_one_line(capsys, data, tmp_path):
    """A real 1 MiB tmpfs that the index fits on but an append's new copy does not (skipped where mounting
    is not allowed; the injected tests above cover it there)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs mount rights)")
    try:
        out = build_index(data, disk / "index")
        before = (out / "index.json").read_bytes()
        with open(disk / "filler", "wb") as f:  # leave less room than the index's own copy needs
            f.write(b"\0" * max(0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 64 * 1024))
        code, err = dcml(capsys, "index", "--append", "--out", out, "--manifest", data["new_a"], "--split", "test")
        assert code == 2
        one_line(err, str(out), "No space left on device", "the index there is unchanged")
        assert (out / "index.json").read_bytes() == before
        assert len(index_lib.GalleryIndex.open(out).items) == 8
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- the Python API's inputs and `dcml search --k` ------------------------------------------

def test_wrong_widths_and_types_in_the_python_api_are_dcml_errors(data, tmp_path):
    """Was: a bare AssertionError (faiss) and a TypeError."""
    import dcml

    index = dcml.Index.open(build_index(data, tmp_path / "index"), device="cpu")
    with pytest.raises(DcmlError, match=r"holds 8-d vectors, the queries are 5-d; embed them with the index's model"):
        index.search_vectors(np.ones((1, 5), np.float32))
    with pytest.raises(DcmlError, match="is a numpy.ndarray; pass PIL images, image files or folders"):
        index.add([np.ones((28, 28), np.uint8)])
    with pytest.raises(DcmlError, match="is a numpy.ndarray"):
        index.search([np.ones((28, 28), np.uint8)])
    assert len(index) == 8 and index.search_vectors(np.ones((2, 8), np.float32), k=3)["rank"].tolist() == [1, 2, 3] * 2


@pytest.mark.parametrize("k", ["0", "-1", "100000"])
def test_search_with_a_k_out_of_range_is_one_line(capsys, data, tmp_path, k):
    """Was: click's 4-line usage block."""
    code, err = dcml(capsys, "search", "--index", tmp_path / "none", "--image", data["model"], "--k", k)
    assert code == 2
    one_line(err, "--k", k, "dcml search --help")
