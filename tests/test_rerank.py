"""dcml.retrieval.rerank (α-query expansion, DBA) and its `--rerank` option of `dcml search`, `dcml serve`
(through GalleryIndex.search) and the evaluate stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.evaluate.stage import run as evaluate
from dcml.algorithm.metrics import evaluate_embeddings
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import write_vectors
from dcml.retrieval import index as index_lib
from dcml.retrieval.rerank import ALPHA, N, QueryExpansion, augment_database, stored
from dcml_app.cli import main as dcml_main


def classes(n=2000, dim=32, per_class=10, noise=0.9, seed=0):
    """(unit rows, labels): classes of ``per_class`` around random centres, overlapping like real test sets."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) // per_class
    centres = rng.standard_normal((labels.max() + 1, dim)).astype(np.float32) / np.sqrt(dim)
    x = centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return index_lib.normalized(x), labels


def by_hand(q, gallery, n, alpha, own=None):
    """αQE of one query, written out: its n nearest gallery rows (``own`` left out) weighted by sim ** alpha."""
    sims = gallery @ q
    if own is not None:
        sims[own] = -np.inf
    top = np.argsort(-sims, kind="stable")[:n]
    out = q + (np.clip(sims[top], 0, None) ** alpha)[:, None].T @ gallery[top]
    return (out / np.linalg.norm(out)).ravel()


def test_parse_and_bad_settings():
    assert QueryExpansion.parse(None) is None and QueryExpansion.parse("none") is None
    assert QueryExpansion.parse("aqe") == QueryExpansion(N, ALPHA)
    assert QueryExpansion.parse("AQE:5") == QueryExpansion(5, ALPHA)
    assert QueryExpansion.parse("aqe:3:1.5").describe() == "aqe:3:1.5"
    for bad, message in [("qe", "use none, aqe"), ("aqe:x", "N must be an integer"), ("aqe:0", "n >= 1"),
                         ("aqe:2:-1", "alpha >= 0"), ("aqe:1:2:3", "use none, aqe")]:
        with pytest.raises(DcmlError, match=message):
            QueryExpansion.parse(bad, "--rerank")


