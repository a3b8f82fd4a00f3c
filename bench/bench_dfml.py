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

import torch

from dcml.contracts import manifest as manifest_lib
from dcml.contracts.checkpoint import load_model
from dcml.algorithm.inference import compute_vectors, default_device
from dcml.contracts.io import atomic_path, write_json
from dcml.algorithm.metrics import evaluate_embeddings
from dcml.contracts.records import git_commit
from dcml.tracking import routing_plot

from bench.common import command_line, log_to_mlflow

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate_checkpoint(path, manifest_path, device) -> dict:
    """All retrieval metrics of a checkpoint on the manifest's test (or query/gallery) split."""
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

    from components.dfml.stage import run as run_dfml

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
                          eval_routed=True, resume=False, **common)
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


if __name__ == "__main__":
    main()
