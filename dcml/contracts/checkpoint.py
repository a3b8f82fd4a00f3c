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
    """dcml's one line for a file ``torch.load(weights_only=True)`` refused (None for other failures, such
    as a truncated file): one that holds pickled Python objects -- any kind of global, ``os.system`` as
    much as a class -- is refused with the safe way on (re-save the weights as a plain state_dict); one
    that is no PyTorch file at all says what it is. Never torch's own text, which suggests
    ``weights_only=False``: exactly what must not be done with such a file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    names = _pickled_globals(path) or list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", text)))
    if names or "Unsupported global" in text or "Unsupported class" in text:
        what = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        return (f"{path}: refused: it holds pickled Python objects{what}, not only tensors, and loading it could "
                "run code; re-save the weights as a plain state_dict (a dict of tensors) -- only if you trust "
                "its source, and in a separate throw-away environment -- or re-create it with the dcml stage "
                "that writes it")
    if "weights_only" in text or "Weights only load failed" in text:
        return f"{path}: not a readable checkpoint ({_file_kind(path)}); pass a model file written by dcml"
    return None


def _pickled_globals(path) -> list[str]:
    """The globals (functions, classes) a checkpoint's pickle names that weights_only loading does not
    allow, read without unpickling anything ([] when they cannot be listed)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint, damaged: nothing to list
        return []


def _file_kind(path) -> str:
    """What a file that is no checkpoint looks like, from its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return "unreadable"
    kinds = {b"PAR1": "a Parquet table", b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image",
             b"{": "a JSON or text file", b"PK": "a zip archive"}
    kind = next((kind for magic, kind in kinds.items() if head.startswith(magic)), None)
    return f"{kind}, not a PyTorch file" if kind else "not a PyTorch file of tensors"


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
