"""The Python API (dcml.load_model, dcml.Index) and the commands on it: `dcml embed`, `dcml search --folder`,
`dcml index --remove / --overwrite`; removal with every index type; device flags checked up front."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dcml
from dcml.algorithm.inference import compute_vectors
from dcml.contracts import manifest as manifest_lib
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_vectors
from dcml.model_files import load_model
from dcml.retrieval import index as index_lib
from dcml_app.cli import main as dcml_main

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "gallery_data", REPO / "components" / "index" / "tests" / "gallery_data.py")
gallery_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery_data)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """(JPEG-file manifest, small_cnn checkpoint, its index folder)."""
    return gallery_data.indexed_jpeg_gallery(tmp_path_factory.mktemp("api"))


def files_of(manifest) -> list[Path]:
    man = manifest_lib.read(manifest)
    return [man.root / p for p in man.df["path"]]


def queries_folder(tmp_path, files, bad=True) -> Path:
    """A folder of query images: 2 at the top, 2 in a subfolder, and (``bad``) a broken file in each."""
    folder = tmp_path / "queries"
    (folder / "sub").mkdir(parents=True)
    for f in files[:2]:
        shutil.copy(f, folder / f.name)
    for f in files[2:4]:
        shutil.copy(f, folder / "sub" / f.name)
    if bad:
        (folder / "broken.jpg").write_text("not a picture")
        (folder / "sub" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def test_import_dcml_stays_light():
    code = "import sys, dcml; print(json.dumps([m in sys.modules for m in ('torch', 'faiss', 'pandas')]))"
    done = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout) == [False, False, False], done.stderr
    assert {"load_model", "Index", "Model", "DcmlError"} <= set(dcml.__all__)
    assert dcml.DcmlError is DcmlError
    with pytest.raises(AttributeError):
        dcml.nothing_here
    # dir() (tab completion) offers the public API, every name of it there
    public = [name for name in dir(dcml) if not name.startswith("_")]
    assert public == sorted(n for n in dcml.__all__ if not n.startswith("_")), public
    assert all(getattr(dcml, name) is not None for name in dcml.__all__)
    import dcml_app

    assert {"train", "Trained"} <= set(dir(dcml_app))


# Resident memory after a 64 MiB bytes object is made and freed: glibc hands a buffer that large back to the
# kernel unless its mmap/trim thresholds were raised (what a stage process does, dcml.stagekit.stage_process).
_KEPT_AFTER_FREE = """
import json, logging, os, threading
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def kept():
    before = rss(); buffer = b"x" * (64 << 20); del buffer
    return (rss() - before) / (1 << 20)
threads, faiss_level = threading.active_count(), logging.getLogger("faiss.loader").level
import dcml
out = {"import": kept(), "threads": threading.active_count() - threads,
       "faiss_level": logging.getLogger("faiss.loader").level - faiss_level}
from dcml import stagekit
stagekit.stage_process()
out["stage"] = kept()
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_import_dcml_changes_no_process_setting_but_a_stage_process_keeps_its_buffers():
    done = subprocess.run([sys.executable, "-c", _KEPT_AFTER_FREE], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["threads"] == 0 and out["faiss_level"] == 0  # no watcher thread, no logger touched
    assert out["import"] < 16, out  # freed: glibc's default thresholds still hold after `import dcml`
    assert out["stage"] > 48, out  # kept in the heap for the next batch once a stage process asks for it


def test_long_embeds_draw_a_progress_bar_on_a_terminal_only(jpegs, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    manifest, model_file, _ = jpegs
    files = [str(f) for f in files_of(manifest)]  # 40 images: two batches
    code = ("import sys, dcml; m = dcml.load_model(sys.argv[1]); v = m.embed(sys.argv[2:]); "
            "m.embed(sys.argv[2:4]); print(v.shape)")
    command = [sys.executable, "-c", code, str(model_file), *files]
    piped = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == "(40, 16)" and "embed 40 images" not in piped.stderr  # a pipe: quiet
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        shown = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=side, timeout=300)
        os.close(side)
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 1 << 16)
            except OSError:  # the terminal's other side is closed and everything read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(main)
    assert shown.returncode == 0, drawn
    text = drawn.decode("utf-8", "replace")
    assert "embed 40 images:" in text and "0/2" in text, text  # a tqdm bar over the 2 batches (cleared after)
    assert text.count("embed ") == text.count("embed 40 images")  # two images (one batch): no bar


