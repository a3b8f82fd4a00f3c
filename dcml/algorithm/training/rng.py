"""Random state: seeding, the RNG states as tensors and primitives (weights_only-loadable), item and batch seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

# -- RNG state as tensors and primitives (weights_only-loadable) ----------------

def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker (and python's random) from the loader's generator; numpy too:
    np.random.seed(torch.initial_seed() % 2**32)


def item_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """The augmentation seed of the image at ``position`` of ``batch`` in ``epoch``."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(batch), int(position)]).generate_state(1)[0])


# What draws from a batch's seed (:func:`batch_seed`'s ``stream``).
MINER_STREAM, NOISE_STREAM = 1, 2


def batch_seed(seed: int, epoch: int, batch: int, stream: int) -> int:
    """The seed of one random ``stream`` of ``batch`` in ``epoch`` (a random miner's choices, the dropout and
    stochastic-depth masks): a pure function of the batch's place, the same on every process."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(batch)], spawn_key=(int(stream),))
               .generate_state(1)[0])
