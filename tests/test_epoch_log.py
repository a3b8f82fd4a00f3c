"""Per-epoch figures in the stage logs and on `dcml run --verbose`: loss, validation and test R@1 / MAP@R,
the epoch kept (dcml.stagekit.EpochLog, a Trainer callback of every training stage)."""

import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch

from dcml import stagekit
from dcml.algorithm.models import build_model
from dcml.algorithm.training import Trainer, TrainSettings, seed_everything
from dcml.contracts import manifest as manifest_mod
from dcml.contracts import records

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "fmnist_data", REPO / "components" / "train" / "tests" / "fmnist_data.py")
fmnist_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fmnist_data)
EPOCH = re.compile(r"^\s*(initial model|epoch \d+/\d+): (.*)$")  # kfp.local indents a task's output


def figures(line: str) -> dict:
    """{"loss": .., "val R@1": .., "val MAP@R": .., "test R@1": .., "test MAP@R": ..} of an epoch line."""
    out = {}
    for part in EPOCH.match(line).group(2).split(", "):
        words = part.split()
        if words[0] == "loss":
            out["loss"] = float(words[1])
        elif words[0] in ("val", "test"):
            out[f"{words[0]} R@1"] = float(words[2])
            if len(words) > 3:
                out[f"{words[0]} MAP@R"] = float(words[4])
        elif words[0] == "kept":
            out["kept"] = int(words[2])
    return out


def test_every_epoch_logs_its_loss_validation_and_test_figures(tmp_path, capsys):
    path = fmnist_data.make_manifest(tmp_path / "manifest.parquet", per_class=12, train_classes=(0, 1, 2, 3, 4),
                                     test_per_class=8)
    man = manifest_mod.read(path)
    train, test = man.split("train"), man.split("test")
    seed_everything(3)
    model = build_model({"backbone": "small_cnn", "embedding_dim": 16})
    settings = TrainSettings(epochs=2, classes_per_batch=3, images_per_class=4, lr_backbone=1e-3,
                             lr_embedding=1e-3, seed=3, eval_every=1)
    trainer = Trainer(model, man, train, settings, eval_rows=test, val_rows=test.iloc[:20],
                      resume_path=tmp_path / "r.pt")
    history = trainer.fit(callbacks=[stagekit.EpochLog()])
    lines = [line for line in capsys.readouterr().out.splitlines() if EPOCH.match(line)]
    assert [EPOCH.match(line).group(1) for line in lines] == ["initial model", "epoch 1/2", "epoch 2/2"]
    for line, entry in zip(lines, history):
        got = figures(line)
        assert got["val R@1"] == pytest.approx(entry["val_recall@1"], abs=5e-5)
        assert got["val MAP@R"] == pytest.approx(entry["val_map@r"], abs=5e-5)
        assert got["test R@1"] == pytest.approx(entry["recall@1"], abs=5e-5)
        assert got["test MAP@R"] == pytest.approx(entry["map@r"], abs=5e-5)
        if entry["epoch"]:
            assert got["loss"] == pytest.approx(entry["loss"], abs=5e-5)
            assert got["kept"] == entry["best_epoch"]


def test_the_pipelines_stage_logs_and_verbose_console_show_the_epochs(tiny_pipeline, tmp_path):
    from dcml_app.console import PipelineConsole

    run_dir, log_dir = Path(tiny_pipeline.result["run_dir"]), Path(tiny_pipeline.result["log_dir"])
    for task in ("train-shared", "finetune"):
        log = (log_dir / f"{task}.log").read_text()
        lines = [line for line in log.splitlines() if EPOCH.match(line)]
        history = [h for h in records.read(run_dir / task / "model" / "model.pt")["history"] if h["epoch"] > 0]
        epoch_lines = [line for line in lines if EPOCH.match(line).group(1).startswith("epoch ")]
        assert len(epoch_lines) == len(history) > 0, log[-2000:]
        for line, entry in zip(epoch_lines, history):
            got = figures(line)
            assert got["loss"] == pytest.approx(entry["loss"], abs=5e-5)
            assert got["test R@1"] == pytest.approx(entry["recall@1"], abs=5e-5)  # eval_every=1
        # --verbose echoes them to the terminal; the default terminal shows one line per stage only
        for verbose in (True, False):
            terminal = io.StringIO()
            console = PipelineConsole(tmp_path / f"console-{task}-{verbose}", terminal=terminal,
                                      verbose=verbose)
            console.write(log)
            console.close()
            shown = [line for line in terminal.getvalue().splitlines() if EPOCH.match(line)]
            assert shown == (lines if verbose else [])
