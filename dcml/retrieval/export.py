"""Export a dcml model to TorchScript or ONNX: a file that embeds images without dcml.

The exported network takes ``pixels``, float32 [batch, C, S, S] with values
in [0, 1] (the image decoded, converted to the model's colour mode, resized
and centre-cropped as the file's metadata says), applies the model's input
normalisation itself and returns ``embedding`` [batch, dim] (each of the
model's slices unit-norm, as dcml's own embeddings). The metadata travels
inside the file: TorchScript extra file ``dcml.json``, ONNX metadata property
``dcml``.

Before the file is written (atomically), the export runs on real images and
its embeddings are compared with the PyTorch model's on the same images
through dcml's own transform; a difference above :data:`TOLERANCE` is an
error and nothing is written.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dcml.contracts.errors import DcmlError
from dcml.contracts.io import atomic_path, check_writable

FORMATS = ("torchscript", "onnx")
FORMAT = "dcml.export/1"
TOLERANCE = 1e-4
METADATA_KEY = "dcml"  # ONNX metadata property
EXTRA_FILE = "dcml.json"  # TorchScript extra file


class PixelsToEmbedding(nn.Module):
    """[0, 1] pixels -> the model's input normalisation -> embedding."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def preprocessing(config: dict) -> dict:
    """How a consumer without dcml turns an image into ``pixels`` (the eval transform, described)."""
    from dcml.algorithm.data import build_transform, eval_resize_size

    size = int(config["image_size"])
    small = config["backbone"] == "small_cnn"
    transform = build_transform(config, train=False)
    return {"color_mode": transform.mode, "resize_shorter_side": size if small else eval_resize_size(size),
            "center_crop": size, "interpolation": "bilinear, antialiased (PIL Image.resize)",
            "resize_only_if_not": [size, size] if small else None, "jpeg_draft": transform.draft_size,
            "value_range": [0.0, 1.0], "layout": "NCHW float32"}


def export(model, fmt: str, out: str | os.PathLike, images: list, model_sha256: str = "") -> dict:
    """Write ``model`` (an EmbeddingModel) to ``out`` in ``fmt`` after checking it on ``images`` (PIL);
    returns the metadata stored in the file (with the check's numbers)."""
    from dcml.algorithm.data import build_transform, normalization

    if fmt not in FORMATS:
        raise DcmlError(f"--format {fmt!r}: unknown; use one of {', '.join(FORMATS)}")
    if not images:
        raise DcmlError("export: no images to check the export on; pass --manifest M or --image PATH")
    out = check_writable(out)
    model = model.to("cpu").eval()
    config = dict(model.config)
    wrapper = PixelsToEmbedding(model, *normalization(config)).eval()
    pixels = torch.stack([build_transform(config, train=False, normalize=False)(img) for img in images])
    with torch.inference_mode():
        reference = model(torch.stack([build_transform(config, train=False)(img) for img in images])).numpy()
    meta = {"format": FORMAT, "export_format": fmt,
            "input": {"name": "pixels", "shape": ["batch", *pixels.shape[1:]], "dtype": "float32"},
            "output": {"name": "embedding", "dim": int(reference.shape[1]), "num_slices": int(config["num_slices"]),
                       "note": "each slice is L2-normalised; compare embeddings by inner product or L2"},
            "preprocessing": preprocessing(config), "normalization_inside": dict(zip(("mean", "std"),
                                                                                      normalization(config))),
            "model_config": config, "model_sha256": model_sha256}
    # Tracer and TorchScript deprecation warnings are chatter here: the check below is what counts.
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            _write_torchscript(wrapper, pixels, tmp, meta)
        else:
            _write_onnx(wrapper, pixels, tmp, meta)
        got = run_exported(tmp, fmt, pixels.numpy())
        diff = float(np.abs(got - reference).max())
        meta["check"] = {"images": len(images), "max_abs_diff": diff, "tolerance": TOLERANCE}
        if not diff <= TOLERANCE:
            raise DcmlError(f"{out}: the {fmt} export differs from the PyTorch model by {diff:.2e} (> {TOLERANCE:g}) "
                            f"on {len(images)} images; export to the other format or report the model")
        _set_metadata(tmp, fmt, meta)
    return meta


def _write_torchscript(wrapper, pixels, dest: Path, meta: dict) -> None:
    traced = torch.jit.trace(wrapper, pixels[:1], check_trace=False)
    torch.jit.save(traced, str(dest), _extra_files={EXTRA_FILE: json.dumps(meta)})


def _write_onnx(wrapper, pixels, dest: Path, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(wrapper, (pixels[:2] if len(pixels) > 1 else pixels.repeat(2, 1, 1, 1),), str(dest),
                      dynamo=True, input_names=["pixels"], output_names=["embedding"],
                      dynamic_shapes=({0: batch},), verbose=False, external_data=False)


def _set_metadata(path: Path, fmt: str, meta: dict) -> None:
    """Store the final metadata (with the check's numbers) inside the file."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        torch.jit.save(module, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})
        return
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


def run_exported(path: str | os.PathLike, fmt: str, pixels: np.ndarray) -> np.ndarray:
    """Embeddings of ``pixels`` from an exported file (as a consumer would run it)."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
        with torch.inference_mode():
            return module(torch.from_numpy(pixels)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"pixels": pixels})[0]
