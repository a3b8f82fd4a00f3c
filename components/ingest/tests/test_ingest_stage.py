"""`dcml ingest`: manifests on success; one-line errors and no output on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.ingest import stage
from dcml.contracts import manifest
from dcml_app.cli import main
from data_prep import synthetic

REPO = Path(__file__).resolve().parents[3]
CARS = {1: 3, 2: 2, 99: 2, 100: 3}


def dcml(capsys, *args):
    """Run the `dcml` command in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_fails(capsys, out: Path, *args, match: str | list[str]):
    code, _, err = dcml(capsys, "ingest", *args, "--out", out)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    for needle in [match] if isinstance(match, str) else match:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp file left
    return err


# -- success ---------------------------------------------------------------

def test_ingest_writes_a_manifest_with_its_record(tmp_path, capsys):
    root = synthetic.cars196_folders(tmp_path / "cars", CARS)
    out = tmp_path / "out" / "manifest.parquet"
    code, stdout, err = dcml(capsys, "ingest", "--dataset", "cars196", "--root", root, "--out", out, "--check-images")
    assert code == 0, err
    assert stdout.strip() == (f"ingest cars196 (official): 10 images, 4 classes "
                              f"[train 5 images / 2 classes, test 5 images / 2 classes] -> {out}")
    m = manifest.read(out)
    assert len(m.df) == 10 and m.dataset == "cars196" and m.root == root
    assert m.meta["split_mode"] == "official" and m.meta["schema_version"] == manifest.SCHEMA_VERSION
    record = m.meta["record"]
    assert record["stage"] == "ingest"
    assert record["params"] == {"dataset": "cars196", "root": str(root), "split_mode": "official",
                                "check_images": True, "max_per_class": None, "val_fraction": 0.15}
    assert record["metrics"] == {"images": 10, "classes": 4, "train_images": 5, "test_images": 5,
                                 "train_classes": 2, "test_classes": 2}
    assert record["extra"]["fingerprint"] == m.meta["fingerprint"]


def test_run_returns_the_stored_record_and_honours_options(tmp_path):
    root = synthetic.vehicleid(tmp_path / "vid", train={1: 3, 2: 3}, tests={800: {7: 2}, 1600: {7: 2, 8: 4}})
    out = tmp_path / "vid.parquet"
    record = stage.run(dataset="vehicleid", out=out, root=root, max_per_class=2, vehicleid_test_size=1600)
    assert manifest.read(out).meta["record"] == record
    assert record["params"]["vehicleid_test_size"] == 1600
    assert record["metrics"]["train_images"] == 4 and record["metrics"]["test_images"] == 4


def test_folder_defaults_to_class_disjoint(tmp_path, capsys):
    root = synthetic.folder(tmp_path / "f", {"a": 2, "b": 2, "c": 2, "d": 2})
    out = tmp_path / "f.parquet"
    code, stdout, err = dcml(capsys, "ingest", "--dataset", "folder", "--root", root, "--out", out)
    assert code == 0, err
    df = manifest.read(out).df
    assert set(df.loc[df["split"] == "train", "class_name"]) == {"a", "b"}
    assert "ingest folder (class-disjoint)" in stdout


def test_console_script_end_to_end(tmp_path):
    synthetic.fashion_mnist(tmp_path / "fm")
    out = tmp_path / "fm.parquet"
    dcml_bin = Path(sys.executable).parent / "dcml"
    done = subprocess.run([dcml_bin, "ingest", "--dataset", "fashion-mnist", "--root", tmp_path / "fm", "--out", out,
                           "--split-mode", "class-disjoint", "--max-per-class", "3", "--check-images"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "train 15 images / 5 classes, test 15 images / 5 classes" in done.stdout
    done = subprocess.run([dcml_bin, "ingest", "--dataset", "fashion-mnist", "--root", tmp_path / "nope",
                           "--out", tmp_path / "x.parquet"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "does not exist" in done.stderr
    assert not (tmp_path / "x.parquet").exists()


# -- errors: one line naming the file and the fix, exit 2, nothing written ---

def test_error_missing_root(tmp_path, capsys):
    assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "cub200", "--root", tmp_path / "nowhere",
                 match=[f"{tmp_path / 'nowhere'}: dataset root does not exist", "pass --root"])


def test_error_unrecognised_layout(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "cars196", "--root", tmp_path / "data",
                 match=[f"{tmp_path / 'data'}: not a recognised cars196 layout", "cars_annos.mat", "point --root"])


def test_error_listed_file_missing(tmp_path, capsys):
    root = synthetic.cub200(tmp_path / "cub", {1: 2, 101: 3})
    victim = next((root / "images" / "101.Bird_101").iterdir())
    victim.unlink()
    assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "cub200", "--root", root,
                 match=[f"{victim}: listed in {root / 'images.txt'} but missing", "restore the file or remove it"])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_error_corrupt_image_with_check_images(tmp_path, capsys, damage):
    root = synthetic.cars196_folders(tmp_path / "cars", CARS)
    victim = sorted((root / "099.Make_Model_099_2012").iterdir())[1]
    synthetic.write_image(victim, seed=1, size=(64, 48))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"this is not a jpeg" * 10)
    out = tmp_path / "m.parquet"
    assert_fails(capsys, out, "--dataset", "cars196", "--root", root, "--check-images",
                 match=[f"{victim}: corrupt or truncated image", "replace the file or remove it"])
    # Without --check-images the damage goes unnoticed: the option is what catches it.
    code, _, err = dcml(capsys, "ingest", "--dataset", "cars196", "--root", root, "--out", out)
    assert code == 0, err


def test_error_class_with_one_image(tmp_path, capsys):
    root = synthetic.cars196_folders(tmp_path / "cars", {1: 1, 2: 2, 99: 2, 100: 2})
    assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "cars196", "--root", root,
                 match=[f"{root / '001.Make_Model_001_2012'}: class 'Make_Model_001_2012' (label 1) has 1 image "
                        "in split 'train'", "at least 2 images per split"])


