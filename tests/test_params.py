"""One source of truth for parameters: the table reaches the pipeline, the components and the stage CLIs."""

import inspect
import typing

import click
import pytest
import yaml

import pipeline
from components.cluster import stage as cluster_stage
from components.dfml import stage as dfml_stage
from components.extract import stage as extract_stage
from components.finetune import stage as finetune_stage
from components.index import stage as index_stage
from components.ingest import stage as ingest_stage
from components.train import stage as train_stage
from dcml.contracts import params
from dcml.contracts.errors import DcmlError
from dcml_app import presets

STRUCTURES = [dict(mode="shared"), dict(mode="parallel", rounds=2), dict(method="dfml")]
KFP_TYPES = {"Integer": "NUMBER_INTEGER", "Float": "NUMBER_DOUBLE", "Boolean": "BOOLEAN", "String": "STRING"}


def compiled(tmp_path, **structure):
    from kfp import compiler

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline.build_pipeline(**structure), package_path=str(path))
    return yaml.safe_load(path.read_text())


def consumers(spec) -> dict[str, set[tuple[str, str]]]:
    """pipeline parameter -> {(component, its input name)} over the whole DAG, nested ones included."""
    out: dict[str, set] = {}

    def walk(dag, scope):
        for task in dag.get("tasks", {}).values():
            ref = task["componentRef"]["name"]
            for name, value in task.get("inputs", {}).get("parameters", {}).items():
                source = value.get("componentInputParameter")
                if source:
                    out.setdefault(scope.get(source, source), set()).add((ref, name))
            inner = spec["components"][ref].get("dag")
            if inner:  # a ParallelFor / If body: its inputs are named after the outer ones
                mapping = {name: scope.get(v.get("componentInputParameter"), v.get("componentInputParameter"))
                           for name, v in task.get("inputs", {}).get("parameters", {}).items()
                           if v.get("componentInputParameter")}
                walk(inner, mapping)

    walk(spec["root"]["dag"], {})
    return out


def test_pipeline_parameters_are_the_table_with_its_defaults(tmp_path):
    for structure in STRUCTURES:
        spec = compiled(tmp_path, **structure)
        inputs = spec["root"]["inputDefinitions"]["parameters"]
        assert set(inputs) == {p.name for p in params.pipeline_params()}, structure
        for p in params.pipeline_params():
            assert inputs[p.name]["parameterType"] == KFP_TYPES[p.kfp_type], p.name
            assert inputs[p.name].get("defaultValue", p.default) == p.default, p.name


def test_every_pipeline_parameter_reaches_a_stage_under_its_own_or_its_stage_name(tmp_path):
    reached: dict[str, set] = {}
    for structure in STRUCTURES:
        for name, uses in consumers(compiled(tmp_path, **structure)).items():
            reached.setdefault(name, set()).update(uses)
    missing = sorted(p.name for p in params.pipeline_params() if p.name not in reached)
    assert not missing, f"parameters no stage consumes: {missing}"
    for name, uses in reached.items():
        if name not in params.PARAMS:
            continue  # loop items and other task outputs
        for component, input_name in uses:
            stage = component.removeprefix("comp-").rsplit("-", 1)[0] if component[-1].isdigit() else component.removeprefix("comp-")
            expected = {name, params.STAGE_NAMES.get(stage, {}).get(name, name)}
            # ParallelFor / If bodies pass the value on under the same name.
            assert input_name in expected or input_name.startswith("pipelinechannel--"), (name, component, input_name)


@pytest.mark.parametrize("func", [f for f in pipeline._components("dcml", "t").values()])
def test_component_signatures_match_the_table(func):
    signature = inspect.signature(func.python_func)
    stage = func.name.replace("_", "-")
    back = {v: k for k, v in params.STAGE_NAMES.get(stage, {}).items()}
    checked = 0
    for name, parameter in signature.parameters.items():
        key = back.get(name, name)
        if key not in params.PARAMS or typing.get_origin(parameter.annotation) is not None:
            continue
        if not isinstance(parameter.annotation, type):
            continue  # artifacts (Input[...] / Output[...])
        assert parameter.annotation is params.PARAMS[key].type, (func.name, name)
        checked += 1
    assert checked or stage in ("track", "extract-with-model"), func.name


