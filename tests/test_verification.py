"""Match decisions: a threshold chosen on the validation split at a requested false-match rate holds on
held-out classes (real Omniglot images), and every hit says match true / false."""

from __future__ import annotations

import importlib.util
import json
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


def test_threshold_lets_through_exactly_the_requested_share_of_impostor_pairs():
    rng = np.random.default_rng(0)
    impostor = rng.normal(0.2, 0.1, 10_000)
    for rate in (0.0001, 0.01, 0.05, 0.5):
        t = verify.threshold_at(impostor, rate)
        assert (impostor >= t).sum() == int(np.floor(rate * len(impostor)))
    genuine, impostor = verify.pair_scores(np.eye(3, dtype=np.float32)[[0, 0, 1, 2]], np.array([7, 7, 8, 9]))
    assert genuine.tolist() == [1.0] and sorted(impostor.tolist()) == [0.0] * 5
    with pytest.raises(DcmlError, match="must be in \\(0, 1\\)"):
        verify.check_rate(1.5)
    with pytest.raises(DcmlError, match="cannot measure a false-match rate of 0.001"):
        verify.choose(np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2]], [0, 0, 1, 1, 2, 2], 0.001)


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
    dcml_main(["search", "--index", str(out), "--image", str(queries[0]), "--k", "50", "--format", "json"])
    cli_hits = json.loads(capsys.readouterr().out)[0]["neighbours"]
    assert all(h["match"] == (h["score"] >= entry["threshold"] - 1e-6) for h in cli_hits)
    assert cli_hits[0]["match"] is True  # the query itself
