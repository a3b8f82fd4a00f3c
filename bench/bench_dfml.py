"""Benchmark of DFML training (factorised backbone + router) on one manifest.

Trains with ``components.dfml.stage.run`` (R@1 of the full and of the routed
model after every ``--eval-every`` epochs, routing of the training and the test
images logged), then evaluates the written checkpoint -- the plain model,
exactly what ``dcml evaluate`` sees -- with every retrieval metric. With
``--baseline`` the same backbone, loss, batches and learning rates are also
trained without factorisation (``components.train.stage.run``, K=1), so the
difference is DFML's alone.

    python -m bench.bench_dfml --manifest runs/cars/manifest.parquet --dataset cars196 --epochs 10
    python -m bench.bench_dfml --manifest M --dataset cars196 --epochs 10 --baseline

writes bench/results/dfml_<dataset>.json and dfml_<dataset>_routing.png: for
every block, the share of training samples (last epoch) and of test samples
sent to each sub-block, plus the mean normalised routing entropy per epoch
(1 = samples spread evenly, 0 = every block sends everything to one
sub-block).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from dcml.contracts import manifest as manifest_lib
from dcml.contracts.io import atomic_path, write_json
from dcml.contracts.records import git_commit
from dcml.tracking import routing_plot

from bench import bench_quality
from bench.common import command_line, log, log_to_mlflow
from bench.report import PY, Results, commands_line, dataset_heading, num, pct

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate_checkpoint(path, manifest_path, device) -> dict:
    """All retrieval metrics of a checkpoint on the manifest's test (or query/gallery) split."""
    from dcml.algorithm.inference import compute_vectors
    from dcml.algorithm.metrics import evaluate_embeddings
    from dcml.model_files import load_model

    man = manifest_lib.read(manifest_path)
    model, _ = load_model(path, device=device)
    splits = set(man.df["split"].unique())
    t0 = time.perf_counter()
    if {"query", "gallery"} <= splits:
        query, gallery = man.split("query"), man.split("gallery")
        q = compute_vectors(model, man, query, device=device, desc="query embeddings")
        g = compute_vectors(model, man, gallery, device=device, desc="gallery embeddings")
        metrics = evaluate_embeddings(q, query["label"].to_numpy(), g, gallery["label"].to_numpy())
    else:
        test = man.split("test")
        metrics = evaluate_embeddings(compute_vectors(model, man, test, device=device, desc="test embeddings"),
                                      test["label"].to_numpy())
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return metrics


def plot(result: dict, dest: Path) -> Path:
    params = result["dfml"]["params"]
    title = f"DFML on {result['dataset']}: G={params['groups']}, balance_weight={params['balance_weight']}"
    with atomic_path(dest) as tmp:
        routing_plot(result["dfml"]["history"], Path(tmp), title=title)
    return dest