def test_error_class_with_one_image_in_annotation_dataset(tmp_path, capsys):
    root = synthetic.sop(tmp_path / "sop", train={1: 2, 2: 2}, test={3: 2, 4: 1})
    assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "sop", "--root", root,
                 match=[f"{root / 'Ebay_test.txt'}: class 'bicycle_4' (label 4) has 1 image in split 'test'",
                        "add images or remove the class"])


def test_error_path_escapes_root_with_dotdot(tmp_path, capsys):
    root = synthetic.sop(tmp_path / "sop", train={1: 2, 2: 2}, test={3: 2, 4: 2})
    synthetic.write_image(tmp_path / "secret.jpg", 0)
    with open(root / "Ebay_train.txt", "a") as f:
        f.write("99 2 1 ../secret.jpg\n")
    assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "sop", "--root", root,
                 match=[f"{root / 'Ebay_train.txt'}: path '../secret.jpg' escapes the dataset root",
                        "list image paths relative to"])


def test_error_absolute_path_in_annotations(tmp_path, capsys):
    root = synthetic.cub200(tmp_path / "cub", {1: 2, 101: 2})
    outside = synthetic.write_image(tmp_path / "elsewhere" / "x.jpg", 0)
    with open(root / "images.txt", "a") as f:
        f.write(f"5 {outside}\n")
    with open(root / "image_class_labels.txt", "a") as f:
        f.write("5 1\n")
    assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "cub200", "--root", root,
                 match=[f"{root / 'images.txt'}: path '{outside}' escapes the dataset root"])


@pytest.mark.parametrize("what", ["file", "class folder"])
def test_error_symlink_resolving_outside_root(tmp_path, capsys, what):
    root = synthetic.folder(tmp_path / "f", {"a": 2, "b": 2})
    outside = synthetic.folder(tmp_path / "outside", {"c": 2})
    if what == "file":
        link = root / "a" / "stolen.png"
        link.symlink_to(outside / "c" / "000.png")
    else:
        link = root / "c"
        link.symlink_to(outside / "c", target_is_directory=True)
    err = assert_fails(capsys, tmp_path / "m.parquet", "--dataset", "folder", "--root", root,
                       match=[f"{link}:", f"outside the dataset root {root}", "copy the"])
    assert os.path.realpath(outside) in err


def test_failed_ingest_keeps_an_existing_manifest(tmp_path, capsys):
    root = synthetic.cars196_folders(tmp_path / "cars", CARS)
    out = tmp_path / "m.parquet"
    assert dcml(capsys, "ingest", "--dataset", "cars196", "--root", root, "--out", out)[0] == 0
    before = out.read_bytes()
    (root / "077.Lonely").mkdir()
    synthetic.write_image(root / "077.Lonely" / "x.jpg", 0)
    code, _, err = dcml(capsys, "ingest", "--dataset", "cars196", "--root", root, "--out", out)
    assert code == 2 and "class 'Lonely' (label 77) has 1 image" in err
    assert out.read_bytes() == before


def test_bad_options_are_usage_errors(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    code, _, err = dcml(capsys, "ingest", "--dataset", "cars196", "--root", tmp_path, "--out", out,
                        "--max-per-class", "1")
    assert code == 2 and "--max-per-class" in err and not out.exists()
    code, _, err = dcml(capsys, "ingest", "--dataset", "imagenet", "--root", tmp_path, "--out", out)
    assert code == 2 and "unknown dataset; use one of fashion-mnist, cars196" in err and not out.exists()
