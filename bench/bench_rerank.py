"""Re-ranking (α-query expansion, database-side augmentation) on real test embeddings: R@1, MAP@R, cost per query.

* cars196: the test embeddings (classes 99-196, 4,092 images) of a trained model kept by bench_small
  (its ``whiten`` arm on all 98 training classes; read only), with its validation embeddings
  (597 images of held-out training classes) for choosing the settings;
* Omniglot: a small CNN trained here for ``--omniglot-epochs`` epochs on the class-disjoint
  training half (the bench_dc recipe), its val and test embeddings cached under runs/rerank/.

For every setting (none; αQE with n neighbours and weight exponent alpha; DBA on the gallery;
both) the test set is evaluated against itself, each query's own row left out, with
dcml.algorithm.metrics (PML's numbers). Cost per query: one query at a time against a flat
inner-product gallery index (dcml's exact index), plain search vs αQE's search + read-back +
second search, one thread. The setting of each data set chosen on its validation embeddings
is then read on its test embeddings, and the library's αQE setting (rerank.N, rerank.ALPHA)
is checked for a win (MAP@R up, R@1 not down) on both data sets' test embeddings.

    python -m bench.bench_rerank                    # writes bench/results/rerank.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, WORK, log, result_header, set_threads, write_result
from bench.report import PY, Results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CARS196 = WORK / "small_data" / "runs" / "whiten" / "n98-d0" / "embeddings.npz"
CACHE = WORK.parent / "rerank"
GRID_N = (1, 2, 3, 5, 10)
GRID_ALPHA = (0.0, 1.0, 3.0, 5.0)
OMNIGLOT_MODEL = {"backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 128,
                  "num_slices": 1, "freeze_bn": False}
OMNIGLOT_TRAIN = {"loss": "margin", "classes_per_batch": 32, "images_per_class": 4, "lr_backbone": 1e-3,
                  "lr_embedding": 1e-3}


# ------------------------------------------------------------------ embeddings

def cars196_embeddings() -> dict | None:
    if not CARS196.exists():
        return None
    z = np.load(CARS196)

    def labels(ids):  # "099.FIAT_500_Abarth_2012/00223.jpg" -> 99
        return np.array([int(str(i).split(".", 1)[0]) for i in ids], dtype=np.int64)

    return {"source": str(CARS196.relative_to(WORK.parents[1])),
            "val": (z["val_embedding"], labels(z["val_image_id"])),
            "test": (z["test_embedding"], labels(z["test_image_id"]))}


def omniglot_manifest() -> Path | None:
    """Omniglot's background set as a class-disjoint manifest (train / val / test), written once."""
    if not (SHARED / "omniglot").is_dir():
        return None
    manifest_path = CACHE / "omniglot-manifest.parquet"
    if not manifest_path.exists():
        from components.ingest.stage import run as ingest

        CACHE.mkdir(parents=True, exist_ok=True)
        ingest(dataset="folder", out=str(manifest_path), root=str(SHARED / "omniglot"),
               split_mode="class-disjoint", val_fraction=0.15)
    return manifest_path


def omniglot_model(epochs: int, seed: int) -> Path | None:
    """A dcml checkpoint of the small CNN trained ``epochs`` epochs on Omniglot's training classes (cached)."""
    manifest_path = omniglot_manifest()
    if manifest_path is None:
        return None
    dest = CACHE / f"omniglot-small_cnn-e{epochs}-s{seed}.pt"
    if not dest.exists():
        from dcml.algorithm.models import build_model
        from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
        from dcml.contracts import checkpoint
        from dcml.contracts import manifest as manifest_lib

        man = manifest_lib.read(manifest_path)
        seed_everything(seed)
        model = build_model(OMNIGLOT_MODEL)
        settings = TrainSettings(epochs=epochs, seed=seed, schedule="cosine", **OMNIGLOT_TRAIN)
        t0 = time.perf_counter()
        Trainer(model, man, man.split("train"), settings, device="cpu").fit(resume=False)
        log(f"  omniglot: trained {epochs} epochs in {time.perf_counter() - t0:.0f} s")
        checkpoint.save(dest, {"model_config": model.config, "model": model.state_dict(), "record": "{}"})
    return dest


def omniglot_embeddings(epochs: int, seed: int) -> dict | None:
    """Val/test embeddings of a small CNN trained on Omniglot's training classes (cached)."""
    model_path = omniglot_model(epochs, seed)
    if model_path is None:
        return None
    dest = CACHE / f"omniglot-small_cnn-e{epochs}-s{seed}.npz"
    if not dest.exists():
        import torch

        from dcml.algorithm.inference import compute_vectors
        from dcml.contracts import manifest as manifest_lib
        from dcml.retrieval.api import load_model

        man = manifest_lib.read(omniglot_manifest())
        model = load_model(model_path, "cpu").embedder.net
        out = {}
        with torch.inference_mode():
            for split in ("val", "test"):
                rows = man.split(split).reset_index(drop=True)
                out[f"{split}_embedding"] = compute_vectors(model, man, rows, kind="embedding", batch_size=256)
                out[f"{split}_label"] = rows["label"].to_numpy(dtype=np.int64)
        np.savez(dest, **out)
    z = np.load(dest)
    return {"source": str(dest.relative_to(WORK.parents[1])) + f" (small_cnn, {epochs} epochs, seed {seed})",
            "val": (z["val_embedding"], z["val_label"]), "test": (z["test_embedding"], z["test_label"])}