@pytest.mark.parametrize("module", [train_stage, finetune_stage, dfml_stage, extract_stage, cluster_stage,
                                    ingest_stage, index_stage])
def test_stage_options_take_their_defaults_from_the_table(module):
    rename = getattr(module, "RENAME", {})
    fixed = getattr(module, "FIXED_DEFAULTS", {})
    options = {o.name: o for o in module.cli.params if isinstance(o, click.Option)}
    for name in module.PARAMS:
        dest = rename.get(name, name)
        if options[dest].required:
            assert name == "dataset"  # ingest: --dataset has no default
            continue
        assert options[dest].default == fixed.get(name, params.PARAMS[name].default), (module.__name__, name)


def test_presets_and_defaults_pass_their_own_checks():
    for name, values in presets.PRESETS.items():
        params.validate(values, name)
    params.validate(params.defaults(), "defaults")


@pytest.mark.parametrize("values,fragment", [
    ({"epochs": -1}, "epochs=-1: out of range; use a value of at least 0"),
    ({"epochs": 1.5}, "epochs=1.5: expected a whole number"),
    ({"epochs": None}, "a value is required"),
    ({"lr_backbone": "nan"}, "finite"),
    ({"lr_backbone": float("inf")}, "finite"),
    ({"loss": "hinge"}, "use one of margin"),
    ({"val_fraction": 1.0}, "below 1"),
    ({"check_images": "maybe"}, "expected true or false"),
    ({"ks": "1,x"}, "comma-separated whole numbers"),
    ({"ks": "0"}, "each >= 1"),
    ({"experiment": " "}, "name the MLflow experiment"),
    ({"epoch": 3}, "unknown parameter(s) epoch"),
])
def test_bad_values_are_one_line_errors(values, fragment):
    with pytest.raises(DcmlError, match=None) as info:
        params.validate(values, "--set")
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith("--set")


def test_text_from_the_command_line_is_coerced():
    assert params.validate({"epochs": "6", "lr_backbone": "3e-4", "check_images": "yes", "freeze_bn": True},
                           "--set") == {"epochs": 6, "lr_backbone": 3e-4, "check_images": True, "freeze_bn": "true"}


def test_dcml_params_shows_what_a_run_of_a_preset_with_sets_would_use():
    """`dcml params --config P --set k=v`: every parameter's value as `dcml run` resolves it (default, preset,
    --set); a bad --set is the run's own one-line error."""
    import json

    from click.testing import CliRunner

    from dcml_app.params_cli import params_cli

    shown = CliRunner().invoke(params_cli, ["--config", "cars196", "--set", "epochs=7", "--format", "json"])
    assert shown.exit_code == 0, shown.output
    values = json.loads(shown.output)
    assert set(values) == {p.name for p in params.pipeline_params()}
    assert values["epochs"] == 7 and values["schedule"] == "cosine" and values["embedding_dim"] == 512
    assert values["eval_batch_size"] == params.defaults(["eval_batch_size"])["eval_batch_size"]
    table = CliRunner().invoke(params_cli, ["--config", "cars196", "head_init", "epochs"])
    assert table.exit_code == 0 and table.output.split() == ["epochs", "20", "head_init", "'whiten'"]
    bad = CliRunner().invoke(params_cli, ["--set", "epochs=-1"])
    assert bad.exit_code != 0 and "epochs" in str(bad.exception or bad.output)


def test_rules_between_parameters_see_the_preset_and_the_sets_together():
    """A --set is checked against the preset it changes, not against the defaults: the folder preset's top 5
    blocks make fast_views=1 fine, and train_blocks=-1 on the cars196 preset's cache is refused."""
    from dcml.contracts.errors import DcmlError
    from dcml_app.runner import resolve_arguments

    values = resolve_arguments("folder", ("data_root=/tmp", "fast_views=1"))
    assert values["fast_views"] == 1 and values["train_blocks"] == 5
    with pytest.raises(DcmlError, match=r"^--config cars196 with --set: fast_views=4 caches .* train_blocks=-1"):
        resolve_arguments("cars196", ("train_blocks=-1",))
    with pytest.raises(DcmlError, match=r"^--set: fast_views=1 caches"):
        resolve_arguments(None, ("fast_views=1",))
