"""Batched backbone features or embeddings of manifest rows (eval transforms)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dcml.algorithm.data import ManifestImageDataset, build_transform
from dcml.contracts.errors import DcmlError
from dcml.contracts.events import progress

KINDS = ("embedding", "features")


def _worker_message(message: str) -> str:
    """A DataLoader worker re-raises with the whole traceback in the message; keep the error itself."""
    marker = "DcmlError: "
    if message.startswith("Caught DcmlError") and marker in message:
        return message.rsplit(marker, 1)[1]
    return message


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(device=None) -> torch.device:
    """The device asked for, checked before any work (None, "" or "auto": CUDA when
    available, else CPU): a name torch does not know, a GPU this machine does not
    have, or a GPU index past the last one is a one-line DcmlError."""
    if device in (None, "", "auto"):
        return default_device()
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, TypeError, ValueError):
            raise DcmlError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DcmlError(f"--device {device}: no CUDA GPU is visible on this machine; "
                            "pass --device cpu or leave --device unset")
        if dev.index is not None and dev.index >= count:
            raise DcmlError(f"--device {device}: {count} GPU(s) visible (cuda:0..cuda:{count - 1}); pick one of them")
    elif dev.type != "cpu":
        raise DcmlError(f"--device {device}: dcml runs on cpu or cuda; pass one of them")
    return dev


def compute_vectors(model, manifest, rows: pd.DataFrame, kind: str = "embedding", batch_size: int = 128,
                    device=None, num_workers: int = 0, desc: str | None = None) -> np.ndarray:
    """float32 [len(rows), dim]: ``model.features`` (kind="features", pooled, not
    normalised) or ``model(x)`` (kind="embedding", each slice unit-norm) of every row.

    Runs in eval mode without autograd; the model's train/eval mode and device
    are restored afterwards. ``device=None`` uses the model's current device.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    first_param = next(model.parameters())
    home = first_param.device
    device = torch.device(device) if device is not None else home
    dataset = ManifestImageDataset(manifest, rows, build_transform(model.config, train=False))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    was_training = model.training
    model.eval()
    model.to(device)
    out = None
    try:
        with torch.inference_mode():
            for images, _, index in progress(loader, total=len(loader), desc=desc or f"{kind} ({len(dataset)} images)",
                                         unit="batch"):
                images = images.to(device, non_blocking=True)
                vectors = model.features(images) if kind == "features" else model(images)
                if out is None:
                    out = np.empty((len(dataset), vectors.shape[1]), dtype=np.float32)
                out[index.numpy()] = vectors.float().cpu().numpy()
    except DcmlError as exc:
        raise DcmlError(_worker_message(str(exc))) from None
    finally:
        model.to(home)
        model.train(was_training)
    if out is None:  # no rows: the dimension still comes from the model
        dim = model.backbone.out_features if kind == "features" else model.embedding_dim
        out = np.empty((0, dim), dtype=np.float32)
    return out
