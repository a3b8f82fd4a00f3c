"""Stage records shaped like the real stages', in real artifact files, for the tracking tests."""

import json

import numpy as np
import pandas as pd
import torch

from dcml.algorithm.models import build_model
from dcml.contracts import checkpoint, records
from dcml.contracts.io import write_json, write_vectors


def fake_lineage(tmp_path, k=2, validated=False, model=None):
    """Records shaped like the real stages', written into real artifact files.

    ``validated``: the training history of a run with a validation split (epoch
    0 = the initial model, scores and no loss; best_epoch per epoch).
    ``model``: also write a real checkpoint of the final model there."""
    ingest = records.StageTimer("ingest", {"dataset": "fashion-mnist", "split_mode": "class-disjoint",
                                           "out": str(tmp_path / "m.parquet")}).finish(metrics={"images": 100})
    manifest = tmp_path / "ingest"
    manifest.mkdir()
    write_json(manifest / "record.json", {"record": ingest})
    cluster = records.StageTimer("cluster", {"k": k, "niter": 20}).finish(
        inputs={"features": manifest}, metrics={"inertia": 1.5, "sizes": [60, 40]})
    cluster_dir = tmp_path / "cluster"
    cluster_dir.mkdir()
    write_json(cluster_dir / "record.json", {"record": cluster})
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "seconds": 2.0,
                **({"recall@1": 0.5 + 0.1 * e} if e % 2 else {}),
                **({"cluster_sizes": [55, 45]} if e == 2 else {})} for e in range(4)]
    if validated:
        history = VALIDATED_HISTORY
    train = records.StageTimer("train", {"mode": "shared", "num_slices": k, "loss": "margin", "margin": 0.2,
                                         "epochs": 4, "backbone": "small_cnn", "embedding_dim": 64,
                                         "seed": 0}).finish(
        inputs={"manifest": manifest, "clusters": cluster_dir}, history=history)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    write_json(train_dir / "record.json", {"record": train})
    finetune = records.StageTimer("finetune", {"epochs": 2}).finish(
        inputs={"manifest": manifest, "checkpoints": [train_dir]}, history=[{"epoch": 0, "loss": 0.2}])
    ft_dir = tmp_path / "finetune"
    ft_dir.mkdir()
    write_json(ft_dir / "record.json", {"record": finetune})
    if model is not None:
        checkpoint.save(model, {"model_config": TINY_MODEL.config, "model": TINY_MODEL.state_dict(),
                                "record": json.dumps(finetune)})
    metrics = {"recall@1": 0.71, "recall@2": 0.8, "recall@4": 0.88, "recall@8": 0.93,
               "nmi": 0.5, "ami": 0.45, "map@r": 0.3, "r_precision": 0.4}
    evaluate = records.StageTimer("evaluate", {"ks": [1, 2, 4, 8]}).finish(
        inputs={"model": ft_dir, "manifest": manifest}, metrics=metrics)
    metrics_path = tmp_path / "metrics.json"
    write_json(metrics_path, {"metrics": metrics, "record": evaluate})
    rng = np.random.default_rng(0)
    emb = tmp_path / "embeddings.parquet"
    labels = rng.integers(0, 5, 200)
    write_vectors(emb, pd.DataFrame({"image_id": [str(i) for i in range(200)], "label": labels, "split": "test"}),
                  rng.normal(size=(200, 16)) + labels[:, None], "embedding", {})
    return metrics_path, emb


# Validation every epoch: epoch 0 is the initial model (no loss), epoch 2 is kept.
VALIDATED_HISTORY = [
    {"epoch": 0, "phase": "initial", "val_recall@1": 0.40, "val_map@r": 0.10, "recall@1": 0.38, "map@r": 0.09},
    {"epoch": 1, "loss": 0.9, "val_recall@1": 0.55, "val_map@r": 0.20, "best_epoch": 1, "recall@1": 0.50,
     "lr": {"backbone": 1e-4, "embedding": 1e-3}},
    {"epoch": 2, "loss": 0.6, "val_recall@1": 0.62, "val_map@r": 0.25, "best_epoch": 2, "recall@1": 0.58},
    {"epoch": 3, "loss": 0.5, "val_recall@1": 0.60, "val_map@r": 0.24, "best_epoch": 2, "recall@1": 0.61,
     "stopped_early": True},
]


def _tiny_model():
    torch.manual_seed(0)
    return build_model({"backbone": "small_cnn", "weights": "none", "embedding_dim": 16, "image_size": 28,
                        "in_channels": 1})


TINY_MODEL = _tiny_model()


def child_runs(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