def test_expansion_in_a_set_is_the_formula_with_the_own_row_left_out():
    x, _ = classes(300)
    qe = QueryExpansion(3, 2.0)
    expanded = qe.expand_in_set(x)
    for i in (0, 17, 299):
        np.testing.assert_allclose(expanded[i], by_hand(x[i], x, 3, 2.0, own=i), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expanded, axis=1), 1.0, atol=1e-5)
    # Against another set (a gallery): nothing is left out. DBA is the set's own expansion.
    gallery = classes(200, seed=1)[0]
    np.testing.assert_allclose(qe.expand_in_set(x[:5], gallery)[2], by_hand(x[2], gallery, 3, 2.0), atol=1e-5)
    np.testing.assert_allclose(augment_database(x, 3, 2.0), expanded, atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_expansion_with_a_gallery_index_reads_back_its_vectors(kind):
    gallery, _ = classes(4000, seed=2)
    ids = np.arange(4000, dtype=np.int64) * 3 + 7  # ids are not positions
    index, _ = index_lib.build(gallery, kind, ids=ids, target_recall=0.99)
    np.testing.assert_allclose(stored(index, ids[[5, 0, 3999]]), gallery[[5, 0, 3999]], atol=1e-6)
    queries = classes(50, seed=3)[0]
    qe = QueryExpansion(2, 3.0)
    exact = qe.expand_in_set(queries, gallery)
    got = qe.expand_with_index(index, queries)
    # Exact index: the same vectors; an approximate one finds (nearly) the same neighbours.
    close = np.abs(got - exact).max(axis=1) < 1e-5
    assert close.all() if kind == "flat" else close.mean() >= 0.9


def test_query_expansion_raises_map_at_r_on_overlapping_classes():
    x, labels = classes(3000, per_class=15)
    plain = evaluate_embeddings(x, labels, include=("recall", "map@r"), gpu=False)
    qe = evaluate_embeddings(x, labels, include=("recall", "map@r"), gpu=False,
                             search_query=QueryExpansion(2, 3.0).expand_in_set(x))
    assert qe["map@r"] > plain["map@r"] + 0.005
    # search_query = the queries themselves gives the plain numbers exactly.
    same = evaluate_embeddings(x, labels, include=("recall", "map@r"), gpu=False, search_query=x)
    assert same == plain
    with pytest.raises(DcmlError, match="search_query: shape"):
        evaluate_embeddings(x, labels, include=("recall",), gpu=False, search_query=x[:10])


def test_evaluate_stage_rerank_option(tmp_path):
    x, labels = classes(1000, per_class=10)
    table = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(x))], "label": labels, "split": "test"})
    write_vectors(tmp_path / "emb.parquet", table, x, "embedding", {})
    plain = evaluate(out=tmp_path / "plain.json", embeddings=tmp_path / "emb.parquet", include=["recall", "map@r"])
    reranked = evaluate(out=tmp_path / "qe.json", embeddings=tmp_path / "emb.parquet", include=["recall", "map@r"],
                        rerank="aqe:2:3")
    assert reranked["params"]["rerank"] == "aqe:2:3" and "rerank" not in plain["params"]
    expected = evaluate_embeddings(x, labels, include=("recall", "map@r"), gpu=False,
                                   search_query=QueryExpansion(2, 3.0).expand_in_set(x))
    assert json.loads((tmp_path / "qe.json").read_text())["metrics"] == pytest.approx(expected, abs=1e-9)
    assert reranked["metrics"]["map@r"] != plain["metrics"]["map@r"]
    with pytest.raises(DcmlError, match="--rerank 'aqe:nope'"):
        evaluate(out=tmp_path / "bad.json", embeddings=tmp_path / "emb.parquet", rerank="aqe:nope")
    assert not (tmp_path / "bad.json").exists()


_spec = importlib.util.spec_from_file_location(
    "gallery_data", Path(__file__).resolve().parents[1] / "components" / "index" / "tests" / "gallery_data.py")
gallery_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery_data)


def test_search_cli_rerank_and_its_bad_value(tmp_path, capsys):
    from dcml.contracts import manifest as manifest_lib
    from dcml.retrieval.api import Index
    from dcml.retrieval.search import Searcher

    manifest, _, index = gallery_data.indexed_jpeg_gallery(tmp_path)
    man = manifest_lib.read(manifest)
    files = [man.root / p for p in man.df["path"][:2]]
    args = ["search", "--index", str(index), "--format", "json", "--k", "5"] + [a for f in files for a in ("--image", str(f))]
    dcml_main(args + ["--rerank", "aqe:2:3"])
    got = json.loads(capsys.readouterr().out)
    # The same as expanding the queries, embedded as the command does, against the index and searching again.
    opened = Index.open(index)
    vectors = opened.model.embed_files(files).vectors
    expanded = QueryExpansion(2, 3.0).expand_with_index(opened.gallery.index, vectors)
    scores, ids = opened.gallery.index.search(expanded, 5)
    assert [[h["id"] for h in r["neighbours"]] for r in got] == ids.tolist()
    np.testing.assert_allclose([[h["score"] for h in r["neighbours"]] for r in got], scores, atol=1e-5)
    # Served search (dcml serve's Searcher) applies the same re-ranking through GalleryIndex.search.
    served = Searcher(index, rerank=QueryExpansion(2, 3.0)).gallery.search(vectors, 5)
    assert [[h["id"] for h in hits] for hits in served] == ids.tolist()
    with pytest.raises(SystemExit) as exit_info:
        dcml_main(args + ["--rerank", "bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--rerank 'bogus'" in err and "Traceback" not in err
