"""Stage events and progress: what is shown never changes what is computed."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from dcml.contracts import events


def _rng_after(fn) -> torch.Tensor:
    torch.manual_seed(7)
    fn()
    return torch.random.get_rng_state()


@pytest.mark.parametrize("runner_listens", [False, True])
def test_progress_iterates_a_data_loader_exactly_like_a_plain_loop(monkeypatch, capsys, runner_listens):
    # A DataLoader draws its worker seed from the global RNG each time an iterator
    # starts: a progress bar that starts an extra one (tqdm.auto does) shifts every
    # random number after it, so a run under `dcml run` would differ from the same
    # stage run by hand.
    if runner_listens:
        monkeypatch.setenv(events.ENV, "1")
    else:
        monkeypatch.delenv(events.ENV, raising=False)
    loader = DataLoader(list(range(10)), batch_size=3)
    seen = []
    shown = _rng_after(lambda: seen.extend(int(x.sum()) for x in events.progress(loader, total=len(loader))))
    plain = _rng_after(lambda: [None for _ in loader])
    assert torch.equal(shown, plain)
    assert seen == [3, 12, 21, 9]


def test_events_are_json_lines_only_when_a_runner_listens(monkeypatch, capsys):
    monkeypatch.delenv(events.ENV, raising=False)
    events.emit("summary", text="nothing listens")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(events.ENV, "1")
    events.emit("summary", stage="train", text="10 epochs")
    line = capsys.readouterr().out.strip()
    assert line.startswith(events.PREFIX)
    assert events.parse(line) == {"event": "summary", "stage": "train", "text": "10 epochs"}
    assert events.parse("an ordinary log line") is None
    assert json.loads(line[len(events.PREFIX):])["text"] == "10 epochs"