def log_result(result: dict, json_path: Path, png_path: Path) -> str:
    """Log a finished result (JSON, routing plot, a nested run per trained model) to MLflow."""
    children = [(name, {"method": name, **{k: v for k, v in result[name]["params"].items() if k != "manifest"}},
                 {**result[name]["metrics"], "train_seconds": result[name]["train_seconds"]})
                for name in ("dfml", "baseline") if name in result]
    result["mlflow_run_id"] = log_to_mlflow(
        "bench-dfml", f"dfml vs K=1 {result['dataset']}",
        params={"dataset": result["dataset"], "manifest": result["manifest"], **result["dfml"]["params"]},
        metrics={"dfml.recall@1": result["dfml"]["metrics"]["recall@1"],
                 "dfml.routing_entropy": result["dfml"]["routing_entropy"]},
        artifacts=[json_path, png_path], children=children)
    write_json(json_path, result)
    return result["mlflow_run_id"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest")
    parser.add_argument("--dataset", required=True, help="name used in the output file names")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--loss", default="proxy_anchor")
    parser.add_argument("--classes-per-batch", type=int, default=20)
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--lr-backbone", type=float, default=1e-4)
    parser.add_argument("--lr-embedding", type=float, default=1e-4)
    parser.add_argument("--lr-proxies", type=float, default=None)
    parser.add_argument("--lr-router", type=float, default=1e-4)
    parser.add_argument("--routed-scale", type=float, default=None)
    parser.add_argument("--balance-weight", type=float, default=0.0,
                        help="weight of the routers' load-balancing term (0 = DFML as published)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster on a box shared with other jobs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also train the same model without DFML (K=1)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")
    parser.add_argument("--mlflow-only", action="store_true", help="log the existing dfml_<dataset>.json to MLflow, run nothing")
    parser.add_argument("--keep-models", help="directory to keep the trained checkpoints in")
    args = parser.parse_args(argv)

    import torch

    from components.dfml.stage import run as run_dfml
    from dcml.algorithm.inference import default_device

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    json_path = out_dir / f"dfml_{args.dataset}.json"
    png_path = out_dir / f"dfml_{args.dataset}_routing.png"
    if args.mlflow_only:
        result = json.loads(json_path.read_text())
        plot(result, png_path)
        print(f"logged {json_path} as MLflow run {log_result(result, json_path, png_path)}")
        return result
    if not args.manifest:
        parser.error("--manifest is required (unless --mlflow-only)")
    device = default_device()
    common = dict(image_size=args.image_size, embedding_dim=args.embedding_dim, loss=args.loss,
                  classes_per_batch=args.classes_per_batch, images_per_class=args.images_per_class,
                  lr_backbone=args.lr_backbone, lr_embedding=args.lr_embedding, lr_proxies=args.lr_proxies,
                  epochs=args.epochs, eval_every=args.eval_every, seed=args.seed, num_workers=args.num_workers)
    result = {
        "dataset": args.dataset,
        "command": command_line("bench.bench_dfml", argv),
        "manifest": str(Path(args.manifest).resolve()),
        "complete": False,
        "git_commit": git_commit(),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device), "torch": torch.__version__},
    }
    keep = Path(args.keep_models) if args.keep_models else None
    with tempfile.TemporaryDirectory() as tmp_dir:
        models = keep or Path(tmp_dir)
        dfml_path = models / f"dfml_{args.dataset}.pt"
        t0 = time.perf_counter()
        record = run_dfml(manifest=args.manifest, out=dfml_path, groups=args.groups, lr_router=args.lr_router,
                          routed_scale=args.routed_scale, balance_weight=args.balance_weight,
                          eval_routed=True, resume=False, **common,
                          baseline_candidate=False)  # DFML's training is measured, not the pretrained features
        cpu_note = time.process_time()
        result["dfml"] = {
            "params": record["params"],
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "train_seconds": record["metrics"].get("train_seconds"),
            "metrics": evaluate_checkpoint(dfml_path, args.manifest, device),
            "routed_recall@1": record["metrics"].get("routed_recall@1"),
            "routing_entropy": record["metrics"].get("routing_entropy"),
            "collapsed_units": record["metrics"].get("collapsed_units"),
            "history": record["history"],
        }
        write_json(json_path, result)
        plot(result, png_path)
        if args.baseline:
            from components.train.stage import run as run_train

            base_path = models / f"baseline_{args.dataset}.pt"
            t0 = time.perf_counter()
            base = run_train(manifest=args.manifest, out=base_path, backbone="efficientnet_lite0", weights="imagenet",
                             num_slices=1, miner="none" if args.loss == "proxy_anchor" else "reference",
                             recluster_every=0, resume=False, **common)
            result["baseline"] = {
                "params": base["params"],
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "train_seconds": base["metrics"].get("train_seconds"),
                "metrics": evaluate_checkpoint(base_path, args.manifest, device),
                "history": base["history"],
            }
    result["process_cpu_seconds"] = round(cpu_note, 1)
    result["complete"] = True
    if not args.no_mlflow:
        log_result(result, json_path, png_path)
    write_json(json_path, result)
    print(f"wrote {json_path} and {png_path}")
    for name in ("dfml", "baseline"):
        if name in result:
            m = result[name]["metrics"]
            print(f"{name}: R@1 {m['recall@1']:.4f}  MAP@R {m['map@r']:.4f}  train {result[name]['train_seconds']} s")
    return result


# ----------------------------------------------------------------- running and report

def commands(quick: bool, threads: int) -> list[list[str]]:
    """DFML and its K=1 baseline on the quality benchmark's cars196 manifest."""
    run = bench_quality.trained_run("cars196", "k1", quick)
    if run is None:
        log("dfml: no quality_cars196 manifest yet; run --only quality first")
        return []
    epochs = "1" if quick else "4"  # = the quality runs' 3 training + 1 fine-tuning epochs
    return [[PY, "-m", "bench.bench_dfml", "--manifest", run["manifest"], "--dataset", "cars196" + ("_quick" if quick else ""),
             "--epochs", epochs, "--baseline", "--threads", str(threads)]]


