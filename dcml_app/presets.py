"""Named sets of pipeline parameters (`dcml run --config NAME`).

A preset only fills pipeline parameters; `--set key=value` overrides any of
them, and a JSON file of the same shape can be passed instead of a name.
"""

from __future__ import annotations

import json
from pathlib import Path

from dcml.contracts.errors import DcmlError

PRESETS: dict[str, dict] = {
    # The embedded default: Fashion-MNIST, small CNN, class-disjoint split
    # (train on classes 0-4, retrieve among unseen classes 5-9), K=1: one
    # learner measures best (BENCHMARKS.md, "Divide and conquer"); divide
    # and conquer is one parameter away (--set num_clusters=2).
    "demo": {
        "dataset": "fashion-mnist",
        "split_mode": "class-disjoint",
        "max_per_class": 600,
        "backbone": "small_cnn",
        "weights": "none",
        "image_size": 28,
        "embedding_dim": 64,
        "num_clusters": 1,
        "loss": "margin",
        "miner": "reference",
        "classes_per_batch": 4,
        "images_per_class": 8,
        "lr_backbone": 1e-3,
        "lr_embedding": 1e-3,
        "epochs": 4,
        "recluster_every": 2,
        "finetune_epochs": 2,
        "eval_every": 2,
        "freeze_bn": "false",
        "batch_size": 256,
        "ks": "1,2,4,8",
        "experiment": "dcml-demo",
    },
    # Stanford Cars (training half here: 98 train / 98 test classes),
    # EfficientNet-Lite0 with offline ImageNet weights: the recipe of
    # BENCHMARKS.md ("Training recipe", row w512-cos20): the files' 160 px, the
    # fast mode (top 5 blocks + head train on cached activations of 4 views), a
    # 512-d head started from the whitened pretrained features, lr 1e-4 for
    # both with cosine decay over 20 epochs, no fine-tuning epochs after (K=1),
    # and the trained model delivered beside the whitened features (fusion)
    # when validation says so; K=1 (divide and conquer did not beat one learner
    # there either: BENCHMARKS.md; --set num_clusters=4 for the paper's K).
    "cars196": {
        "dataset": "cars196",
        "data_root": "../shared/data/cars196",
        "split_mode": "official",
        "backbone": "efficientnet_lite0",
        "weights": "imagenet",
        "image_size": 160,
        "embedding_dim": 512,
        "train_blocks": 5,
        "fast_views": 4,
        "head_init": "whiten",
        "num_clusters": 1,
        "loss": "margin",
        "miner": "auto",
        "classes_per_batch": 8,
        "images_per_class": 4,
        "lr_backbone": 1e-4,
        "lr_embedding": 1e-4,
        "epochs": 20,
        "schedule": "cosine",
        "recluster_every": 2,
        "finetune_epochs": 0,
        "eval_every": 1,
        "freeze_bn": "true",
        "batch_size": 64,
        "ks": "1,2,4,8",
        "experiment": "dcml-cars196",
    },
}
# A folder of your own images (one sub-folder per class), usually tens of classes: half the classes
# train (15 % of those validate), half test, class-disjoint. The cars196 recipe as the small-data
# benchmark measured it (BENCHMARKS.md, "Small data"): the head started from the whitened pretrained
# features at 512-d, 10 epochs at a constant rate, no fine-tuning epochs after training (K=1), and the
# run's noise-aware choice between the raw features, their whitening and the trained model beside them.
# The MLflow experiment is named after the folder (dcml-<folder>) unless --set experiment=NAME.
PRESETS["folder"] = {
    **{k: v for k, v in PRESETS["cars196"].items() if k not in ("data_root", "experiment", "recluster_every")},
    "dataset": "folder",
    "split_mode": "class-disjoint",
    "epochs": 10,
    "schedule": "constant",
}
FOLDER_EXPERIMENT = "dcml-{name}"  # the experiment of a run on dataset=folder that names none


def load(config: str | None) -> dict:
    """A preset by name, or a JSON file of pipeline parameters."""
    if not config:
        return {}
    if config in PRESETS:
        return dict(PRESETS[config])
    path = Path(config)
    if not path.is_file():
        raise DcmlError(f"{config}: neither a preset ({', '.join(PRESETS)}) nor a JSON file; pass --config demo or a file")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DcmlError(f"{config}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
    if not isinstance(values, dict):
        raise DcmlError(f"{config}: expected a JSON object of pipeline parameters")
    return values
