"""`dcml run --config folder`: a user's own folder of real photos, end to end (the small-data preset)."""

import importlib.util
import json
from pathlib import Path

import pytest

from dcml.algorithm import baseline
from dcml.model_files import load_model

CARS = Path("/work/shared/data/cars196")
_spec = importlib.util.spec_from_file_location("cli_runs", Path(__file__).with_name("cli_runs.py"))
cli_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_runs)


def photo_folder(root: Path, classes: int = 16, per_class: int = 5) -> Path:
    """``classes`` class folders of real cars196 photos, as a user would lay them out."""
    if not CARS.is_dir():
        pytest.skip(f"{CARS}: cars196 not here")
    for name in sorted(p.name for p in CARS.iterdir() if p.is_dir())[:classes]:
        (root / name).mkdir(parents=True)
        for f in sorted((CARS / name).iterdir())[:per_class]:
            (root / name / f.name).write_bytes(f.read_bytes())
    return root


@pytest.mark.full
def test_the_folder_preset_runs_on_a_tiny_folder_and_says_how_sure_it_is(tmp_path):
    folder = photo_folder(tmp_path / "my_cars")
    out = tmp_path / "runs"
    # the preset as it is, made small enough for a test: 64 px, one epoch, one cached view, 2 validation classes
    summary, stdout = cli_runs.dcml_run(tmp_path, {}, out, "--config", "folder", "--set", f"data_root={folder}",
                                        "--set", "image_size=64", "--set", "epochs=1", "--set", "fast_views=1",
                                        "--set", "val_fraction=0.3")
    assert set(cli_runs.statuses(summary).values()) == {"ok"}
    # its own experiment, named after the folder
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_experiment_by_name("dcml-my_cars") is not None
    run = client.get_run(summary["mlflow"]["mlflow_run_id"])
    choice = run.data.tags["dcml.choice"]
    assert choice.startswith("delivered ") and "over 2 validation classes" in choice
    # the headline, which candidate and why, and a warning when the 2 classes could not decide
    lines = stdout.splitlines()
    assert any(line.startswith("pretrained features -> ") for line in lines)
    assert choice in lines
    warned = [line for line in lines if line.startswith("warning: 2 validation classes")]
    assert bool(warned) == ("dcml.warning" in run.data.tags)
    model, ckpt = load_model(Path(summary["run_dir"]) / "finetune" / "model" / "model.pt")
    record = json.loads(ckpt["record"])
    delivered = record["metrics"]["delivered"]
    assert delivered in (baseline.PRETRAINED, baseline.WHITENED, baseline.FUSED)
    assert run.data.tags["dcml.delivered"] == delivered
    m = record["metrics"]
    beside = m["whitened_width"] if m["whitening_adopted"] else 1280
    widths = {baseline.PRETRAINED: 1280, baseline.WHITENED: m["whitened_width"], baseline.FUSED: 512 + beside}
    assert model.embedding_dim == widths[delivered]


def test_the_folder_preset_names_its_experiment_after_the_folder_and_needs_one(tmp_path):
    from dcml.contracts.errors import DcmlError
    from dcml_app.runner import resolve_arguments

    (tmp_path / "holiday photos").mkdir()
    root = f"data_root={tmp_path / 'holiday photos'}"
    assert resolve_arguments("folder", (root,))["experiment"] == "dcml-holiday photos"
    assert resolve_arguments("folder", (root, "experiment=mine"))["experiment"] == "mine"
    # a built-in preset's experiment does not capture a run on someone's own folder
    assert resolve_arguments("cars196", ("dataset=folder", root))["experiment"] == "dcml-holiday photos"
    with pytest.raises(DcmlError, match=r"pass --set data_root=DIR"):
        resolve_arguments("folder", ())


def test_stage_option_hints_become_set_hints_for_dcml_run():
    from dcml_app.console import as_set_hint

    assert as_set_hint("use --split-mode class-disjoint or arrange the classes") == \
        "use --set split_mode=class-disjoint or arrange the classes"
    assert as_set_hint("--views: the cache needs --activations-out DIR") == \
        "--set fast_views=...: the cache needs --activations-out DIR"  # not a pipeline parameter: left alone
    assert as_set_hint("--root /x: no such folder") == "--set data_root=/x: no such folder"
