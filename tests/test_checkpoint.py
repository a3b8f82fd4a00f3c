import json
import pickle

import numpy as np
import pytest
import torch

from dcml import model_files
from dcml.contracts import checkpoint
from dcml.contracts.errors import DcmlError
from dcml.algorithm.models import build_model

torch.set_num_threads(1)
CONFIG = {"backbone": "small_cnn", "embedding_dim": 12, "num_slices": 3}


def saved_model(path):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    # Some non-default BatchNorm statistics, so the buffers are checked too.
    model.backbone.net[1].running_mean.uniform_()
    checkpoint.save(path, {"model_config": model.config, "model": model.state_dict(),
                           "record": json.dumps({"stage": "test"})})
    return model


def test_roundtrip_with_weights_only_and_same_outputs(tmp_path):
    path = tmp_path / "m.pt"
    model = saved_model(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == checkpoint.FORMAT
    loaded, ckpt = model_files.load_model(path)
    assert json.loads(ckpt["record"]) == {"stage": "test"}
    assert loaded.num_slices == 3 and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_save_is_atomic_and_refuses_what_weights_only_cannot_load(tmp_path):
    path = tmp_path / "m.pt"
    saved_model(path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="ndarray"):
        checkpoint.save(path, {"model_config": CONFIG, "model": {}, "extra": np.zeros(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


class NotAllowed:
    pass


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such checkpoint"),
    (lambda p: p.write_bytes(b"garbage, not a zip"), "not a readable checkpoint"),
    (lambda p: p.write_bytes(open(p.parent / "good.pt", "rb").read()[:300]), "not a readable checkpoint"),
    (lambda p: torch.save({"model": {}}, p), "not a dcml checkpoint"),
    (lambda p: torch.save([1, 2], p), "not a dcml checkpoint"),
    (lambda p: torch.save({"format": checkpoint.FORMAT, "model_config": CONFIG, "x": NotAllowed()}, p), "refused: it holds pickled Python objects"),
    (lambda p: torch.save({"format": checkpoint.FORMAT, "model": {}}, p), "lacks 'model_config'"),
])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, make, message):
    saved_model(tmp_path / "good.pt")
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(DcmlError, match=message) as err:
        checkpoint.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_config(tmp_path):
    path = tmp_path / "m.pt"
    model = saved_model(path)
    ckpt = checkpoint.load(path)
    checkpoint.save(path, {**ckpt, "model_config": {**ckpt["model_config"], "embedding_dim": 16}})
    with pytest.raises(DcmlError, match="do not fit"):
        model_files.load_model(path)
    del model


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (pickle.loads, (b"\x80\x04K\x01.",))  # harmless, but not allowlisted

    torch.save({"format": checkpoint.FORMAT, "model_config": CONFIG, "model": Boom()}, path)
    with pytest.raises(DcmlError, match="refused: it holds pickled Python objects"):
        checkpoint.load(path)


def test_compressed_checkpoints_are_dequantised(tmp_path):
    from dcml.methods.quantize import quantize_model, save_compressed

    torch.manual_seed(1)
    model = build_model(CONFIG).eval()
    quantized = quantize_model(model, 8, "kmeans", progress=False)
    path = tmp_path / "small.pt"
    save_compressed(path, model, quantized, record={"stage": "compress"})
    loaded, ckpt = model_files.load_model(path)
    assert ckpt["format"] == checkpoint.COMPRESSED_FORMAT
    x = torch.randn(3, 1, 28, 28)
    ref = model(x)
    out = loaded(x)
    assert not torch.equal(out, ref)  # 8-bit weights: close, not equal
    assert torch.allclose(out, ref, atol=0.05)
    head = loaded.head.weight
    assert len(torch.unique(head)) <= 256
