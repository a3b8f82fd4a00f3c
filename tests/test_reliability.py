"""What `dcml run` guarantees, replayed as a user would break it (real pipeline runs, real processes).

- the cache never serves stale data: changed image bytes (same name and size)
  re-run ingestion and everything after it; a deleted or changed file in a
  cached output re-runs that stage; unchanged data is served from the cache;
- bad input is one line and exit status 2, before anything runs.

A killed run's resume: tests/test_kill_resume.py; three runs at once:
tests/test_concurrent_runs.py (their own modules, so pytest-xdist runs them
beside these).
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcml.contracts.io import read_parquet_meta

pytestmark = pytest.mark.slow  # whole runs in processes: `make test` starts this module first

_spec = importlib.util.spec_from_file_location("cli_runs", Path(__file__).with_name("cli_runs.py"))
cli_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_runs)
DCML, bmp_dataset, dcml_run, statuses, tiny_config = (cli_runs.DCML, cli_runs.bmp_dataset, cli_runs.dcml_run,
                                                      cli_runs.statuses, cli_runs.tiny_config)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return bmp_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def cached(data, tmp_path_factory):
    """(work folder, output folder, summary, stdout, its manifest's fingerprint) of a first run
    whose output folder (and so cache) the next tests run in again."""
    tmp = tmp_path_factory.mktemp("cache")
    first, stdout = dcml_run(tmp, tiny_config(data), tmp / "runs")
    fingerprint = read_parquet_meta(Path(first["run_dir"]) / "ingest" / "manifest" / "manifest.parquet")["fingerprint"]
    return tmp, tmp / "runs", first, stdout, fingerprint


def test_unchanged_data_is_served_from_the_cache_and_a_damaged_cached_output_is_not(data, cached):
    tmp, out, first, stdout, _ = cached
    assert set(statuses(first).values()) == {"ok"}
    assert len(stdout.splitlines()) < 30 and "executor" not in stdout  # quiet: one line per stage
    again, _ = dcml_run(tmp, tiny_config(data), out)
    assert {k: v for k, v in statuses(again).items() if k != "track"} == {
        k: "cached" for k in statuses(first) if k != "track"}

    (Path(first["run_dir"]) / "ingest" / "manifest" / "manifest.parquet").unlink()
    clusters = Path(first["run_dir"]) / "cluster" / "clusters" / "clusters.parquet"
    clusters.write_bytes(clusters.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    damaged, _ = dcml_run(tmp, tiny_config(data), out)
    states = statuses(damaged)
    assert states["ingest"] == "ok" and states["cluster"] == "ok", states


def test_changed_bytes_rerun_everything(data, cached):
    tmp, out, _, _, fingerprint = cached
    # Same name, same size, other bytes.
    victim = data / "class0" / "00.bmp"
    size = victim.stat().st_size
    pixels = np.array(Image.open(victim))
    Image.fromarray(255 - pixels, mode="L").save(victim)
    assert victim.stat().st_size == size
    changed, _ = dcml_run(tmp, tiny_config(data), out)
    assert all(status == "ok" for status in statuses(changed).values()), statuses(changed)
    manifest = Path(changed["run_dir"]) / "ingest" / "manifest" / "manifest.parquet"
    assert read_parquet_meta(manifest)["fingerprint"] != fingerprint


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
