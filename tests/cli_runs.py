"""`dcml run` as a user runs it, on a tiny folder dataset: helpers of the reliability tests.

Not a test module: tests/test_reliability.py, test_kill_resume.py and
test_concurrent_runs.py load it by path (the suite imports with importlib).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DCML = [sys.executable, "-m", "dcml_app.cli"]
CLASSES, PER_CLASS = 8, 6


def tiny_config(root: Path, **overrides) -> dict:
    return {"dataset": "folder", "data_root": str(root), "split_mode": "class-disjoint", "val_fraction": 0.0,
            "backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 16, "freeze_bn": "false",
            "num_clusters": 2, "niter": 5, "classes_per_batch": 2, "images_per_class": 2, "lr_backbone": 1e-3,
            "lr_embedding": 1e-3, "epochs": 2, "recluster_every": 1, "finetune_epochs": 1, "eval_every": 1,
            "batch_size": 32, "ks": "1,2", "experiment": "reliability", **overrides}


def bmp_dataset(root: Path, seed: int = 0) -> Path:
    """Class folders of 28x28 grey BMP drawings (fixed-size files: an edit keeps the size)."""
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        base = rng.integers(0, 2, size=(28, 28)) * 255
        for i in range(PER_CLASS):
            noisy = np.where(rng.random((28, 28)) < 0.1, 255 - base, base).astype(np.uint8)
            Image.fromarray(noisy, mode="L").save(d / f"{i:02d}.bmp")
    return root


def dcml_run(tmp: Path, config: dict, out: Path, *extra: str, env: dict | None = None, background=False):
    cfg = tmp / f"config-{len(list(tmp.glob('config-*.json')))}.json"
    cfg.write_text(json.dumps(config))
    summary = tmp / f"summary-{time.monotonic_ns()}.json"
    args = [*DCML, "run", "--config", str(cfg), "--output-dir", str(out), "--json-out", str(summary),
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DCML_CACHE_DIR": str(tmp / "digests"), **(env or {})}
    if background:
        return subprocess.Popen(args, cwd=tmp, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True), summary
    # The timeout only guards against a hang: a loaded 2-core machine takes minutes per tiny run.
    done = subprocess.run(args, cwd=tmp, env=full_env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(summary.read_text()), done.stdout


def statuses(summary: dict) -> dict:
    return {s["name"]: s["status"] for s in summary["stages"]}
