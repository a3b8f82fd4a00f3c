"""The compress stage end to end on a small_cnn and a tiny embedded-image manifest."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from components.compress.stage import run
from dcml.contracts import manifest as manifest_lib
from dcml.methods import quantize as Q
from dcml.contracts import records
from dcml.contracts.checkpoint import load
from dcml.model_files import load_model
from dcml_app.cli import cli
from dcml.contracts.errors import DcmlError
from dcml.algorithm.inference import compute_vectors

torch.set_num_threads(1)
SMALL = {"classes_per_batch": 4, "images_per_class": 2, "miner": "none"}


def test_loss_aware_with_finetuning_loads_and_embeds(tmp_path, tiny_manifest, tiny_checkpoint):
    out = tmp_path / "compressed.pt"
    record = run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, bits=3, method="loss-aware",
                 importance_batches=3, finetune_steps=2, **SMALL)
    m = record["metrics"]
    assert m["compressed_size_bytes"] == os.path.getsize(out)
    assert m["importance_batches_used"] == 3 and len(record["history"]) == 2
    assert m["quantized_layers"] == 4  # three convs + the head
    assert m["equalized_layers"] == 3 and m["bias_corrected_batchnorms"] == 3  # each conv feeds a BatchNorm
    assert m["budget_bytes"] < m["compressed_size_bytes"] < m["float_size_bytes"] / 4
    assert records.read(out)["metrics"]["compressed_size_bytes"] == m["compressed_size_bytes"]
    assert records.read(out)["inputs"]["model"]["exec_id"] == "parent"
    assert set(record["extra"]["layers"]) == {"backbone.net.0.weight", "backbone.net.4.weight",
                                              "backbone.net.8.weight", "head.weight"}

    base, _ = load_model(tiny_checkpoint)
    model, ckpt = load_model(out)
    assert ckpt["format"] == "dcml.compressed/1" and model.config == base.config
    quantized = Q.quantizable_weights(model)
    for name, p in model.state_dict().items():
        if name in quantized:
            assert torch.unique(p).numel() <= 8, name
            assert not torch.equal(p, base.state_dict()[name])
    # equalisation, bias correction and fine-tuning moved the BatchNorms
    assert not torch.equal(model.state_dict()["backbone.net.1.running_mean"],
                           base.state_dict()["backbone.net.1.running_mean"])

    man = manifest_lib.read(tiny_manifest)
    rows = man.split("test")
    emb = compute_vectors(model, man, rows)
    ref = compute_vectors(base, man, rows)
    assert emb.shape == (12, 16) and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert (emb * ref).sum(axis=1).mean() > 0.9  # 3-bit weights: close to, not equal to, the float model
    assert not np.allclose(emb, ref, atol=1e-4)

    # same seed, same file contents
    again = tmp_path / "again.pt"
    run(model=tiny_checkpoint, manifest=tiny_manifest, out=again, bits=3, method="loss-aware",
        importance_batches=3, finetune_steps=2, **SMALL)
    first, second = load(out), load(again)
    for name in first["layers"]:
        assert torch.equal(first["layers"][name]["codebook"], second["layers"][name]["codebook"])
        assert torch.equal(first["layers"][name]["indices"], second["layers"][name]["indices"])
    for name in first["float"]:
        assert torch.equal(first["float"][name], second["float"][name]), name


def test_plain_codebooks_keep_every_float_parameter(tmp_path, tiny_manifest, tiny_checkpoint):
    """Without equalisation, bias correction and float fine-tuning, only the
    conv/linear weights change; metric-loss fine-tuning moves the centroids."""
    out = tmp_path / "plain.pt"
    record = run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, bits=3, method="kmeans",
                 finetune_steps=3, finetune_loss="metric", finetune_float=False, equalize=False,
                 bias_correction=False, **SMALL)
    assert record["metrics"]["equalized_layers"] == 0 and record["metrics"]["bias_corrected_batchnorms"] == 0
    base, _ = load_model(tiny_checkpoint)
    model, _ = load_model(out)
    quantized = Q.quantizable_weights(model)
    for name, p in model.state_dict().items():
        if name not in quantized:  # biases, BatchNorm: untouched float32
            assert torch.equal(p, base.state_dict()[name]), name
    km = Q.quantize_model(base, 3, "kmeans", progress=False)
    tuned = load(out)["layers"]
    assert any(not torch.allclose(tuned[n]["codebook"], km[n].codebook) for n in km)


def test_equalisation_and_bias_correction_bring_2_bit_weights_closer_to_float(tmp_path, tiny_manifest,
                                                                                 tiny_checkpoint):
    man = manifest_lib.read(tiny_manifest)
    rows = man.split("test")
    base, _ = load_model(tiny_checkpoint)
    ref = compute_vectors(base, man, rows)

    def cosine(**opts):
        out = tmp_path / f"{len(opts)}.pt"
        run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, bits=2, method="kmeans", **opts, **SMALL)
        return float((compute_vectors(load_model(out)[0], man, rows) * ref).sum(axis=1).mean())

    plain = cosine(equalize=False, bias_correction=False)
    corrected = cosine(equalize=False)
    both = cosine()
    assert corrected > plain and both > plain


def test_loss_aware_codebooks_differ_from_plain_kmeans(tmp_path, tiny_manifest, tiny_checkpoint):
    run(model=tiny_checkpoint, manifest=tiny_manifest, out=tmp_path / "km.pt", bits=2, method="kmeans", **SMALL)
    run(model=tiny_checkpoint, manifest=tiny_manifest, out=tmp_path / "la.pt", bits=2, method="loss-aware",
        importance_batches=2, **SMALL)
    km, la = load(tmp_path / "km.pt")["layers"], load(tmp_path / "la.pt")["layers"]
    assert set(km) == set(la)
    assert any(not torch.allclose(km[n]["codebook"], la[n]["codebook"]) for n in km)


def test_cli_writes_a_checkpoint_evaluate_can_load(tmp_path, tiny_manifest, tiny_checkpoint):
    out = tmp_path / "u.pt"
    result = CliRunner().invoke(cli, ["compress", "--model", tiny_checkpoint, "--manifest", tiny_manifest,
                                      "--bits", "2", "--method", "uniform", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "uniform 2 bits, 4 layers" in result.output
    model, _ = load_model(out)
    assert all(torch.unique(p).numel() <= 4 for p in Q.quantizable_weights(model).values())
    bad = CliRunner().invoke(cli, ["compress", "--model", tiny_checkpoint, "--manifest", tiny_manifest,
                                   "--bits", "9", "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and not (tmp_path / "x.pt").exists()


def test_bad_inputs_fail_cleanly_without_output(tmp_path, tiny_manifest, tiny_checkpoint):
    out = tmp_path / "never.pt"
    with pytest.raises(DcmlError, match="pair-based loss"):
        run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, loss="proxy_anchor")
    with pytest.raises(DcmlError, match="no such checkpoint"):
        run(model=tmp_path / "missing.pt", manifest=tiny_manifest, out=out)
    with pytest.raises(DcmlError, match="method"):
        run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, method="kmedoids")
    with pytest.raises(DcmlError, match="finetune-loss"):
        run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, finetune_steps=1, finetune_loss="mse")
    with pytest.raises(DcmlError, match="calibration-images"):
        run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, method="kmeans", calibration_images_count=1)
    # an untrained model collapses all images together: the reference miner finds
    # no negative beyond its cutoff, so the loss (and the importance) is zero
    with pytest.raises(DcmlError, match="zero on all"):
        run(model=tiny_checkpoint, manifest=tiny_manifest, out=out, importance_batches=2,
            classes_per_batch=4, images_per_class=2, miner="reference")
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_train_rows_are_needed_only_for_calibration_importance_or_finetuning(tmp_path, tiny_manifest, tiny_checkpoint):
    man = manifest_lib.read(tiny_manifest)
    test_only = tmp_path / "test_only.parquet"
    manifest_lib.write(test_only, man.df[man.df["split"] == "test"].reset_index(drop=True), man.meta)
    out = tmp_path / "q.pt"
    with pytest.raises(DcmlError, match="no 'train' rows.*--no-equalize"):
        run(model=tiny_checkpoint, manifest=test_only, out=out, method="kmeans")
    assert not out.exists()
    record = run(model=tiny_checkpoint, manifest=test_only, out=out, method="kmeans", equalize=False,
                 bias_correction=False)
    assert out.exists() and record["metrics"]["quantized_layers"] == 4