# --------------------------------------------------------------------- quality

def settings() -> list[dict]:
    out = [{"method": "none"}]
    out += [{"method": "aqe", "n": n, "alpha": a} for n in GRID_N for a in GRID_ALPHA]
    out += [{"method": "dba", "n": n, "alpha": 3.0} for n in (1, 2, 3)]
    out += [{"method": "dba+aqe", "n": n, "alpha": 3.0} for n in (1, 2, 3)]
    return out


def quality(x: np.ndarray, labels: np.ndarray, setting: dict) -> dict:
    """R@1 and MAP@R of ``x`` against itself under one setting."""
    from dcml.algorithm.metrics import evaluate_embeddings
    from dcml.retrieval.rerank import QueryExpansion, augment_database

    x = np.ascontiguousarray(x, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    method = setting["method"]
    # DBA changes the gallery side only: the queries stay as the model embeds them (row i's own gallery
    # row, augmented, is left out as in the plain evaluation).
    gallery = augment_database(x, setting["n"], setting["alpha"]) if method.startswith("dba") else x
    searched = x
    if method.endswith("aqe"):
        searched = QueryExpansion(setting["n"], setting["alpha"]).expand_in_set(x, gallery, same_rows=True)
    m = evaluate_embeddings(gallery, labels, ks=(1,), include=("recall", "map@r"), gpu=False, search_query=searched)
    return {"recall@1": round(m["recall@1"], 5), "map@r": round(m["map@r"], 5)}


def wins(row: dict, base: dict) -> bool:
    return row["map@r"] > base["map@r"] and row["recall@1"] >= base["recall@1"]


def pick(rows: list[dict]) -> dict:
    """The setting with the best MAP@R among those that do not lower R@1 (else none)."""
    base = rows[0]
    better = [r for r in rows[1:] if wins(r, base)]
    return max(better, key=lambda r: r["map@r"]) if better else base


# ------------------------------------------------------------------------ cost

def cost_per_query(x: np.ndarray, n: int, alpha: float, k: int = 10, queries: int = 300, seed: int = 0) -> dict:
    """ms per single query against a flat inner-product index (the gallery = x): plain vs αQE."""
    import faiss

    from dcml.retrieval.rerank import QueryExpansion

    x = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    rows = np.random.default_rng(seed).choice(len(x), size=min(queries, len(x)), replace=False)
    qe = QueryExpansion(n, alpha)
    timings = {"plain": [], "aqe": []}
    for rep in range(3):  # alternate, keep each side's best pass (least disturbed by the load)
        for side in ("plain", "aqe") if rep % 2 == 0 else ("aqe", "plain"):
            t0 = time.perf_counter()
            for r in rows:
                q = x[r:r + 1]
                if side == "aqe":
                    q = qe.expand_with_index(index, q)
                index.search(q, k)
            timings[side].append((time.perf_counter() - t0) / len(rows) * 1000)
    plain, aqe = min(timings["plain"]), min(timings["aqe"])
    return {"gallery": len(x), "dim": int(x.shape[1]), "k": k, "queries": len(rows), "plain_ms": round(plain, 4),
            "aqe_ms": round(aqe, 4), "extra_ms": round(aqe - plain, 4), "ratio": round(aqe / plain, 2)}


# ------------------------------------------------------------------------ main

def run_dataset(name: str, data: dict) -> dict:
    out = {"source": data["source"], "splits": {}}
    for split in ("val", "test"):
        x, labels = data[split]
        rows = []
        for s in settings():
            rows.append({**s, **quality(x, labels, s)})
        out["splits"][split] = {"n": int(len(x)), "classes": int(len(np.unique(labels))), "rows": rows}
        best = pick(rows)
        log(f"  {name} {split} ({len(x)} images): none R@1 {rows[0]['recall@1']:.4f} MAP@R {rows[0]['map@r']:.4f}; "
            f"best {best['method']} n={best.get('n')} alpha={best.get('alpha')}: R@1 {best['recall@1']:.4f} "
            f"MAP@R {best['map@r']:.4f}")
    chosen = pick(out["splits"]["val"]["rows"])
    key = {k: chosen.get(k) for k in ("method", "n", "alpha")}
    test_row = next(r for r in out["splits"]["test"]["rows"] if {k: r.get(k) for k in key} == key)
    out["chosen_on_val"] = {**key, "test": {"recall@1": test_row["recall@1"], "map@r": test_row["map@r"]}}
    return out


def main(argv=None) -> dict:
    from dcml.retrieval.rerank import ALPHA, DEFAULT, N

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot-epochs", type=int, default=3, help="epochs of the Omniglot small CNN trained here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "rerank.json")
    a = parser.parse_args(argv)
    threads = set_threads(a.threads or None)
    report = result_header("rerank: query expansion on real test embeddings", "bench.bench_rerank", argv)
    report.update(threads=threads, datasets={}, default={"n": N, "alpha": ALPHA}, library_default=DEFAULT)
    t0 = time.perf_counter()
    sources = {"cars196": cars196_embeddings, "omniglot": lambda: omniglot_embeddings(a.omniglot_epochs, a.seed)}
    for name, load in sources.items():
        data = load()
        if data is None:
            log(f"  {name}: no embeddings; skipped")
            continue
        result = run_dataset(name, data)
        result["cost"] = cost_per_query(data["test"][0], N, ALPHA, seed=a.seed)
        log(f"  {name} cost per query: plain {result['cost']['plain_ms']:.3f} ms, aqe:{N}:{ALPHA:g} "
            f"{result['cost']['aqe_ms']:.3f} ms")
        report["datasets"][name] = result
        write_result(a.out, report, complete=False)
    # The library default (aqe:N:ALPHA): does it win on every data set's test embeddings?
    verdict = {}
    for name, result in report["datasets"].items():
        rows = result["splits"]["test"]["rows"]
        row = next(r for r in rows if r["method"] == "aqe" and r["n"] == N and r["alpha"] == ALPHA)
        verdict[name] = {"recall@1": [rows[0]["recall@1"], row["recall@1"]], "map@r": [rows[0]["map@r"], row["map@r"]],
                         "wins": wins(row, rows[0])}
    report["default_setting"] = {"setting": f"aqe:{N}:{ALPHA:g}", "per_dataset": verdict,
                                 "wins_on_all": bool(verdict) and all(v["wins"] for v in verdict.values())}
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    write_result(a.out, report, complete=True)
    log(f"wrote {a.out} in {report['total_wall_s']:.0f} s")
    return report


