import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from components.finetune.stage import cli, merge_checkpoints, run
from components.train.stage import run as train_run
from dcml import model_files
from dcml.contracts import checkpoint
from dcml.contracts import manifest as manifest_mod
from dcml.contracts.errors import DcmlError
from dcml.contracts.io import write_parquet
from dcml.algorithm.models import build_model

CONFIG = {"backbone": "small_cnn", "embedding_dim": 12, "num_slices": 3, "freeze_bn": False}
FAST = dict(classes_per_batch=2, images_per_class=4, lr_backbone=1e-3, lr_embedding=1e-3, seed=1)


def synthetic_workers(tmp_path, k=3, config=CONFIG):
    """k worker checkpoints whose every parameter and buffer differs."""
    paths, states = [], []
    for c in range(k):
        torch.manual_seed(100 + c)
        model = build_model(config)
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn_like(t))
                else:
                    t.fill_(10 + c)
        path = tmp_path / f"w{c}.pt"
        checkpoint.save(path, {"model_config": model.config, "model": model.state_dict(), "record": "{}",
                               "worker": {"cluster_id": c, "k": k, "freeze_backbone": False}})
        paths.append(str(path))
        states.append({k_: v.clone() for k_, v in model.state_dict().items()})
    return paths, states


def test_merge_places_slices_and_averages_backbones_exactly(tmp_path):
    paths, states = synthetic_workers(tmp_path)
    # Given in scrambled order: slices follow cluster ids, not argument order.
    order = [2, 0, 1]
    model, merged_from = merge_checkpoints([(paths[i], checkpoint.load(paths[i])) for i in order])
    assert merged_from == [0, 1, 2] and model.num_slices == 3
    merged = model.state_dict()
    for name, tensor in merged.items():
        if name.startswith("head."):
            for c in range(3):
                start, stop = model.slice_bounds(c)
                assert torch.equal(tensor[start:stop], states[c][name][start:stop]), (name, c)
        elif tensor.is_floating_point():
            expected = np.mean([s[name].double().numpy() for s in states], axis=0).astype(np.float32)
            np.testing.assert_array_equal(tensor.numpy(), expected, err_msg=name)
            assert not torch.equal(tensor, states[0][name])
        else:  # num_batches_tracked: the first worker's
            assert torch.equal(tensor, states[0][name])
    assert any(n.endswith("running_var") for n in merged)  # BatchNorm buffers were averaged too

    first, _ = merge_checkpoints([(p, checkpoint.load(p)) for p in paths], merge="first")
    for name, tensor in first.state_dict().items():
        if name.startswith("backbone."):
            assert torch.equal(tensor, states[0][name]), name


def test_merge_refuses_inconsistent_workers(tmp_path):
    paths, _ = synthetic_workers(tmp_path)
    other, _ = synthetic_workers(tmp_path / "o", config={**CONFIG, "embedding_dim": 15})
    load = lambda ps: [(p, checkpoint.load(p)) for p in ps]  # noqa: E731
    with pytest.raises(DcmlError, match="model_config 'embedding_dim' is 15"):
        merge_checkpoints(load([paths[0], paths[1], other[2]]))
    with pytest.raises(DcmlError, match="cluster_id 1 is also in"):
        merge_checkpoints(load([paths[0], paths[1], paths[1]]))
    with pytest.raises(DcmlError, match="2 checkpoints were given"):
        merge_checkpoints(load(paths[:2]))
    plain = tmp_path / "plain.pt"
    ckpt = checkpoint.load(paths[0])
    checkpoint.save(plain, {k: v for k, v in ckpt.items() if k != "worker"})
    with pytest.raises(DcmlError, match="plain.pt: not a worker checkpoint"):
        merge_checkpoints(load([paths[0], str(plain), paths[2]]))


@pytest.fixture(scope="module")
def frozen_workers(fm_manifest, tmp_path_factory):
    """Two real workers (1 epoch each) trained with the backbone frozen."""
    tmp = tmp_path_factory.mktemp("workers")
    ids = manifest_mod.read(fm_manifest).split("train")["image_id"].tolist()
    clusters = tmp / "clusters.parquet"
    write_parquet(clusters, pa.table({"image_id": ids, "cluster": pa.array(np.arange(len(ids)) % 2, pa.int64())}), {"k": 2})
    paths = []
    for c in range(2):
        path = tmp / f"worker{c}.pt"
        train_run(manifest=fm_manifest, clusters=clusters, out=path, mode="worker", cluster_id=c, epochs=1,
                  freeze_backbone=True, backbone="small_cnn", embedding_dim=8, **FAST)
        paths.append(str(path))
    return paths


