"""Match decisions: a threshold chosen on the validation split at a requested false-match rate holds on
held-out classes (real Omniglot images); every hit says match true / false with the threshold and the rates
measured when it was chosen (CLI, API, server); a poor choice is one warning line; `dcml threshold` chooses
again on the embeddings the index keeps, without the model."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dcml
from dcml.contracts import manifest as manifest_lib
from dcml.contracts.errors import DcmlError
from dcml.retrieval import index as index_lib
from dcml.retrieval import verify
from dcml_app.cli import main as dcml_main

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
_spec = importlib.util.spec_from_file_location(
    "gallery_data", REPO / "components" / "index" / "tests" / "gallery_data.py")
gallery_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery_data)
_spec = importlib.util.spec_from_file_location("serve_helpers", REPO / "tests" / "test_serve.py")
serve_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_helpers)


def test_threshold_lets_through_exactly_the_requested_share_of_impostor_pairs():
    rng = np.random.default_rng(0)
    impostor = rng.normal(0.2, 0.1, 10_000)
    for rate in (0.0001, 0.01, 0.05, 0.5):
        t = verify.threshold_at(impostor, rate)
        assert (impostor >= t).sum() == int(np.floor(rate * len(impostor)))
    # float32 scores (as search gives them): the threshold is above the first excluded one in float32 too.
    # 2 classes of 25 images: 625 impostor pairs; at 1e-4 none may pass (float64 rounding once let one in: 1.6e-3).
    vectors = index_lib.normalized(rng.standard_normal((50, 8)))
    entry = verify.choose(vectors, np.arange(50) % 2, 0.0001)
    assert entry["impostor_pairs"] == 625 and entry["measured_false_match_rate"] == 0.0
    scores = np.sort(verify.pair_scores(vectors, np.arange(50) % 2)[1])
    assert scores.dtype == np.float32 and np.float32(entry["threshold"]) > scores[-1]
    assert (scores >= verify.threshold_at(scores, 0.01)).sum() == 6
    genuine, impostor = verify.pair_scores(np.eye(3, dtype=np.float32)[[0, 0, 1, 2]], np.array([7, 7, 8, 9]))
    assert genuine.tolist() == [1.0] and sorted(impostor.tolist()) == [0.0] * 5
    with pytest.raises(DcmlError, match="must be in \\(0, 1\\)"):
        verify.check_rate(1.5)
    with pytest.raises(DcmlError, match="at least 2 classes with 2 or more images"):
        verify.choose(np.eye(4, dtype=np.float32)[[0, 1, 2]], [0, 1, 2], 0.01)


def test_a_poor_threshold_gets_one_line_that_says_what_to_do():
    rng = np.random.default_rng(0)
    # 3 orthogonal classes, 4 images each: 18 genuine pairs at 1.0, 48 impostor pairs at 0.0.
    clean = np.eye(3, dtype=np.float32)[np.repeat([0, 1, 2], 4)]
    few = verify.choose(clean, np.repeat([0, 1, 2], 4), 0.001, source="tiny")
    assert few["impostor_pairs"] == 48 and few["true_match_rate"] == 1.0
    line = verify.advice(few, "idx")
    assert "\n" not in line and line.startswith("only 48 impostor pairs on tiny")
    assert "needs 10,000" in line and "`dcml threshold --index idx --false-match-rate 0.3`" in line  # 10/48
    assert verify.advice(verify.choose(clean, np.repeat([0, 1, 2], 4), 0.3), "idx") is None
    # Labels that say nothing about the vectors: at 1 % about 1 % of true pairs pass.
    noise = index_lib.normalized(rng.standard_normal((400, 16)))
    blind = verify.choose(noise, np.arange(400) % 20, 0.01)
    assert blind["impostor_pairs"] >= 10 / 0.01 and blind["true_match_rate"] < 0.1
    line = verify.advice(blind)
    assert line.startswith(f"the threshold {blind['threshold']:.4f} accepts only "
                           f"{100 * blind['true_match_rate']:.1f} % of true pairs at a false-match rate of 0.01")
    assert "train the model longer" in line or "`dcml threshold --index INDEX --false-match-rate 0.1`" in line
    assert verify.decision(None) is None and verify.advice(None) is None
    rule = verify.decision(blind)
    assert rule == {"threshold": blind["threshold"], "false_match_rate": blind["measured_false_match_rate"],
                    "true_match_rate": blind["true_match_rate"], "asked_false_match_rate": 0.01,
                    "genuine_pairs": blind["genuine_pairs"], "impostor_pairs": blind["impostor_pairs"],
                    "source": "validation split"}


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    """(manifest, model): 80 Omniglot characters as 'val', 80 others as 'test' (20 drawings each), small_cnn."""
    if not OMNIGLOT.is_dir():
        pytest.skip(f"{OMNIGLOT} missing (see ../shared/data/README.md)")
    folder = tmp_path_factory.mktemp("verify")
    classes = sorted(p.name for p in OMNIGLOT.iterdir() if p.is_dir())
    picked = np.random.default_rng(0).permutation(len(classes))[:160]
    rows = []
    for j, c in enumerate(picked):
        for f in sorted((OMNIGLOT / classes[c]).glob("*.png")):
            rows.append({"image_id": f"{classes[c]}/{f.name}", "path": f"{classes[c]}/{f.name}", "image_bytes": None,
                         "label": int(c), "class_name": classes[c], "split": "val" if j % 2 == 0 else "test"})
    manifest = folder / "omniglot.parquet"
    manifest_lib.write(manifest, pd.DataFrame(rows), {"dataset": "omniglot", "root": str(OMNIGLOT),
                                                      "fingerprint": f"omniglot-{len(rows)}"})
    model = gallery_data.checkpoint_file(folder / "model.pt", embedding_dim=64, num_slices=1)
    return manifest, model


def test_false_match_rate_on_held_out_classes_is_near_the_requested_one(omniglot, tmp_path, capsys):
    manifest, model_file = omniglot
    # `dcml index` of the test classes: the threshold comes from the validation classes.
    out = tmp_path / "index"
    dcml_main(["index", "--model", str(model_file), "--manifest", str(manifest), "--split", "test", "--out", str(out)])
    said = capsys.readouterr().out
    assert "match threshold" in said and "false-match rate 0.01 on the validation split" in said
    index = dcml.Index.open(out)
    entry = index.gallery.meta["verification"]
    assert entry["false_match_rate"] == 0.01 and entry["impostor_pairs"] == 80 * 79 // 2 * 400
    assert entry["measured_false_match_rate"] == pytest.approx(0.01, abs=1e-4)  # on the pairs it was chosen on
    assert [r["false_match_rate"] for r in entry["table"]] == [0.0001, 0.001, 0.01, 0.05, 0.1]
    # Held-out pairs: the 80 test classes the threshold never saw.
    gallery = index.gallery
    vectors = index_lib.stored_vectors(gallery.index)
    labels = gallery.items.sort_values("id")["label"].to_numpy()
    held_out = verify.match_rates(vectors, labels, index.threshold)
    assert held_out["impostor_pairs"] == 80 * 79 // 2 * 400
    assert abs(held_out["false_match_rate"] - 0.01) <= 0.005, held_out
    # Another rate through the API: the same holds at 5 %.
    five = index.choose_threshold(manifest=manifest, false_match_rate=0.05)
    assert abs(verify.match_rates(vectors, labels, five["threshold"])["false_match_rate"] - 0.05) <= 0.02
    assert five["threshold"] < entry["threshold"]
    # Every hit carries its decision: match == (score >= threshold), in the API and the CLI.
    queries = [manifest_lib.read(manifest).root / p for p in gallery.items["path"][:5]]
    hits = index.search(queries, k=50)
    assert hits["match"].dtype == bool and (hits["match"] == (hits["score"] >= five["threshold"] - 1e-6)).all()
    assert hits["match"].any() and not hits["match"].all()
    # ... with what the decision means: the threshold and the rates measured when it was chosen.
    assert (hits["threshold"] == five["threshold"]).all() and (hits["true_match_rate"] == five["true_match_rate"]).all()
    assert (hits["false_match_rate"] == five["measured_false_match_rate"]).all()
    dcml_main(["search", "--index", str(out), "--image", str(queries[0]), "--k", "50", "--format", "json"])
    result = json.loads(capsys.readouterr().out)[0]
    cli_hits = result["neighbours"]
    assert all(h["match"] == (h["score"] >= entry["threshold"] - 1e-6) for h in cli_hits)
    assert cli_hits[0]["match"] is True  # the query itself
    assert result["decision"] == verify.decision(entry) and result["decision"]["impostor_pairs"] == 80 * 79 // 2 * 400
    dcml_main(["search", "--index", str(out), "--image", str(queries[0]), "--k", "3"])
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == (
        f"match = score >= {entry['threshold']:.4f} (false-match rate {entry['measured_false_match_rate']:.4f}, "
        f"true-match rate {entry['true_match_rate']:.3f}, measured on 1,264,000 impostor and 15,200 genuine pairs "
        f"of {manifest} split 'val')")


@pytest.fixture(scope="module")
def thresholded(tmp_path_factory):
    """(manifest: classes 0, 1 'val' and 7, 8 'test' as JPEG files; model; index of 'test' built by the real
    `dcml index` with the threshold chosen on 'val'; that command's stderr)."""
    folder = tmp_path_factory.mktemp("thresholded")
    plain = gallery_data.jpeg_manifest(folder)
    man = manifest_lib.read(plain)
    df = man.df.assign(split=["val" if c in (0, 1) else "test" for c in man.df["label"]])
    manifest = folder / "val-test.parquet"
    manifest_lib.write(manifest, df, {**man.meta, "fingerprint": "jpeg-val-test"})
    model = gallery_data.checkpoint_file(folder / "model.pt", embedding_dim=16, num_slices=2)
    done = subprocess.run([sys.executable, "-m", "dcml_app.cli", "index", "--model", str(model), "--manifest",
                           str(manifest), "--out", str(folder / "index")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return manifest, model, folder / "index", done.stderr


def test_dcml_run_shows_the_index_warning_under_the_stage_line(thresholded, tmp_path):
    """The index stage as `dcml run` runs it (events on stdout) through the run's console: the warning `dcml
    index` prints is shown under the stage's line (it was only in the stage's log)."""
    from dcml_app.console import PipelineConsole

    manifest, model, _, _ = thresholded
    out = tmp_path / "index"
    done = subprocess.run([sys.executable, "-m", "dcml_app.cli", "index", "--model", str(model), "--manifest",
                           str(manifest), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DCML_EVENTS": "1"})
    assert done.returncode == 0, done.stderr
    terminal = io.StringIO()
    console = PipelineConsole(tmp_path / "logs", terminal=terminal)
    console.write("Executing task 'index'\n" + done.stdout + "Task 'index' finished with status SUCCESS\n")
    console.close()
    shown = terminal.getvalue().splitlines()
    assert shown[0].startswith("  index") and "match threshold" in shown[0], shown
    assert shown[1].startswith("    warning: only 100 impostor pairs on ") and len(shown) == 2, shown
    assert console.stages[0]["warnings"] == [shown[1][len("    warning: "):]]


def _val_files(manifest):
    man = manifest_lib.read(manifest)
    val = man.split("val")
    return [man.root / p for p in val["path"]], val["label"].to_numpy()


def test_index_warns_in_one_line_and_threshold_rechooses_without_the_model(thresholded, tmp_path, capsys):
    manifest, model_file, index_dir, stderr = thresholded
    # 2 validation classes of 10 images: 100 impostor pairs, too few to measure 1 %.
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, stderr
    assert warnings[0].startswith(f"warning: only 100 impostor pairs on {manifest} split 'val': a false-match rate "
                                  "of 0.01 needs 1,000 to be measured")
    assert f"`dcml threshold --index {index_dir} --false-match-rate 0.1`" in warnings[0]
    # The index keeps the validation embeddings; they are the model's embeddings of the 'val' images.
    files, labels = _val_files(manifest)
    fresh = dcml.load_model(model_file).embed(files)
    kept, kept_labels, about = index_lib.read_validation(index_dir)
    assert kept.shape == (20, 16) and np.array_equal(kept_labels, labels) and about["seed"] == 0
    assert np.abs(kept - fresh).max() < 1e-5
    # Re-thresholding reads no model: with model.pt replaced by bytes no loader accepts, it still works.
    real = (index_dir / "model.pt").read_bytes()
    (index_dir / "model.pt").write_bytes(b"not a checkpoint")
    try:
        with pytest.raises(DcmlError):
            dcml.Index.open(index_dir)  # what loading the model would have done
        dcml_main(["threshold", "--index", str(index_dir), "--false-match-rate", "0.1", "--verbose"])
        said = capsys.readouterr()
        assert (index_dir / "model.pt").read_bytes() == b"not a checkpoint"
    finally:
        (index_dir / "model.pt").write_bytes(real)
    entry = json.loads((index_dir / "index.json").read_text())["verification"]
    expected = verify.choose(fresh, labels, 0.1, source="x")
    assert entry["false_match_rate"] == 0.1 and entry["threshold"] == pytest.approx(expected["threshold"], abs=1e-5)
    assert entry["true_match_rate"] == pytest.approx(expected["true_match_rate"], abs=0.02)  # one pair either way
    assert said.out.splitlines()[0] == f"{index_dir}: {verify.describe(verify.decision(entry))}"
    assert "asked" in said.out and "only 100 impostor pairs" not in said.err  # 100 pairs do measure 10 %
    assert index_lib.read_validation(index_dir)[0].shape == (20, 16)  # kept for the next change
    # The API does the same from the kept embeddings; the searches report the new threshold.
    index = dcml.Index.open(index_dir)
    again = index.choose_threshold(false_match_rate=0.1)
    assert again["threshold"] == entry["threshold"] and index.decision == verify.decision(entry)
    query = manifest_lib.read(manifest).root / manifest_lib.read(manifest).split("test")["path"][0]
    dcml_main(["search", "--index", str(index_dir), "--image", str(query), "--format", "json",
               "--out", str(tmp_path / "hits.csv")])
    result = json.loads(capsys.readouterr().out)[0]
    assert result["decision"]["asked_false_match_rate"] == 0.1 and result["decision"]["threshold"] == entry["threshold"]
    rows = pd.read_csv(tmp_path / "hits.csv")
    assert (rows["threshold"] == entry["threshold"]).all()
    assert (rows["true_match_rate"] == entry["true_match_rate"]).all()
    assert (rows["match"] == (rows["score"] >= entry["threshold"])).all()


def test_threshold_needs_kept_embeddings_or_a_manifest_and_index_points_to_it(thresholded, jpegs_index, tmp_path,
                                                                             capsys):
    manifest, _, index_dir, _ = thresholded
    bare = tmp_path / "bare"
    shutil.copytree(jpegs_index, bare)  # built without a 'val' split: no threshold, nothing kept
    for args, message in [
        (["threshold", "--index", str(bare), "--false-match-rate", "0.05"], "keeps no validation embeddings"),
        (["threshold", "--index", str(bare), "--false-match-rate", "2"], "--false-match-rate 2: must be in (0, 1)"),
        (["threshold", "--index", str(tmp_path / "none"), "--false-match-rate", "0.05"], "no such index folder"),
        (["index", "--manifest", str(manifest), "--out", str(index_dir), "--false-match-rate", "0.05"],
         f"(`dcml threshold --index {index_dir} --false-match-rate RATE` changes only the match threshold"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            dcml_main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    # With a manifest, only its held-out images are embedded; the index keeps them from then on.
    dcml_main(["threshold", "--index", str(bare), "--false-match-rate", "0.1", "--manifest", str(manifest)])
    assert capsys.readouterr().out.startswith(f"{bare}: match = score >= ")
    files, labels = _val_files(manifest)
    opened = dcml.Index.open(bare)
    assert opened.threshold == pytest.approx(verify.choose(opened.model.embed(files), labels, 0.1)["threshold"],
                                             abs=1e-5)
    assert index_lib.read_validation(bare)[0].shape == (20, 16)


@pytest.fixture(scope="module")
def jpegs_index(tmp_path_factory):
    """An index folder `dcml index` built of a JPEG manifest that has no 'val' split."""
    return gallery_data.indexed_jpeg_gallery(tmp_path_factory.mktemp("bare"))[2]


def test_the_server_answers_with_what_match_means(thresholded, devtools_page):
    _, _, index_dir, _ = thresholded
    port = serve_helpers.free_port()
    process = serve_helpers.start_server(index_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        serve_helpers.wait_for(f"{url}/healthz", process)
        query = sorted(Path(manifest_lib.read(thresholded[0]).root).glob("class7/*.jpg"))[0]
        body = serve_helpers.post_image(url, query, k=20)
        # The page (headless Chromium) shows under its results the line `dcml search` prints.
        tab = devtools_page
        tab("Page.enable"), tab("DOM.enable"), tab("Page.navigate", url=url)
        tab.wait("document.readyState === 'complete' && document.getElementById('info').textContent !== ''")
        node = tab("DOM.querySelector", nodeId=tab("DOM.getDocument")["root"]["nodeId"], selector="#file")["nodeId"]
        tab("DOM.setFileInputFiles", nodeId=node, files=[str(query)])
        tab.wait("document.body.dataset.state === 'done'")
        shown = tab.evaluate("document.getElementById('decision').textContent")
    finally:
        process.terminate()
        process.wait(timeout=30)
    rule = dcml.Index.open(index_dir).decision
    assert body["decision"] == {**rule, "text": verify.describe(rule)} and rule["impostor_pairs"] == 100
    assert all(h["match"] == (h["score"] >= rule["threshold"]) for h in body["neighbours"])
    assert shown == verify.describe(rule) and shown.startswith("match = score >= "), shown