def report(results: Results) -> list[str]:
    r = results.best("rerank")
    lines = ["## Re-ranking (query expansion)", ""]
    if not r:
        return lines + [f"Not run yet: `{PY} -m bench.bench_rerank`.", ""]
    lines += [f"Command: `{r.get('command')}`; threads {r.get('threads')}. Test embeddings evaluated against "
              "themselves (own row left out); R@1 and MAP@R in %.", "",
              "| data set | images | none R@1 / MAP@R | αQE default R@1 / MAP@R | chosen on val | its test R@1 / MAP@R "
              "| ms/query plain → αQE |", "|---|---:|---:|---:|---|---:|---:|"]
    default = r.get("default_setting", {})
    for name, d in r.get("datasets", {}).items():
        test = d["splits"]["test"]
        v = default.get("per_dataset", {}).get(name, {})
        c = d["chosen_on_val"]
        cost = d.get("cost", {})
        lines.append(
            f"| {name} | {test['n']:,} | {100 * test['rows'][0]['recall@1']:.2f} / {100 * test['rows'][0]['map@r']:.2f} "
            f"| {100 * v.get('recall@1', [0, 0])[1]:.2f} / {100 * v.get('map@r', [0, 0])[1]:.2f} "
            f"| {c['method']}" + (f" n={c['n']} α={c['alpha']:g}" if c.get("n") else "")
            + f" | {100 * c['test']['recall@1']:.2f} / {100 * c['test']['map@r']:.2f} "
            f"| {cost.get('plain_ms', float('nan')):.3f} → {cost.get('aqe_ms', float('nan')):.3f} |")
    lines += ["", "Embeddings: " + "; ".join(f"{name}: {d['source']}" for name, d in r.get("datasets", {}).items())
              + ". Cost: one query at a time against an exact (flat) index of the test set, k=10, one thread, "
              f"best of 3 interleaved passes (1-minute load average at the start: "
              f"{r.get('machine', {}).get('load_average', ['?'])[0]} on {r.get('machine', {}).get('cores', '?')} cores).",
              "", f"αQE {default.get('setting')} (`--rerank aqe` of `dcml search`, `dcml serve` and the evaluate "
              "stage): " + ("MAP@R up and R@1 not down on every data set." if default.get("wins_on_all")
                            else "does not win on every data set.")
              + f" The library default is `--rerank {r.get('library_default', 'none')}`: an expanded query's "
              "scores are not the plain cosine scores an index's match threshold and its measured false-match "
              "rate were chosen on, and the pipeline's evaluation stays comparable with PML and every earlier "
              "result. With n ≤ 2 the first hit cannot change in practice (the query's nearest neighbour "
              "dominates the expansion), so R@1 stays; larger n or DBA (gallery side, evaluated here only) "
              "raise MAP@R more but lower R@1 on Omniglot. Full grids (n, α, DBA) in bench/results/rerank.json.", ""]
    return lines


def commands(quick: bool, threads: int) -> list[list[str]]:
    return [] if quick else [[PY, "-m", "bench.bench_rerank", "--threads", str(threads)]]


if __name__ == "__main__":
    main()
