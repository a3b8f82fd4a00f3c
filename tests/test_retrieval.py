"""dcml.retrieval and its commands: approximate recall, `dcml search`, `dcml index --folder`, `dcml export`,
retrieval pictures."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcml
from components.evaluate.stage import run as evaluate
from dcml.algorithm.data import ManifestImageDataset, build_transform
from dcml.algorithm.inference import compute_vectors
from dcml.contracts import manifest as manifest_lib
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import read_vectors
from dcml.model_files import load_model
from dcml.retrieval import index as index_lib
from dcml.retrieval import pictures
from dcml.retrieval.export import EXTRA_FILE, METADATA_KEY
from dcml_app.cli import main as dcml_main

_spec = importlib.util.spec_from_file_location(
    "gallery_data", Path(__file__).resolve().parents[1] / "components" / "index" / "tests" / "gallery_data.py")
gallery_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery_data)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """(JPEG-file manifest, small_cnn checkpoint, its index folder)."""
    return gallery_data.indexed_jpeg_gallery(tmp_path_factory.mktemp("retrieval"))


def clustered(n, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 10, dim)).astype(np.float32)
    return index_lib.normalized(centres[np.arange(n) % len(centres)] + 0.3 * rng.standard_normal((n, dim)))


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_recall_is_measured_against_exact_search(kind):
    x = clustered(4000)
    index, info = index_lib.build(x, kind, target_recall=0.9)
    # An independent measurement at the stored setting, on the same queries (own row left out).
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=1000, replace=False))
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf
    truth = np.argsort(-sims, axis=1)[:, :10]
    _, found = index.search(x[rows], 11)
    found = [[i for i in row if i != own][:10] for row, own in zip(found, rows)]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert info["recall@10"] == pytest.approx(recall, abs=1e-3)
    knob = info["efSearch" if kind == "hnsw" else "nprobe"]
    assert info["calibration"][-1] == [knob, info["recall@10"]]
    # The knob is the first power of two that reached the target (or the largest one tried).
    assert info["recall@10"] >= 0.9 and all(r < 0.9 for _, r in info["calibration"][:-1])


def test_auto_picks_by_gallery_size_and_recall_target_and_says_why():
    assert index_lib.choose_type("auto", 99_999) == "flat" and index_lib.choose_type("auto", 100_000) == "ivf"
    assert index_lib.choose_type("auto", 10**7, target_recall=1.0) == "flat"  # only exact search is exact
    kind, why = index_lib.auto_choice(10**6, 0.9)
    assert kind == "ivf" and "recall@10 reaches 0.9" in why
    _, info = index_lib.build(clustered(500), "auto")
    assert info["type"] == "flat" and "exact search is fast enough" in info["picked"]
    assert "picked" not in index_lib.build(clustered(500), "flat")[1]  # told, not picked


def test_the_compressed_index_keeps_codes_in_memory_and_maps_its_exact_vectors(tmp_path):
    x = clustered(4000, dim=64)
    index, info = index_lib.build(x, "ivfpq", target_recall=0.95)
    assert info["params"]["pq_m"] == 32 and info["params"]["refine_factor"] == index_lib.REFINE_FACTOR
    # Re-ranked by exact inner products: the scores are the exact cosines of the ids found.
    scores, ids = index.search(x[:20], 5)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", x[:20], x[ids]), atol=1e-5)
    # Its memory: the codes, lists and ids, a fraction of the file that also holds the exact vectors.
    path = tmp_path / "pq.faiss"
    import faiss

    faiss.write_index(index, str(path))
    exact = x.nbytes
    assert path.stat().st_size - exact < exact / 4  # 32 bytes of code + 16 of ids per 256-byte vector
    mapped = index_lib._read_faiss(path, True, "")
    index_lib.set_knob(mapped, info["nprobe"])
    np.testing.assert_array_equal(mapped.search(x[:20], 5)[1], ids)
    with pytest.raises(DcmlError, match="too few to train its codebooks .* use --index-type flat"):
        index_lib.build(x[:100], "ivfpq")


@pytest.mark.parametrize("config", [
    {"backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 16, "num_slices": 2},
    {"backbone": "efficientnet_lite0", "weights": "none", "image_size": 64, "embedding_dim": 32,
     "fusion": {"width": 24, "weight": 0.5}},  # a delivered model: its head beside the reference branch
], ids=["small_cnn-2-slices", "efficientnet-fusion"])
def test_a_compiled_embedder_gives_the_models_embeddings_at_any_batch_size(config):
    from dcml.algorithm.models import build_model, default_config
    from dcml.retrieval.embedder import COMPILED_ATOL, Embedder

    torch.manual_seed(0)
    net = build_model(default_config(**config)).eval()
    compiled, plain = Embedder(net, "cpu", compiled=True), Embedder(net, "cpu")
    assert compiled.compile_error is None and compiled.forward is not net
    channels = 1 if compiled.transform.mode == "L" else 3
    for batch in (1, 5, 8):  # traced on a batch of 2
        x = torch.randn(batch, channels, config["image_size"], config["image_size"])
        np.testing.assert_allclose(compiled.embed_pixels(x), plain.embed_pixels(x), atol=COMPILED_ATOL)


def test_a_model_that_cannot_be_traced_runs_as_it_is_and_says_why(monkeypatch):
    from dcml.algorithm.models import build_model, default_config
    from dcml.retrieval.embedder import Embedder

    def refuse(*args, **kwargs):
        raise RuntimeError("Tracer cannot infer type of output")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    net = build_model(default_config(backbone="small_cnn", weights="none", image_size=28, embedding_dim=8)).eval()
    embedder = Embedder(net, "cpu", compiled=True)
    assert embedder.forward is net and embedder.compile_error == "RuntimeError: Tracer cannot infer type of output"
    assert embedder.embed_pixels(torch.zeros(2, 1, 28, 28)).shape == (2, 8)


def test_search_finds_each_gallery_image_first_through_the_same_preprocessing(jpegs, tmp_path, capsys):
    manifest, _, index = jpegs
    man = manifest_lib.read(manifest)
    files = [man.root / p for p in man.df["path"][:3]]
    dcml_main(["search", "--index", str(index), "--format", "json", "--k", "4"]
              + [arg for f in files for arg in ("--image", str(f))])
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == [str(f) for f in files]
    for i, result in enumerate(results):
        assert len(result["neighbours"]) == 4
        first = result["neighbours"][0]
        assert first["id"] == i and first["path"] == str(files[i]) and first["score"] == pytest.approx(1.0, abs=1e-5)
        assert first["label"] == man.df["label"][i] and first["class_name"] == man.df["class_name"][i]
        assert [h["score"] for h in result["neighbours"]] == sorted((h["score"] for h in result["neighbours"]),
                                                                    reverse=True)
    # A folder of queries, as a table.
    folder = tmp_path / "queries"
    folder.mkdir()
    for f in files[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "notes.txt").write_text("not a query")
    dcml_main(["search", "--index", str(index), "--folder", str(folder), "--k", "2"])
    out = capsys.readouterr().out
    assert out.count("query: ") == 2 and "rank" in out and "score" in out


def _truncated_png(path):
    full = path.with_suffix(".full.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # noise does not compress: half the file is half the pixels
    return path


@pytest.mark.parametrize("case, message", [
    ("text", "not an image"),
    ("truncated", "truncated or corrupt image"),
    ("huge", "more than the 40 megapixels"),
    ("empty", "empty file"),
    ("missing", "no such image file"),
    ("no_query", "pass query images with --image"),
])
def test_bad_query_is_a_one_line_error(jpegs, tmp_path, capsys, case, message):
    _, _, index = jpegs
    path = tmp_path / "query.png"
    if case == "text":
        path.write_text("hello, I am text")
    elif case == "truncated":
        _truncated_png(path)
    elif case == "huge":
        Image.new("L", (8000, 6000)).save(path)  # 48 megapixels of black: a small file, an absurd image
    elif case == "empty":
        path.write_bytes(b"")
    args = ["search", "--index", str(index)] + ([] if case == "no_query" else ["--image", str(path)])
    with pytest.raises(SystemExit) as done:
        dcml_main(args)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err


def _index_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `dcml index ARGS`."""
    try:
        dcml_main(["index", *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    said = capsys.readouterr()
    return code, said.out, said.err


def test_append_a_folder_of_one_class_or_of_loose_images_without_a_manifest(jpegs, tmp_path, capsys):
    manifest, _, built = jpegs
    index_dir = tmp_path / "index"
    shutil.copytree(built, index_dir)  # classes class0, class1, class7, class8 (labels 0, 1, 7, 8), ids 0..39
    # New images, never indexed: Fashion-MNIST classes 2 and 3 as JPEG files.
    new = Path(gallery_data.jpeg_manifest(tmp_path / "new", classes=(2, 3), per_class=3)).parent / "images"
    one_class = tmp_path / "one-class"
    shutil.copytree(new / "class2", one_class / "pullover")          # ONE class folder
    loose = tmp_path / "sneakers"
    loose.mkdir()
    for f in sorted((new / "class3").glob("*.jpg")):                  # images lying in the folder itself
        shutil.copy(f, loose / f.name)
    (loose / "notes.txt").write_text("not an image")
    # An image of a class the index holds, under that class's folder name: it keeps the class's label.
    known_class = tmp_path / "more" / "class7"
    known_class.mkdir(parents=True)
    shutil.copy(sorted((new / "class2").glob("*.jpg"))[0], known_class / "extra.jpg")

    code, out, err = _index_cli(capsys, "--append", "--folder", one_class, "--out", index_dir)
    assert code == 0 and out.startswith(f"{index_dir}: 43 images (3 added)"), err
    code, out, err = _index_cli(capsys, "--append", "--folder", loose, "--out", index_dir)
    assert code == 0 and out.startswith(f"{index_dir}: 46 images (3 added)"), err
    code, out, err = _index_cli(capsys, "--append", "--folder", tmp_path / "more", "--out", index_dir)
    assert code == 0 and out.startswith(f"{index_dir}: 47 images (1 added)"), err
    # Again: nothing new, nothing embedded twice.
    code, out, err = _index_cli(capsys, "--append", "--folder", loose, "--out", index_dir)
    assert code == 0 and out.startswith(f"{index_dir}: 47 images (0 added, 3 already indexed)"), err

    items = dcml.Index.open(index_dir).items.set_index("id")
    added = items.loc[40:]
    assert list(added.index) == list(range(40, 47))
    assert list(added["class_name"]) == ["pullover"] * 3 + ["sneakers"] * 3 + ["class7"]
    assert list(added["label"]) == [9] * 3 + [10] * 3 + [7]  # new classes after the largest label; class7 keeps 7
    assert list(added["path"][:3]) == [str(f.resolve()) for f in sorted((one_class / "pullover").glob("*.jpg"))]
    sources = json.loads((index_dir / "index.json").read_text())["sources"]
    assert sources[1]["folder"] == str(one_class) and sources[1]["ids"] == [40, 42] and sources[1]["manifest"] is None
    # Each appended image is found first, with the class it was given.
    dcml_main(["search", "--index", str(index_dir), "--format", "json", "--k", "2", "--image", added.loc[43, "path"]])
    first = json.loads(capsys.readouterr().out)[0]["neighbours"][0]
    assert first["class_name"] == "sneakers" and first["label"] == 10 and first["score"] == pytest.approx(1, abs=1e-5)

    # A new index straight from a folder of class folders: labels number the sorted class names.
    code, out, err = _index_cli(capsys, "--model", built / "model.pt", "--folder", new, "--out", tmp_path / "fresh")
    fresh = dcml.Index.open(tmp_path / "fresh").items
    assert code == 0 and sorted(zip(fresh["class_name"], fresh["label"])) == [("class2", 0)] * 3 + [("class3", 1)] * 3


@pytest.mark.parametrize("case, message", [
    ("both", "pass the images with --manifest M or --folder DIR, not both"),
    ("missing", "photos: no such folder; pass a folder of images"),
    ("empty", "no image files"),
])
def test_bad_append_folder_is_one_line_and_leaves_the_index_as_it_was(jpegs, tmp_path, capsys, case, message):
    manifest, _, built = jpegs
    folder = tmp_path / "photos"
    if case != "missing":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    before = (built / "index.json").read_bytes()
    code, _, err = _index_cli(capsys, "--append", "--folder", folder, "--out", built,
                              *(["--manifest", manifest] if case == "both" else []))
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert (built / "index.json").read_bytes() == before


# A consumer of the exported file: no dcml on its path, only torch / onnxruntime / numpy.
CONSUMER = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # site-packages without its .pth files: dcml's editable install stays out
assert importlib.util.find_spec("dcml") is None, "dcml is importable"
import numpy as np
fmt, model, pixels, out = sys.argv[2:6]
x = np.load(pixels)
if fmt == "torchscript":
    import torch
    files = {"dcml.json": ""}
    module = torch.jit.load(model, _extra_files=files)
    meta = json.loads(files["dcml.json"])
    y = module(torch.from_numpy(x)).detach().numpy()
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dcml"])
    y = session.run(["embedding"], {"pixels": x})[0]
assert list(x.shape[1:]) == meta["input"]["shape"][1:]
np.save(out, y)
print(json.dumps(meta["check"]))
"""


@pytest.mark.parametrize("backbone, fmt", [("small_cnn", "torchscript"), ("small_cnn", "onnx"),
                                           pytest.param("efficientnet_lite0", "onnx", marks=pytest.mark.slow)])
def test_export_embeds_real_images_without_dcml(jpegs, tmp_path, capsys, backbone, fmt):
    manifest, model, _ = jpegs
    if backbone != "small_cnn":
        model = gallery_data.checkpoint_file(tmp_path / "model.pt", backbone, weights="none", image_size=64,
                                             embedding_dim=32, num_slices=4)
    out = tmp_path / f"model.{fmt}"
    dcml_main(["export", "--model", str(model), "--format", fmt, "--out", str(out), "--manifest", str(manifest),
               "--check-images", "8"])
    said = capsys.readouterr().out
    assert f"wrote {out} ({fmt}" in said and "on 8 real images" in said
    # Pixels of other real images (the file's preprocessing: dcml's decoding and eval transform, not normalised).
    net, _ = load_model(model)
    man = manifest_lib.read(manifest)
    rows = man.df.iloc[10:30].reset_index(drop=True)
    images = ManifestImageDataset(man, rows, build_transform(net.config, train=False, normalize=False))
    pixels = torch.stack([images[i][0] for i in range(len(rows))]).numpy()
    np.save(tmp_path / "pixels.npy", pixels)
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", CONSUMER, site, fmt, str(out), str(tmp_path / "pixels.npy"),
                           str(tmp_path / "emb.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = json.loads(proc.stdout.strip().splitlines()[-1])
    assert check["images"] == 8 and check["max_abs_diff"] <= 1e-4 and check["tolerance"] == 1e-4
    reference = compute_vectors(net, man, rows)  # the PyTorch model as dcml runs it
    assert np.abs(np.load(tmp_path / "emb.npy") - reference).max() <= 1e-4


def test_export_needs_real_images_and_writes_nothing_without(jpegs, tmp_path, capsys):
    _, model, _ = jpegs
    with pytest.raises(SystemExit) as done:
        dcml_main(["export", "--model", str(model), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert done.value.code == 2 and "checked against the PyTorch model on real images" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    assert EXTRA_FILE == "dcml.json" and METADATA_KEY == "dcml"  # what the consumer above reads


def test_retrieval_grid_and_per_class_recall_from_a_real_tiny_dataset(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    manifest = gallery_data.fm_manifest(folder / "manifest.parquet", test_per_class=15)
    model = gallery_data.checkpoint_file(folder / "model.pt", embedding_dim=16, num_slices=2)
    metrics = evaluate(out=tmp_path / "metrics.json", model=model, manifest=manifest, ks=(1,),
                       embeddings_out=tmp_path / "emb.parquet", include=["recall"])["metrics"]
    paths = pictures.retrieval_pictures(tmp_path / "emb.parquet", manifest, tmp_path / "pictures")
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == {
        "retrieval_grid.png", "per_class_recall.csv", "per_class_recall.png"}

    # Per-class Recall@1: its query-weighted mean is evaluation's Recall@1.
    import pandas as pd

    table = pd.read_csv(paths["per_class_csv"])
    assert set(table["class_name"]) == {"class6", "class7", "class8", "class9"} and (table["queries"] == 15).all()
    assert np.average(table["recall_at_1"], weights=table["queries"]) == pytest.approx(metrics["recall@1"], abs=1e-4)
    assert list(table["recall_at_1"]) == sorted(table["recall_at_1"])  # worst first
    assert Image.open(paths["per_class_png"]).size[0] > 300

    # The grid: 8 random + 8 worst rows of 1 query + 5 neighbours; frames say same / other class.
    emb, vectors, _ = read_vectors(tmp_path / "emb.parquet")
    man = manifest_lib.read(manifest)
    rows = man.df.set_index("image_id").loc[emb["image_id"]].reset_index()
    labels = rows["label"].to_numpy()
    queries, found, scores = pictures.neighbours(vectors, labels, emb["split"].to_numpy(), 5)
    picked = pictures.pick_rows(queries, found, scores, labels)
    assert [r.section for r in picked] == ["random"] * 8 + ["worst"] * 8
    same_counts = (labels[found] == labels[queries][:, None]).sum(axis=1)
    assert [sum(r.same) for r in picked[8:]] == sorted(same_counts)[:8]  # the worst: fewest same-class hits
    images = ManifestImageDataset(man, rows, transform=None)
    _, layout = pictures.draw_grid(picked, images.load_image, rows["class_name"].tolist(), title="x")
    grid = np.asarray(Image.open(paths["grid"]).convert("RGB"))
    b = pictures.BORDER
    for row, boxes in zip(picked, layout):
        x0, y0, x1, y1 = boxes["query"]
        assert tuple(grid[y0 + 1, x0 + 1]) == pictures.QUERY and tuple(grid[y1 - 1, x1 - 1]) == pictures.QUERY
        expected = np.asarray(pictures.thumbnail(images.load_image(row.query)))
        np.testing.assert_array_equal(grid[y0 + b:y1 - b + 1, x0 + b:x1 - b + 1], expected)
        for (x0, y0, x1, y1), neighbour, same in zip(boxes["neighbours"], row.neighbours, row.same):
            assert same == (labels[neighbour] == labels[row.query])
            colour = pictures.SAME if same else pictures.DIFFERENT
            assert tuple(grid[y0 + 1, x0 + 1]) == colour and tuple(grid[y1 - 1, (x0 + x1) // 2]) == colour
            np.testing.assert_array_equal(grid[y0 + b:y1 - b + 1, x0 + b:x1 - b + 1],
                                          np.asarray(pictures.thumbnail(images.load_image(neighbour))))


def test_pictures_need_the_embeddings_manifest(tmp_path, jpegs):
    manifest, model, _ = jpegs
    other = gallery_data.fm_manifest(tmp_path / "other.parquet")
    evaluate(out=tmp_path / "m.json", model=model, manifest=manifest, ks=(1,), embeddings_out=tmp_path / "e.parquet",
             include=["recall"])
    with pytest.raises(DcmlError, match="is not in .*other.parquet; pass the manifest"):
        pictures.retrieval_pictures(tmp_path / "e.parquet", other, tmp_path / "pictures")


def readme_snippet() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- onnx-snippet -->", 1)[1].split("<!-- /onnx-snippet -->", 1)[0]
    return block.split("```python", 1)[1].split("```", 1)[0]


# Runs the README's snippet with site-packages but without dcml on the path.
SNIPPET_RUNNER = r"""
import importlib.util, sys
sys.path.append(sys.argv.pop(1))  # site-packages without its .pth files: dcml's editable install stays out
assert importlib.util.find_spec("dcml") is None, "dcml is importable"
snippet = open(sys.argv.pop(1)).read()
exec(compile(snippet, "README snippet", "exec"), {"__name__": "__main__"})
"""


@pytest.mark.parametrize("backbone", ["small_cnn", pytest.param("efficientnet_lite0", marks=pytest.mark.slow)])
def test_readme_onnx_snippet_gives_the_scores_of_dcml_search_without_dcml(tmp_path, capsys, backbone):
    from components.index.stage import run as index_stage

    # JPEGs large enough that the JPEG draft step and the resize / crop all change the pixels.
    images, labels = gallery_data.fmnist_data.t10k()
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for n, i in enumerate(range(12)):
        rgb = np.stack([images[i], images[i] // 2, 255 - images[i]], axis=-1)
        Image.fromarray(rgb).resize((150, 110), Image.Resampling.BILINEAR).save(root / f"g{n}.jpg", quality=90)
        rows.append({"image_id": f"g{n}", "path": f"g{n}.jpg", "image_bytes": None, "label": int(labels[i]),
                     "class_name": f"c{labels[i]}", "split": "test"})
    import pandas as pd

    manifest = tmp_path / "m.parquet"
    manifest_lib.write(manifest, pd.DataFrame(rows), {"dataset": "jpeg", "root": str(root), "fingerprint": "j12"})
    extra = {} if backbone == "small_cnn" else {"weights": "none", "image_size": 64}
    model = gallery_data.checkpoint_file(tmp_path / "model.pt", backbone, embedding_dim=16, num_slices=2, **extra)
    index_stage(out=tmp_path / "index", manifest=manifest, model=model)
    onnx_file = tmp_path / "model.onnx"
    dcml_main(["export", "--model", str(model), "--format", "onnx", "--out", str(onnx_file), "--manifest", str(manifest)])
    assert "max |export - PyTorch|" in capsys.readouterr().out
    query = root / "g3.jpg"
    dcml_main(["search", "--index", str(tmp_path / "index"), "--image", str(query), "--k", "12", "--format", "json"])
    hits = json.loads(capsys.readouterr().out)[0]["neighbours"]
    (tmp_path / "snippet.py").write_text(readme_snippet())
    gallery = [root / f"g{n}.jpg" for n in range(12)]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", SNIPPET_RUNNER, sysconfig.get_paths()["purelib"],
                           str(tmp_path / "snippet.py"), str(onnx_file), str(query), *map(str, gallery)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = np.array(json.loads(proc.stdout))[0, 1:]  # the query against each gallery image, by id
    assert len(hits) == 12
    for hit in hits:
        assert scores[hit["id"]] == pytest.approx(hit["score"], abs=1e-4), (hit, scores[hit["id"]])
