"""The compressed checkpoint (``format`` ``dcml.compressed/1``, see
:func:`save_compressed`): each quantised layer's float32 codebook and its
indices bit-packed at B bits, the rest of the state_dict in float32.
:func:`dequantize_state_dict` turns it back into a normal state_dict, which is
what ``dcml.model_files.load_model`` does for this format.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from dcml.contracts.errors import DcmlError

from .codebooks import QuantizedTensor, check_bits

FORMAT = "dcml.compressed/1"


# -- bit packing ------------------------------------------------------------------

def pack_indices(indices, bits: int) -> np.ndarray:
    """Pack integer indices in [0, 2^bits) at ``bits`` bits each (MSB first)
    into ceil(n * bits / 8) bytes."""
    bits = check_bits(bits)
    idx = np.asarray(indices).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for {bits} bits")
    idx = idx.astype(np.uint8)
    planes = np.empty((idx.size, bits), dtype=np.uint8)
    for b in range(bits):
        planes[:, b] = (idx >> (bits - 1 - b)) & 1
    return np.packbits(planes.reshape(-1))


def unpack_indices(packed, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``count`` int64 indices."""
    bits = check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != math.ceil(count * bits / 8):
        raise ValueError(f"{packed.size} packed bytes cannot hold exactly {count} indices of {bits} bits")
    planes = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for b in range(bits):
        out |= planes[:, b].astype(np.int64) << (bits - 1 - b)
    return out


# -- the checkpoint ----------------------------------------------------------------

def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage; copy so only the tensor is stored.
    return t.detach().cpu().contiguous().clone()


def compressed_checkpoint(model: nn.Module, quantized: Mapping[str, QuantizedTensor]) -> dict:
    """The compressed checkpoint dict (without ``record``)."""
    state = model.state_dict()
    missing = [name for name in quantized if name not in state]
    if missing:
        raise DcmlError(f"quantised layer(s) {', '.join(missing[:3])} are not in the model's state_dict")
    layers = {}
    for name, q in quantized.items():
        if tuple(state[name].shape) != tuple(q.shape):
            raise DcmlError(f"quantised layer {name!r} has shape {tuple(q.shape)}, the model's is {tuple(state[name].shape)}")
        layers[name] = {
            "bits": int(q.bits),
            "shape": [int(s) for s in q.shape],
            "codebook": _own_storage(q.codebook.float()),
            "indices": torch.from_numpy(pack_indices(q.indices.numpy(), q.bits)),
        }
    remainder = {}
    for name, t in state.items():
        if name in quantized:
            continue
        remainder[name] = _own_storage(t.float() if t.is_floating_point() else t)
    return {
        "format": FORMAT,
        "model_config": dict(getattr(model, "config", {}) or {}),
        "layers": layers,
        "float": remainder,
    }


def budget_bytes(quantized: Mapping[str, QuantizedTensor], remainder: Mapping[str, torch.Tensor]) -> dict:
    """The theoretical size: packed indices + float32 codebooks + float remainder."""
    index_bytes = sum(math.ceil(q.numel * q.bits / 8) for q in quantized.values())
    codebook_bytes = sum(4 * (1 << q.bits) for q in quantized.values())
    remainder_bytes = sum(t.numel() * t.element_size() for t in remainder.values())
    return {
        "index_bytes": index_bytes,
        "codebook_bytes": codebook_bytes,
        "remainder_bytes": remainder_bytes,
        "budget_bytes": index_bytes + codebook_bytes + remainder_bytes,
    }


def _serialise(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def float_size_bytes(model: nn.Module) -> int:
    """Size of the float32 model as a plain checkpoint (state_dict + config), in bytes."""
    state = {k: _own_storage(v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return len(_serialise({"format": "dcml.checkpoint/1", "model_config": dict(getattr(model, "config", {}) or {}),
                           "model": state, "record": "{}"}))


def save_compressed(path: str | os.PathLike, model: nn.Module, quantized: Mapping[str, QuantizedTensor],
                    record: dict | None = None) -> dict:
    """Write the compressed model atomically; return its size report.

    The file is a ``torch.save`` dict (loadable with ``weights_only=True``):
    ``format`` "dcml.compressed/1", ``model_config``, ``layers`` (per quantised
    weight: ``bits``, ``shape``, float32 ``codebook`` [2^B] and the uint8
    ``indices`` bit-packed at B bits), ``float`` (the rest of the state_dict,
    float32) and ``record`` (JSON string). When ``record`` is given, the size
    report is stored in ``record["metrics"]`` with ``compressed_size_bytes``
    equal to the final file's exact size.
    """
    from dcml.contracts.io import atomic_path

    ckpt = compressed_checkpoint(model, quantized)
    report = budget_bytes(quantized, ckpt["float"])
    report["float_size_bytes"] = float_size_bytes(model)
    report["quantized_weights"] = sum(q.numel for q in quantized.values())
    report["float_params"] = sum(t.numel() for t in ckpt["float"].values())
    record = dict(record) if record is not None else None

    size = 0
    for _ in range(10):  # the record holds the file size: iterate to a fixed point
        report["compressed_size_bytes"] = size
        report["compression_ratio"] = report["float_size_bytes"] / size if size else 0.0
        report["overhead_bytes"] = size - report["budget_bytes"]
        if record is not None:
            record["metrics"] = {**record.get("metrics", {}), **report}
        blob = _serialise({**ckpt, "record": json.dumps(record or {}, sort_keys=True)})
        if len(blob) == size:
            break
        size = len(blob)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(blob)
    report["compressed_size_bytes"] = os.path.getsize(path)
    report["compression_ratio"] = report["float_size_bytes"] / report["compressed_size_bytes"]
    report["overhead_bytes"] = report["compressed_size_bytes"] - report["budget_bytes"]
    return report


def dequantize_state_dict(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """The float32 state_dict of a ``dcml.compressed/1`` checkpoint dict."""
    fix = "re-create it with `dcml compress`"
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise DcmlError(f"compressed model: format is {got!r}, expected {FORMAT!r}; {fix}")
    layers, remainder = ckpt.get("layers"), ckpt.get("float")
    if not isinstance(layers, Mapping) or not isinstance(remainder, Mapping):
        raise DcmlError(f"compressed model: lacks 'layers' or 'float'; {fix}")
    state = dict(remainder)
    for name, entry in layers.items():
        try:
            bits = check_bits(entry["bits"])
            shape = tuple(int(s) for s in entry["shape"])
            codebook = entry["codebook"].float()
            packed = entry["indices"]
        except (KeyError, TypeError, AttributeError, DcmlError) as exc:
            raise DcmlError(f"compressed model: layer {name!r} is malformed ({exc}); {fix}") from None
        if codebook.numel() != 1 << bits:
            raise DcmlError(f"compressed model: layer {name!r} has {codebook.numel()} codebook entries for {bits} bits; {fix}")
        count = math.prod(shape)
        try:
            indices = unpack_indices(packed.numpy(), bits, count)
        except ValueError as exc:
            raise DcmlError(f"compressed model: layer {name!r}: {exc}; {fix}") from None
        state[name] = codebook[torch.from_numpy(indices)].reshape(shape)
    return state

