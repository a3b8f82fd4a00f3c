"""The GPU path: what `make gpu-check` runs (bench/gpu_check.py; docs/SCALE.md says how).

Tests marked ``gpu`` need CUDA and skip without it (those on faiss's GPU also need
a faiss build that sees the GPU: faiss-gpu, as the CUDA images install). Each
compares the GPU with the CPU on the same input, within a stated tolerance:

* embeddings: ``EMBED_ATOL`` = 5e-3 on unit-norm vectors. PyTorch runs CUDA
  convolutions in TF32 by default (cuDNN, Ampere and later: a 10-bit mantissa,
  about 1e-3 relative per product), so GPU and CPU embeddings agree to a few
  1e-3, not to float32 rounding;
* faiss k-means: inertia within 1 % (the same check bench_speed holds dcml's
  k-means to against scikit-learn): GPU sums come in another order, so the runs may
  stop one iteration apart or settle in a neighbouring optimum;
* faiss search: R@1 and MAP@R within 2e-3 absolute (the GPU's GEMM distances
  differ in the last bits, which can swap two near-tied neighbours);
* data-parallel (NCCL, 2+ GPUs): weights within 1e-3 of one process (TF32, and the
  gloo tolerance of tests/test_distributed.py for summing in another order).

Training has no mixed precision (no autocast, no GradScaler anywhere in dcml): the
AMP test asserts that a CUDA training step runs and keeps float32.

The one test here that is not marked ``gpu`` checks that the check refuses cleanly
where there is no CUDA (it hides the GPUs from a child process, so it runs anywhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.contracts.errors import DcmlError

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
EMBED_ATOL = 5e-3
SEARCH_ATOL = 2e-3
INERTIA_RTOL = 0.01
NCCL_ATOL = 1e-3

needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device (make gpu-check runs these on a GPU machine)")


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


needs_faiss_gpu = pytest.mark.skipif(not CUDA or faiss_gpus() == 0,
                                     reason="faiss sees no GPU (install faiss-gpu, as the CUDA images do)")


def small_model(**overrides):
    from dcml.algorithm.models import build_model

    torch.manual_seed(0)
    return build_model({"backbone": "small_cnn", "weights": "none", "image_size": 28, "embedding_dim": 32,
                        "num_slices": 1, **overrides}).eval()


def test_gpu_check_refuses_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("gpu-check:") and "CUDA" in lines[0]


def test_gpu_check_rejects_bad_arguments_before_looking_for_cuda():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--budget-s", "0"], cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--budget-s" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.full
def test_gpu_checks_served_search_step_runs_on_the_cpu():
    """The check's `dcml serve` step, as it runs on a GPU machine, with --device cpu and a few requests."""
    from bench import gpu_check

    if not gpu_check.CARS196.is_dir():
        pytest.skip("cars196 not installed")
    rows = gpu_check.served_search(gpu_check.CARS196, classes=2, requests=6, device="cpu")
    assert [(r["server"], r["clients"]) for r in rows] == [("batched", 1), ("batched", 8), ("unbatched", 1),
                                                           ("unbatched", 8)]
    assert all(r["requests"] == 6 and r["errors"] == 0 and r["requests_per_s"] > 0 for r in rows), rows
    line = gpu_check.serve_line(rows, "cpu")
    assert line.startswith("dcml serve on cpu: batched 1 client(s) ") and line.count("x at 8 (goal 1.5x)") == 2, line


@pytest.mark.gpu
@needs_cuda
def test_model_and_embeddings_on_cuda_match_cpu():
    from dcml.algorithm.inference import resolve_device

    device = resolve_device("cuda")
    assert device.type == "cuda"
    model = small_model()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        on_cpu = model(x)
        model.to(device)
        assert all(p.device.type == "cuda" for p in model.parameters())
        on_gpu = model(x.to(device))
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu.numpy(), atol=EMBED_ATOL)
    with pytest.raises(DcmlError, match="cuda:99"):
        resolve_device("cuda:99")


