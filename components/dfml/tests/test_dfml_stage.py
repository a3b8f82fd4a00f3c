"""The DFML stage end to end on real Cars196 photos."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from components.dfml import stage
from dcml import model_files
from dcml.contracts.errors import DcmlError
from dcml.algorithm.models import build_model


def test_stage_writes_a_plain_checkpoint_with_routing_history(cars_manifest, tmp_path):
    out = tmp_path / "dfml.pt"
    record = stage.run(manifest=cars_manifest, out=out, image_size=32, embedding_dim=16, groups=3,
                       classes_per_batch=4, images_per_class=2, epochs=2, eval_every=1, eval_routed=True, seed=0)
    assert record["stage"] == "train-dfml"
    assert not (tmp_path / "dfml.pt.resume.pt").exists()

    # A normal dcml checkpoint: loads as the plain EmbeddingModel, no routers.
    model, ckpt = model_files.load_model(out)
    assert ckpt["format"] == "dcml.checkpoint/1"
    assert ckpt["model_config"]["backbone"] == "efficientnet_lite0" and ckpt["model_config"]["num_slices"] == 1
    assert not any("router" in k or "sub_blocks" in k for k in ckpt["model"])
    assert json.loads(ckpt["record"])["exec_id"] == record["exec_id"]

    # Training changed the backbone (sub-block weights were merged back, not the template's).
    torch.manual_seed(0)
    start = build_model(dict(ckpt["model_config"]))
    key = "backbone.net._blocks.5._project_conv.weight"
    assert not torch.equal(start.state_dict()[key], model.state_dict()[key])

    history = record["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert h["loss"] == pytest.approx(h["loss_full"] + 0.5 * h["loss_routed"] + 0.5 * h["distill"], rel=1e-6)
        assert len(h["routing"]) == 16  # one router per MBConv block
        # Every training image of the epoch went to exactly one sub-block per block.
        assert {sum(row) for row in h["routing"].values()} == {h["images"]}
        assert all(len(row) == 3 for row in h["routing"].values())
        assert 0.0 <= h["routing_entropy"] <= 1.0
        assert 0.0 <= h["recall@1"] <= 1.0 and 0.0 <= h["routed_recall@1"] <= 1.0
        assert {sum(row) for row in h["eval_routing"].values()} == {12}  # the 12 test images
    assert record["metrics"]["epochs"] == 2
    assert record["metrics"]["recall@1"] == history[-1]["recall@1"]
    assert record["extra"]["method"] == "dfml" and record["extra"]["routed_scale"] == 3.0
    assert {h["lr"]["router"] for h in history} == {1e-4}

    # The evaluate stage takes the checkpoint as it is.
    from components.evaluate.stage import run as evaluate

    metrics = evaluate(out=tmp_path / "metrics.json", model=out, manifest=cars_manifest, split="test", ks=(1,))
    assert metrics["metrics"]["recall@1"] == pytest.approx(history[-1]["recall@1"])


def test_bad_input_is_a_one_line_error(cars_manifest, tmp_path):
    with pytest.raises(DcmlError, match="cannot be factorised"):
        stage.run(manifest=cars_manifest, out=tmp_path / "x.pt", backbone="small_cnn")
    with pytest.raises(DcmlError, match="temperature"):
        stage.run(manifest=cars_manifest, out=tmp_path / "x.pt", image_size=32, temperature=0, epochs=1)
    assert not (tmp_path / "x.pt").exists()
    result = CliRunner().invoke(stage.cli, ["--manifest", str(cars_manifest), "--out", str(tmp_path / "y.pt"),
                                            "--groups", "1", "--image-size", "32"])
    assert isinstance(result.exception, DcmlError) and "at least 2" in str(result.exception)


@pytest.mark.slow
def test_two_processes_route_and_count_every_image_once(cars_manifest, tmp_path):
    """DFML data parallel (gloo, 2 CPU processes): both passes gathered, routing counts summed.

    Not compared weight by weight with one process: EfficientNet-Lite's drop-connect
    draws its masks per process (tests/test_distributed.py checks the equivalence
    on models without random layers)."""
    record = stage.run(manifest=cars_manifest, out=tmp_path / "dfml.pt", image_size=32, embedding_dim=16, groups=3,
                       classes_per_batch=4, images_per_class=2, epochs=1, eval_every=1, seed=0, nproc=2)
    assert record["extra"]["processes"] == 2
    (h,) = record["history"]
    assert h["images"] == 8 * h["batches"]
    # Each process routed its share; the epoch's counts are the sum over both.
    assert {sum(row) for row in h["routing"].values()} == {h["images"]}
    assert h["loss"] == pytest.approx(h["loss_full"] + 0.5 * h["loss_routed"] + 0.5 * h["distill"], rel=1e-6)
    model, _ = model_files.load_model(tmp_path / "dfml.pt")
    assert not any("router" in k for k in model.state_dict())