def elapsed(results: Results) -> list[str]:
    dfml = results.load("dfml_cars196")
    if not (dfml and dfml.get("dfml")):
        return []
    minutes = (dfml["dfml"].get("wall_seconds", 0) + dfml.get("baseline", {}).get("wall_seconds", 0)) / 60
    return [f"dfml_cars196 {minutes:.0f} min"]


def report(results: Results) -> list[str]:
    lines = ["## DFML (bench_dfml)", ""]
    found = results.per_dataset("dfml_*.json")
    if not found:
        return lines + ["Not run yet (needs the quality benchmark's cars196 manifest): "
                        f"`{PY} -m bench.run_all --only dfml`.", ""]
    for dataset, r in found:
        lines += dataset_heading(dataset, r)
        keys = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")
        lines += ["| model | loss | epochs | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | training (s) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, label in (("dfml", "DFML (factorised backbone + router, G sub-blocks)"),
                            ("baseline", "same backbone, loss and batches, no DFML (K=1)")):
            if name in r:
                m, params = r[name]["metrics"], r[name].get("params", {})
                lines.append(f"| {label} | {params.get('loss')} | {params.get('epochs')} | "
                             + " | ".join(pct(m.get(k)) for k in keys) + f" | {num(r[name].get('train_seconds'), 0)} |")
        # Divide and conquer at the same number of epochs: the quality benchmark's rows.
        for q in bench_quality.summary_rows(results, dataset):
            lines.append(f"| quality benchmark: {q['label']} | {q['loss']} | {q['epochs']} | "
                         + " | ".join(pct(q["metrics"].get(k)) for k in keys) + f" | {num(q['train_s'], 0)} |")
        lines += [""] + verdict(r)
        d = r.get("dfml", {})
        if d:
            params = d.get("params", {})
            lines += ["", f"Loss {params.get('loss')}, {params.get('epochs')} epochs, G={params.get('groups')}; routed R@1 "
                      f"{pct(d.get('routed_recall@1'))}, routing entropy {num(d.get('routing_entropy'), 3)}, "
                      f"collapsed units {d.get('collapsed_units')}."]
        lines += results.image(f"dfml_{dataset}_routing.png", f"dfml {dataset}")
        fallback = results.step_command("dfml") or f"python -m bench.bench_dfml --manifest ... --dataset {dataset}"
        lines += ["", commands_line(r, fallback, "bench-dfml"), ""]
    return lines


def verdict(r: dict) -> list[str]:
    """DFML against its own baseline (same loss, batches and epochs), in words from the numbers."""
    d, b = r.get("dfml"), r.get("baseline")
    if not (d and b):
        return []
    dm, bm = d["metrics"], b["metrics"]
    out = [f"- DFML vs the same model trained without factorisation: R@1 {100 * (dm['recall@1'] - bm['recall@1']):+.1f}, "
           f"MAP@R {100 * (dm['map@r'] - bm['map@r']):+.1f} points; training took "
           f"{d['train_seconds'] / b['train_seconds']:.2f}x as long (a full and a routed pass per batch)."]
    curve = [(h["epoch"], h["recall@1"]) for h in d.get("history", []) if "recall@1" in h]
    base_curve = [(h["epoch"], h["recall@1"]) for h in b.get("history", []) if "recall@1" in h]
    if curve and base_curve:
        out.append("- R@1 per epoch, DFML: " + ", ".join(pct(v) for _, v in curve)
                   + "; baseline: " + ", ".join(pct(v) for _, v in base_curve) + ".")
    routed = d.get("routed_recall@1")
    if routed is not None:
        out.append(f"- The routed network alone (one sub-block per block, as the router picks) retrieves at R@1 "
                   f"{pct(routed)}: it is trained only through the 0.5-weighted routed and distillation terms and, "
                   f"after {d['params'].get('epochs')} epochs, is not a usable embedding by itself. Inference uses the "
                   f"full (merged) network, as DFML prescribes.")
    if d.get("routing_entropy") is not None:
        out.append(f"- Routing spread: mean normalised entropy {d['routing_entropy']:.2f} (1 = even over the "
                   f"{d['params'].get('groups')} sub-blocks, 0 = one sub-block takes everything); "
                   f"{d.get('collapsed_units', 0)} block(s) send every sample to one sub-block (see the plot).")
    if dm["recall@1"] < bm["recall@1"]:
        out.append("- Why we think DFML trails here: the published method trains for many tens of epochs; in "
                   f"{d['params'].get('epochs')} the "
                   "routed and distillation terms pull the shared weights towards sub-networks that are still poor "
                   "(the routed R@1 above), which costs the full network's own loss progress.")
    return out


if __name__ == "__main__":
    main()