@pytest.mark.gpu
@needs_cuda
def test_training_step_on_cuda_is_float32_without_amp(tmp_path):
    from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
    from dcml.contracts import manifest as manifest_mod

    man = manifest_mod.read(_fmnist_manifest(tmp_path))
    seed_everything(0)
    model = small_model(embedding_dim=16)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=1, classes_per_batch=4, images_per_class=4, eval_every=0, seed=0)
    trainer = Trainer(model, man, man.split("train"), settings, device="cuda")
    history = trainer.fit(resume=False)
    assert next(model.parameters()).device.type == "cuda"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert np.isfinite(history[0]["loss"])
    moved = max(float((model.state_dict()[k].cpu() - start[k]).abs().max()) for k in start
                if start[k].is_floating_point())
    assert moved > 1e-4


@pytest.mark.gpu
@needs_faiss_gpu
def test_faiss_gpu_kmeans_matches_cpu():
    from bench.common import class_embeddings
    from dcml.algorithm.clustering import kmeans

    x = class_embeddings(20000, 64, seed=0)[0]
    cpu = kmeans(x, 50, seed=0, gpu=False)
    gpu = kmeans(x, 50, seed=0, gpu=True)
    assert gpu.assignments.shape == cpu.assignments.shape and gpu.centroids.dtype == np.float32
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=INERTIA_RTOL)
    direct = ((x / np.linalg.norm(x, axis=1, keepdims=True) - gpu.centroids[gpu.assignments]) ** 2).sum()
    assert gpu.inertia == pytest.approx(direct, rel=1e-3)


@pytest.mark.gpu
@needs_faiss_gpu
def test_faiss_gpu_search_matches_cpu():
    from bench.common import class_embeddings
    from dcml.algorithm.metrics import evaluate_embeddings

    x, labels = class_embeddings(8000, 64, seed=1)
    cpu = evaluate_embeddings(x, labels, include=("recall", "map@r"), gpu=False)
    gpu = evaluate_embeddings(x, labels, include=("recall", "map@r"), gpu=True)
    assert gpu.keys() == cpu.keys()
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=SEARCH_ATOL), key


@pytest.mark.gpu
@needs_cuda
def test_demo_pipeline_runs_on_cuda(tiny_pipeline):
    from dcml.contracts import records

    lineage = list(records.walk(records.read(tiny_pipeline.result["metrics_file"])))
    devices = {r["stage"]: r["extra"].get("device") for r in lineage if r["stage"] in ("extract", "evaluate")}
    assert devices and all(str(d).startswith("cuda") for d in devices.values()), devices
    metrics = tiny_pipeline.result["metrics"]
    assert 0.1 < metrics["recall@1"] <= 1.0  # ten classes: chance is 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="data-parallel on NCCL needs 2+ GPUs")
def test_two_gpu_processes_train_like_one(tmp_path):
    from components.train import stage
    from dcml.contracts import checkpoint

    common = dict(manifest=str(_fmnist_manifest(tmp_path)), num_slices=1,
                  epochs=2, miner="none", resume=False, loss="margin", backbone="small_cnn", weights="none",
                  image_size=28, embedding_dim=16, freeze_bn="true", dropout=0.0, classes_per_batch=4,
                  images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3, eval_every=0, seed=3, device="cuda")
    one = stage.run(out=str(tmp_path / "one.pt"), nproc=1, **common)
    two = stage.run(out=str(tmp_path / "two.pt"), nproc=2, **common)
    assert one["extra"]["processes"] == 1 and two["extra"]["processes"] == 2
    a, b = checkpoint.load(tmp_path / "one.pt")["model"], checkpoint.load(tmp_path / "two.pt")["model"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= NCCL_ATOL


def _fmnist_manifest(tmp_path) -> Path:
    """A small real Fashion-MNIST manifest (the helper of tests/test_distributed.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fmnist_data", ROOT / "components" / "train" / "tests" / "fmnist_data.py")
    fmnist_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fmnist_data)
    return fmnist_data.make_manifest(tmp_path / "manifest.parquet", per_class=16, train_classes=(0, 1, 2, 3, 4, 5),
                                     test_per_class=8)