def test_merge_only_equals_the_workers_slices_side_by_side(fm_manifest, frozen_workers, tmp_path):
    out = tmp_path / "merged.pt"
    record = run(manifest=fm_manifest, checkpoints=frozen_workers, out=out, epochs=0)
    merged, ckpt = model_files.load_model(out)
    assert merged.num_slices == 2 and ckpt["merged_from"] == [0, 1]
    assert [r["name"] for r in record["inputs"]["checkpoints"]] == ["train-worker-0", "train-worker-1"]
    workers = [model_files.load_model(p)[0] for p in frozen_workers]
    x = torch.stack([torch.rand(1, 28, 28) for _ in range(5)])
    with torch.no_grad():
        expected = torch.cat([workers[k](x, learner=k) for k in range(2)], dim=1)
        assert torch.allclose(merged(x), expected, atol=1e-6)
        # Each worker's own slice differs from the other's untouched one.
        assert not torch.allclose(workers[0](x, learner=1), expected[:, 4:], atol=1e-4)


def test_merge_then_finetune_and_cli(fm_manifest, frozen_workers, tmp_path):
    out = tmp_path / "final.pt"
    args = ["--manifest", str(fm_manifest), "--out", str(out), "--epochs", "1", "--eval-every", "1",
            "--classes-per-batch", "2", "--images-per-class", "4", "--lr-backbone", "1e-3", "--lr-embedding", "1e-3"]
    for p in frozen_workers:
        args += ["--checkpoint", p]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    model, ckpt = model_files.load_model(out)
    assert model.num_slices == 1
    record = json.loads(ckpt["record"])
    assert len(record["inputs"]["checkpoints"]) == 2 and record["history"][0]["phase"] == "finetune"
    assert 0 <= record["metrics"]["recall@1"] <= 1
    assert not (tmp_path / "final.pt.resume.pt").exists()


def test_single_checkpoint_is_finetuned_without_merge(fm_manifest, frozen_workers, tmp_path):
    out = tmp_path / "ft.pt"
    record = run(manifest=fm_manifest, checkpoints=frozen_workers[0], out=out, epochs=1, **FAST)
    model, ckpt = model_files.load_model(out)
    assert model.num_slices == 1 and "merged_from" not in ckpt
    assert record["extra"]["merged_from"] is None and len(record["history"]) == 1
    before = checkpoint.load(frozen_workers[0])["model"]
    assert not torch.equal(before["backbone.net.0.weight"], model.state_dict()["backbone.net.0.weight"])


def test_whole_embedding_on_cluster_batches_after_the_merge_then_all_data(fm_manifest, frozen_workers, tmp_path):
    """The parallel mode's analogue of the reference schedule: the merged K-slice model first trains the whole
    embedding on one-cluster batches (re-clustered), then K=1 on all data."""
    clusters = Path(frozen_workers[0]).parent / "clusters.parquet"
    out = tmp_path / "ft.pt"
    record = run(manifest=fm_manifest, checkpoints=frozen_workers, out=out, clusters=clusters, epochs=1,
                 finetune_cluster_epochs=2, recluster_every=1, **FAST)
    history = record["history"]
    assert [h["phase"] for h in history] == ["clusters", "clusters", "finetune"]
    assert [h.get("loss_on") for h in history] == ["whole", "whole", None]
    assert "cluster_sizes" in history[1]  # re-clustered at epoch 2
    assert [h["num_slices"] for h in history] == [2, 2, 1]
    model, _ = model_files.load_model(out)
    assert model.num_slices in (1, 2)  # the epoch kept on validation decides
    with pytest.raises(DcmlError, match="needs the clusters the workers trained on"):
        run(manifest=fm_manifest, checkpoints=frozen_workers, out=tmp_path / "x.pt", finetune_cluster_epochs=1, **FAST)