def test_model_embeds_images_files_and_folders_like_the_pipeline(jpegs, tmp_path):
    manifest, model_file, _ = jpegs
    model = dcml.load_model(model_file)
    files = files_of(manifest)
    vectors = model.embed(files)
    # The pipeline's own embeddings (a DataLoader over the manifest), unit length.
    net, _ = load_model(model_file)
    reference = compute_vectors(net, manifest_lib.read(manifest), manifest_lib.read(manifest).df)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert vectors.shape == (40, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    # A folder (subfolders included, sorted), a single PIL image, unnormalised output.
    folder = queries_folder(tmp_path, files, bad=False)
    in_folder = model.embed(folder)
    order = [files[0], files[1], files[2], files[3]]  # sorted: top-level names < "sub/..."
    np.testing.assert_allclose(in_folder, model.embed(order), atol=1e-6)
    from PIL import Image

    # A PIL image is taken as decoded (no JPEG draft step, unlike a file): close, not identical.
    assert float(model.embed(Image.open(files[5]))[0] @ vectors[5]) > 0.99
    raw = model.embed(files[:3], normalize=False)
    assert np.allclose(np.linalg.norm(raw, axis=1), np.sqrt(2), atol=1e-4)  # 2 unit-norm slices
    # Bad input: DcmlError from embed; embed_files skips and reports.
    with pytest.raises(DcmlError, match="not an image"):
        model.embed(queries_folder(tmp_path / "b", files))
    done = model.embed_files(queries_folder(tmp_path / "c", files))
    assert len(done.paths) == 4 and done.vectors.shape == (4, 16) and len(done.failed) == 2
    assert {Path(p).name for p, _ in done.failed} == {"broken.jpg", "cut.png"}


def test_index_build_search_add_remove_save_open(jpegs, tmp_path, capsys):
    manifest, model_file, _ = jpegs
    files = files_of(manifest)
    man = manifest_lib.read(manifest)
    first = tmp_path / "first.parquet"
    manifest_lib.write(first, man.df.head(30), man.meta)
    model = dcml.load_model(model_file)
    index = dcml.Index.build(model, manifest=first, path=tmp_path / "idx")
    assert len(index) == 30 and index.threshold is None  # no 'val' split: no match threshold
    hits = index.search([files[0], files[12]], k=3)
    assert isinstance(hits, pd.DataFrame) and len(hits) == 6
    assert list(hits.columns) == ["query", "rank", "id", "image_id", "label", "class_name", "score", "match", "path",
                                  "threshold", "false_match_rate", "true_match_rate"]
    assert hits[["threshold", "false_match_rate", "true_match_rate"]].isna().all().all()  # no threshold, no rates
    top = hits[hits["rank"] == 1]
    assert list(top["id"]) == [0, 12] and np.allclose(top["score"], 1.0, atol=1e-5)
    assert list(top["query"]) == [str(files[0]), str(files[12])] and top["match"].isna().all()
    # Add the rest by file, remove two, save, open again: ids are stable and never reused.
    new_ids = index.add(files[30:])
    assert list(new_ids) == list(range(30, 40)) and len(index) == 40
    assert index.remove([3, 31]) == 2 and len(index) == 38
    with pytest.raises(DcmlError, match="no item with id 3"):
        index.remove([3])
    index.save()
    again = dcml.Index.open(tmp_path / "idx")
    assert len(again) == 38 and set(again.items["id"]) == set(range(40)) - {3, 31}
    assert list(again.add(files[3:4])) == [40]  # a removed id is not given again
    found = again.search(files[31], k=38)
    assert 31 not in set(found["id"]) and len(found) == 38
    assert again.search(files[35], k=1)["id"].tolist() == [35]
    # The command line answers from the same implementation: same ids and scores.
    dcml_main(["search", "--index", str(tmp_path / "idx"), "--image", str(files[7]), "--k", "5", "--format", "json"])
    cli = json.loads(capsys.readouterr().out)[0]["neighbours"]
    api = dcml.Index.open(tmp_path / "idx").search(files[7], k=5)
    assert [h["id"] for h in cli] == api["id"].tolist()
    np.testing.assert_allclose([h["score"] for h in cli], api["score"], atol=1e-6)
    with pytest.raises(DcmlError, match="k=0: must be a whole number from 1 to 1000"):
        api_index = dcml.Index.open(tmp_path / "idx")
        api_index.search(files[7], k=0)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_removed_ids_are_gone_for_every_index_type_and_stay_gone_on_disk(tmp_path, kind, jpegs):
    _, model_file, _ = jpegs
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    x = index_lib.normalized(centres[np.arange(2000) % 40] + 0.2 * rng.standard_normal((2000, 16)))
    faiss_index, info = index_lib.build(x, kind, target_recall=0.95)
    items = pd.DataFrame({"id": np.arange(2000), "image_id": [f"v{i}" for i in range(2000)], "path": None,
                          "image_bytes": None, "label": np.arange(2000) % 40, "class_name": "c", "split": "gallery"})
    meta = {"type": kind, "dim": 16, "search": {n: info[n] for n in ("nprobe", "efSearch") if n in info},
            "recall@10": info["recall@10"], "exact": info["exact"], "build": info,
            "model": {"sha256": index_lib.file_sha256(model_file)}}
    gallery = index_lib.GalleryIndex(tmp_path / "g", faiss_index, items, meta)
    gone = np.arange(0, 2000, 7)
    assert gallery.remove(gone) == len(gone) and gallery.size == 2000 - len(gone)
    index_lib.write(tmp_path / "g", gallery.index, gallery.items, gallery.meta, model_file)
    opened = index_lib.GalleryIndex.open(tmp_path / "g")
    assert opened.mapped == (kind == "ivfpq")  # the compressed index reads its exact vectors from the file
    ids, vectors = index_lib.contents(opened.index)
    assert opened.size == 2000 - len(gone) and not np.isin(ids, gone).any()
    np.testing.assert_allclose(vectors, x[ids], atol=1e-6)  # each id still holds its own vector
    hits = opened.search(x[gone[:50]], 10)
    assert all(h["id"] not in set(gone) for row in hits for h in row)
    kept = np.setdiff1d(np.arange(2000), gone)[:50]
    assert np.mean([row[0]["id"] == i for row, i in zip(opened.search(x[kept], 1), kept)]) >= 0.9
    new = opened.add(x[:3], items.head(3).drop(columns="id"))  # a mapped index is read in first
    assert list(new) == [2000, 2001, 2002] and not opened.mapped
    top = [row[0]["id"] for row in opened.search(x[:3], 1)]  # a vector held twice: either copy (0 was removed)
    assert top[0] == 2000 and top[1] in (1, 2001) and top[2] in (2, 2002)
    assert opened.meta["next_id"] == 2003


def test_cli_search_folder_skips_bad_files_recurses_and_writes_csv_or_jsonl(jpegs, tmp_path, capsys):
    manifest, _, index = jpegs
    files = files_of(manifest)
    folder = queries_folder(tmp_path, files)
    dcml_main(["search", "--index", str(index), "--folder", str(folder), "--k", "2", "--out", str(tmp_path / "r.csv")])
    captured = capsys.readouterr()
    assert captured.out.count("query: ") == 4 and "sub/" in captured.out  # the subfolder's images too
    assert "skipped 2 of 6 query files that could not be read" in captured.err
    assert "broken.jpg: not an image" in captured.err and "cut.png" in captured.err
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == 8 and list(table.columns[:3]) == ["query", "rank", "id"]
    top = table[table["rank"] == 1]
    assert [Path(q).name for q in top["query"]] == [f.name for f in files[:4]] and list(top["id"]) == [0, 1, 2, 3]
    assert top["path"].tolist() == [str(f) for f in files[:4]]
    # The table shows image_id and path in their own columns (never one for the other).
    assert "image_id" in captured.out and str(files[0]) in captured.out
    dcml_main(["search", "--index", str(index), "--folder", str(folder), "--no-recursive", "--k", "1",
               "--out", str(tmp_path / "r.jsonl"), "--format", "json"])
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and "match" in rows[0]
    capsys.readouterr()
    # --strict stops at the first bad file; all bad is exit 2; a wrong --out suffix before any work.
    for args, message in [(["--folder", str(folder), "--strict"], "broken.jpg: not an image"),
                          (["--image", str(folder / "broken.jpg"), "--image", str(folder / "sub" / "cut.png")],
                           "all 2 query files failed"),
                          (["--folder", str(folder), "--out", str(tmp_path / "r.txt")], "must end in .csv or .jsonl")]:
        with pytest.raises(SystemExit) as done:
            dcml_main(["search", "--index", str(index)] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "r.txt").exists()


def test_cli_embed_writes_vectors_and_reports_bad_files(jpegs, tmp_path, capsys):
    manifest, model_file, index = jpegs
    files = files_of(manifest)
    folder = queries_folder(tmp_path, files)
    out = tmp_path / "vectors.parquet"
    dcml_main(["embed", "--model", str(model_file), "--folder", str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert f"wrote {out}: 4 embeddings of 16 dimensions (2 images skipped)" in captured.out
    assert "skipped 2 of 6 images" in captured.err
    table, vectors, meta = read_vectors(out)
    assert list(table["id"]) == [0, 1, 2, 3] and list(table["image_id"])[2] == f"sub/{files[2].name}"
    np.testing.assert_allclose(vectors, dcml.load_model(model_file).embed(files[:4]), atol=1e-6)
    assert meta["normalized"] is True and len(meta["skipped"]) == 2
    # A manifest, with the index's model: every image, with its labels.
    dcml_main(["embed", "--index", str(index), "--manifest", str(manifest), "--out", str(tmp_path / "m.parquet")])
    table, vectors, _ = read_vectors(tmp_path / "m.parquet")
    man = manifest_lib.read(manifest)
    assert list(table["image_id"]) == list(man.df["image_id"]) and list(table["label"]) == list(man.df["label"])
    np.testing.assert_allclose(vectors, index_lib.stored_vectors(index_lib.GalleryIndex.open(index).index),
                               atol=1e-5)
    capsys.readouterr()
    for args, message in [(["--folder", str(folder), "--strict"], "not an image"),
                          (["--image", str(folder / "broken.jpg")], "broken.jpg: not an image"),
                          (["--folder", str(folder), "--manifest", str(manifest)], "one of --folder DIR")]:
        with pytest.raises(SystemExit) as done:
            dcml_main(["embed", "--model", str(model_file), "--out", str(tmp_path / "bad.parquet")] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and message in err[-1] and err[-1].startswith("error: "), err
        assert not (tmp_path / "bad.parquet").exists()


def test_index_out_existing_needs_append_or_overwrite_and_remove_persists(jpegs, tmp_path, capsys):
    manifest, model_file, _ = jpegs
    out = tmp_path / "idx"
    args = ["index", "--model", str(model_file), "--manifest", str(manifest), "--out", str(out)]
    dcml_main(args)
    before = (out / "index.json").read_text()
    with pytest.raises(SystemExit) as done:
        dcml_main(args)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and "\n" not in err and err == (
        f"error: {out}: already exists; pass --append to add images to it, --remove ID to take items out, "
        f"or --overwrite to replace it (`dcml threshold --index {out} --false-match-rate RATE` changes only the "
        "match threshold, nothing re-embedded)")
    assert (out / "index.json").read_text() == before
    dcml_main(args + ["--overwrite"])
    assert "40 images (40 added)" in capsys.readouterr().out
    dcml_main(["index", "--out", str(out), "--remove", "5", "--remove", "6"])
    assert "38 images (0 added, 2 removed)" in capsys.readouterr().out
    opened = index_lib.GalleryIndex.open(out)
    assert opened.size == 38 and not {5, 6} & set(opened.items["id"]) and opened.meta["removed"] == [5, 6]
    # Appending the manifest again re-adds the removed images under new ids.
    dcml_main(["index", "--manifest", str(manifest), "--out", str(out), "--append"])
    again = index_lib.GalleryIndex.open(out)
    assert again.size == 40 and set(again.items["id"]) == (set(range(40)) - {5, 6}) | {40, 41}


@pytest.mark.parametrize("command", ["index", "search", "embed", "serve", "evaluate", "extract"])
@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_a_device_this_machine_lacks_is_one_line_before_any_work(jpegs, tmp_path, capsys, command, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    manifest, model_file, index = jpegs
    out = tmp_path / "out"
    args = {"index": ["--model", str(model_file), "--manifest", str(manifest), "--out", str(out)],
            "search": ["--index", str(index), "--image", str(files_of(manifest)[0])],
            "embed": ["--model", str(model_file), "--folder", str(files_of(manifest)[0].parent),
                      "--out", str(out) + ".parquet"],
            "serve": ["--index", str(index), "--port", "1"],
            "evaluate": ["--model", str(model_file), "--manifest", str(manifest), "--out", str(out) + ".json"],
            "extract": ["--manifest", str(manifest), "--out", str(out) + ".parquet", "--split", "test"]}[command]
    with pytest.raises(SystemExit) as done:
        dcml_main([command, *args, "--device", device])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert done.value.code == 2 and "\n" not in err and err.startswith(f"error: --device {device}: "), err
    assert ("no CUDA GPU" if device == "cuda" else "not a device; use cpu, cuda or cuda:N") in err
    assert captured.out == "" and not list(tmp_path.iterdir())


def test_an_index_folder_of_the_first_format_opens_and_is_saved_in_the_current_one(jpegs, tmp_path):
    import faiss

    _, model_file, index = jpegs
    current = index_lib.GalleryIndex.open(index)
    ids, vectors = index_lib.contents(current.index)
    old = tmp_path / "old-index"
    shutil.copytree(index, old)
    plain = faiss.IndexFlatIP(vectors.shape[1])  # what dcml.index/1 wrote: positions are the ids
    plain.add(vectors[np.argsort(ids)])
    faiss.write_index(plain, str(old / "index.faiss"))
    meta = json.loads((old / "index.json").read_text())
    meta["format"] = "dcml.index/1"
    meta.pop("next_id", None)
    (old / "index.json").write_text(json.dumps(meta))
    opened = dcml.Index.open(old)
    assert len(opened) == 40 and opened.search(files_of(jpegs[0])[9], k=1)["id"].tolist() == [9]
    opened.remove([9])
    opened.save()
    assert json.loads((old / "index.json").read_text())["format"] == "dcml.index/2"
    again = dcml.Index.open(old)
    assert len(again) == 39 and 9 not in set(again.items["id"]) and again.gallery.next_id == 40


def test_index_of_image_files_with_labels_and_a_threshold_from_labelled_images(jpegs, tmp_path):
    manifest, model_file, _ = jpegs
    files = files_of(manifest)
    labels = manifest_lib.read(manifest).df["label"].tolist()
    model = dcml.load_model(model_file)
    index = dcml.Index.build(model, files[:20], labels=labels[:20])
    assert list(index.items["path"]) == [str(f.resolve()) for f in files[:20]]
    assert list(index.items["label"]) == labels[:20] and list(index.items["class_name"]) == [f.parent.name
                                                                                               for f in files[:20]]
    with pytest.raises(DcmlError, match="built without path="):
        index.save()
    entry = index.choose_threshold(files[20:], labels=labels[20:], false_match_rate=0.05)
    assert index.threshold == entry["threshold"] and entry["impostor_pairs"] == 100  # 2 classes of 10 images
    hits = index.search(files[:2], k=20)
    assert (hits["match"] == (hits["score"] >= entry["threshold"] - 1e-6)).all()
    saved = index.save(tmp_path / "from-files")
    assert dcml.Index.open(saved).threshold == entry["threshold"]


@pytest.mark.slow
def test_train_from_python_returns_the_delivered_model_and_its_metrics(tiny_pipeline, tmp_path, capsys):
    import dcml_app
    from dcml.contracts import records

    # The shared run's cache serves every stage but tracking: the same run, from Python.
    shutil.copytree(tiny_pipeline.output_dir / "cache", tmp_path / "runs" / "cache")
    trained = dcml_app.train(dict(tiny_pipeline.args), output_dir=tmp_path / "runs",
                             tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert trained.metrics == tiny_pipeline.result["metrics"]
    assert "evaluate" in capsys.readouterr().out  # one line per stage, as `dcml run` prints
    # the delivered model is the one the final evaluation scored (shared mode: the fine-tuned one)
    evaluated = records.read(trained.summary["metrics_file"])["inputs"]["model"]
    delivered = records.read(trained.model_path)
    assert delivered["exec_id"] == evaluated["exec_id"] and delivered["stage"] == "finetune"
    assert trained.model_path.is_relative_to(trained.run_dir)
    assert trained.model.dim == tiny_pipeline.args["embedding_dim"]
    assert trained.mlflow["mlflow_run_id"] and trained.mlflow["tracking_uri"].endswith("mlflow.db")
    # bad parameters: one line before any stage runs, nothing written
    with pytest.raises(DcmlError, match=r"epochs"):
        dcml_app.train("demo", epochs=-1, output_dir=tmp_path / "bad")
    with pytest.raises(DcmlError, match=r"unknown parameter\(s\) epoch\b"):
        dcml_app.train({"epoch": 3}, output_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

