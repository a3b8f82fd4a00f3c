"""Models from checkpoint files, plain or compressed (the loaders every stage uses).

The file format itself is dcml.contracts.checkpoint; this module turns a
loaded checkpoint into an EmbeddingModel, dequantising compressed ones
(dcml.methods.quantize.storage).
"""

from __future__ import annotations

import os

from dcml.contracts.checkpoint import COMPRESSED_FORMAT, load
from dcml.contracts.errors import DcmlError


def state_dict_of(ckpt: dict) -> dict:
    """The model weights of a loaded checkpoint, dequantised when compressed."""
    if ckpt.get("format") == COMPRESSED_FORMAT:
        from dcml.methods.quantize.storage import dequantize_state_dict

        return dequantize_state_dict(ckpt)
    return ckpt["model"]


def build_from(ckpt: dict, source: str = "checkpoint", device="cpu"):
    """The EmbeddingModel a loaded checkpoint describes, with its weights."""
    from dcml.algorithm.models import build_model

    if not isinstance(ckpt.get("model_config"), dict):
        raise DcmlError(f"{source}: model_config is not a dict; re-create the checkpoint")
    # The checkpoint holds every weight, so skip fetching pretrained ones.
    model = build_model(dict(ckpt["model_config"]), load_weights=False)
    try:
        model.load_state_dict(state_dict_of(ckpt))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DcmlError(f"{source}: weights do not fit its model_config ({first[:200]}); the file is inconsistent, re-create it") from None
    return model.to(device)


def load_model(path: str | os.PathLike, device="cpu"):
    """(EmbeddingModel in eval mode, checkpoint dict) from a checkpoint file."""
    ckpt = load(path)
    model = build_from(ckpt, str(path), device)
    model.eval()
    return model, ckpt
