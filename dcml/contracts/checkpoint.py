"""The checkpoint format: save atomically, load with ``weights_only=True``.

A checkpoint is ``torch.save`` of a dict holding only tensors, primitives and
containers of them, so ``torch.load(weights_only=True)`` reads it without
running pickled code:

* ``format``: "dcml.checkpoint/1" (or "dcml.compressed/1" for a quantised model)
* ``model_config``: the dict ``dcml.algorithm.models.build_model`` takes
* ``model``: the state_dict
* ``record``: the stage record as a JSON string
* when resumable: ``optimizer``, ``epoch``, ``cluster_state``,
  ``sampler_state``, ``rng``
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from dcml.contracts.errors import DcmlError
from dcml.contracts.io import atomic_path

FORMAT = "dcml.checkpoint/1"
COMPRESSED_FORMAT = "dcml.compressed/1"
FORMATS = (FORMAT, COMPRESSED_FORMAT)

_PRIMITIVES = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size, torch.device)


def _check_loadable(obj, where: str = "ckpt") -> None:
    """Refuse objects torch.load(weights_only=True) would reject (numpy arrays,
    custom classes), at save time rather than at load time."""
    if isinstance(obj, _PRIMITIVES):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is {type(key).__name__}; use str or int keys")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}; checkpoints hold only tensors, primitives and containers")


def save(path: str | os.PathLike, ckpt: dict) -> None:
    """Write ``ckpt`` to ``path`` atomically (``format`` defaults to dcml.checkpoint/1)."""
    ckpt = {"format": FORMAT, **ckpt}
    _check_loadable(ckpt)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def pickled_refusal(path, exc: BaseException) -> str | None:
    """The one line for a file that ``torch.load(weights_only=True)`` refused because it holds
    pickled Python objects (None for other failures): what the file is, and the safe way on
    (re-create it, or re-save only its tensors -- never load it with weights_only=False here)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "Unsupported global" not in text and "Unsupported class" not in text:
        return None  # a damaged file, not a pickled object
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f"pickled Python objects ({found.group(1)})" if found else "pickled Python objects"
    return (f"{path}: refused: it holds {what}, not only tensors, and loading it could run code; re-create it "
            "with the dcml stage that writes it, or, only if you trust its source, in a separate throw-away "
            "environment load it and torch.save() just its state_dict (a dict of tensors), then use that file")


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a bad file is a one-line DcmlError."""
    path = Path(path)
    if not path.is_file():
        raise DcmlError(f"{path}: no such checkpoint; pass a file written by `dcml train` or `dcml finetune`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        refused = pickled_refusal(path, exc)
        if refused:
            raise DcmlError(refused) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DcmlError(f"{path}: not a readable checkpoint ({first[:200]}); re-create it with the stage that writes it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in FORMATS:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DcmlError(f"{path}: not a dcml checkpoint (format {found!r}, expected one of {', '.join(FORMATS)}); re-create it with `dcml train`")
    for key in ("model_config", "model") if ckpt["format"] == FORMAT else ("model_config",):
        if key not in ckpt:
            raise DcmlError(f"{path}: checkpoint lacks '{key}'; re-create it with `dcml train`")
    return ckpt
