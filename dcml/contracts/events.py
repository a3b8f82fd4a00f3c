"""What a running stage tells whoever runs it: progress and a one-line summary.

A stage run by hand shows tqdm bars on a terminal. A stage run by
`dcml run` (the environment variable ``DCML_EVENTS`` is set) writes instead
one JSON line per event to stdout, prefixed with :data:`PREFIX`, which the
local runner turns into one progress bar and one line per stage
(dcml_app/console.py) while everything else goes to the task's log file:

    @@dcml {"event": "progress", "stage": "train", "desc": "epoch 3/10", "n": 50, "total": 108, ...}
    @@dcml {"event": "summary", "stage": "train", "text": "10 epochs, kept epoch 8: val R@1 0.77"}

Progress lines are throttled (at most one every ``DCML_EVENTS_EVERY``
seconds, default 1) so the logs stay small.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterable, Iterator

PREFIX = "@@dcml "
ENV = "DCML_EVENTS"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def emit(event: str, **fields) -> None:
    """Write one event line (only when a runner listens)."""
    if not enabled():
        return
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def parse(line: str) -> dict | None:
    """The event in ``line``, or None for an ordinary log line."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


class _Events:
    """An iterable wrapper that reports its position as progress events."""

    def __init__(self, iterable: Iterable, total: int | None, desc: str, stage: str | None):
        self.iterable, self.total, self.desc, self.stage = iterable, total, desc, stage
        self.every = float(os.environ.get("DCML_EVENTS_EVERY", "1"))
        self.postfix: dict = {}

    def __iter__(self) -> Iterator:
        last = 0.0
        n = 0
        for n, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= self.every:
                last = now
                emit("progress", stage=self.stage, desc=self.desc, n=n, total=self.total, **self.postfix)
        emit("progress", stage=self.stage, desc=self.desc, n=n, total=self.total, done=True, **self.postfix)

    def set_postfix(self, refresh: bool = False, **fields) -> None:
        self.postfix = fields

    def close(self) -> None:
        pass


def progress(iterable: Iterable, total: int | None = None, desc: str = "", unit: str = "it",
             stage: str | None = None, leave: bool = False):
    """tqdm on a terminal (or in Jupyter); progress events under a runner; silent otherwise.

    Either way ``iterable`` is iterated once, lazily, so what is displayed never
    changes what is computed. (tqdm.auto's asyncio class calls ``iter()`` in its
    constructor: on a DataLoader that starts an extra iterator, which draws a
    seed from the global torch RNG and, with workers, starts worker processes
    for nothing; runs would then depend on how their progress is shown.)
    """
    if enabled():
        return _Events(iterable, total, desc, stage or os.environ.get("DCML_STAGE"))
    from tqdm import tqdm

    # disable=None: a bar on a terminal only; Jupyter shows stderr without it being a terminal.
    disable = False if "ipykernel" in sys.modules else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave)
