"""The compiled Kubeflow YAML: structure and cluster settings (no cluster needed)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dcml_app.cli import cli

REPO = Path(__file__).resolve().parents[1]
GPU_EXECUTORS = ("extract", "train", "finetune", "evaluate", "compress", "index")


def compile_with_cli(tmp_path, *extra):
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(cli, ["compile", "--out", str(out), "--image-registry", "registry.example/ml",
                                      "--image-tag", "0123abcd", *extra])
    assert result.exit_code == 0, result.output
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def executors(spec):
    return spec["deploymentSpec"]["executors"]


def test_shared_mode_chains_the_six_stages(tmp_path):
    spec, _ = compile_with_cli(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("ingest", "extract", "cluster", "train-shared", "finetune", "evaluate", "track"):
        assert name in tasks, sorted(tasks)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps["extract"] == {"ingest"}
    assert deps["cluster"] == {"extract"}
    # Training and fine-tuning also take extract's fast-mode cache (empty when the mode is off).
    assert deps["train-shared"] == {"ingest", "cluster", "extract"}
    assert deps["finetune"] == {"ingest", "train-shared", "extract"}
    assert deps["evaluate"] == {"ingest", "finetune"}
    # The MLflow step is never cached; the stages are.
    assert tasks["track"]["cachingOptions"] == {}
    assert tasks["train-shared"]["cachingOptions"] == {"enableCache": True}


def test_parallel_mode_fans_out_and_in_with_unrolled_rounds(tmp_path):
    spec, _ = compile_with_cli(tmp_path, "--mode", "parallel", "--rounds", "2")
    tasks = spec["root"]["dag"]["tasks"]
    loops = [n for n, t in tasks.items() if "parameterIterator" in t]
    assert len(loops) == 2, "one ParallelFor per round"
    for loop in loops:
        iterator = tasks[loop]["parameterIterator"]["items"]["inputParameter"]
        assert "cluster" in iterator and "Output" in iterator
    merges = [n for n in tasks if n.startswith("merge-finetune")]
    assert len(merges) == 2
    # Round 2 clusters the merged model's features and starts workers from it.
    assert "extract-with-model" in tasks
    round2_worker = spec["components"][tasks[loops[1]]["componentRef"]["name"]]["dag"]["tasks"]["train-worker-2"]
    assert "init" in round2_worker["inputs"]["artifacts"]
    # Fan-in: the merge consumes the collected worker models.
    merge_inputs = spec["components"]["comp-merge-finetune"]["inputDefinitions"]["artifacts"]["checkpoints"]
    assert merge_inputs.get("isArtifactList") is True


def test_gpu_stages_request_gpus_cpu_and_memory(tmp_path):
    spec, _ = compile_with_cli(tmp_path, "--gpus", "2", "--gpu-memory", "24Gi", "--gpu-cpu", "6")
    for name, executor in executors(spec).items():
        resources = executor["container"].get("resources", {})
        if any(stage in name for stage in GPU_EXECUTORS):
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert resources["accelerator"]["resourceCount"] == "2", name
            assert resources["resourceMemoryRequest"] == "24Gi", name
            assert resources["resourceCpuRequest"] == "6", name
        else:
            assert "accelerator" not in resources, name
            assert resources["resourceMemoryRequest"] == "4Gi", name
            assert resources["resourceCpuRequest"] == "1", name


def test_shm_pvc_secret_tolerations_and_node_selector(tmp_path):
    _, k8s = compile_with_cli(tmp_path, "--data-pvc", "datasets", "--data-mount", "/datasets",
                              "--mlflow-secret", "mlflow-creds", "--shm-size", "4Gi",
                              "--toleration", "nvidia.com/gpu:NoSchedule",
                              "--toleration", "team=ml:NoExecute", "--node-selector", "accelerator=a100")
    assert k8s, "platform config missing"
    for name, cfg in k8s.items():
        assert {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "4Gi", "volumeName": "dshm"} in cfg["emptyDirMounts"]
        assert cfg["pvcMount"][0]["mountPath"] == "/datasets"
        assert cfg["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "datasets"
        if any(stage in name for stage in GPU_EXECUTORS):
            assert cfg["nodeSelector"]["labels"] == {"accelerator": "a100"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in cfg["tolerations"]
            assert {"key": "team", "operator": "Equal", "value": "ml", "effect": "NoExecute"} in cfg["tolerations"]
    track = [cfg for name, cfg in k8s.items() if name.startswith("exec-track")]
    assert track
    for cfg in track:
        env = {m["envVar"]: m["secretKey"] for m in cfg["secretAsEnv"][0]["keyToEnv"]}
        assert env["MLFLOW_TRACKING_URI"] == "tracking_uri"
        assert cfg["secretAsEnv"][0]["secretNameParameter"]["runtimeValue"]["constant"] == "mlflow-creds"


def test_images_are_pinned_per_stage(tmp_path):
    spec, _ = compile_with_cli(tmp_path)
    images = {name: e["container"]["image"] for name, e in executors(spec).items()}
    for name, image in images.items():
        assert image.startswith("registry.example/ml/dcml-"), image
        assert image.endswith(":0123abcd"), image
    assert images["exec-train-shared"] == "registry.example/ml/dcml-train:0123abcd"
    assert images["exec-ingest"] == "registry.example/ml/dcml-ingest:0123abcd"
    # Lightweight components that call the package: no pip install of kfp at run time.
    for executor in executors(spec).values():
        assert "pip install" not in " ".join(executor["container"]["command"])


def test_latest_tag_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["compile", "--out", str(tmp_path / "p.yaml"), "--image-tag", "latest"])
    assert result.exit_code != 0
    assert not (tmp_path / "p.yaml").exists()


def test_default_tag_is_the_git_commit(tmp_path):
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(cli, ["compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if not commit:
        pytest.skip("not a git checkout")
    assert f":{commit}" in out.read_text()


def test_dfml_method_replaces_the_divide_and_conquer_stages(tmp_path):
    spec, _ = compile_with_cli(tmp_path, "--method", "dfml")
    tasks = spec["root"]["dag"]["tasks"]
    assert "train-dfml" in tasks
    assert not {"cluster", "train-shared", "finetune"} & set(tasks)
    assert set(tasks["evaluate"]["dependentTasks"]) == {"ingest", "train-dfml"}


def test_compress_is_switched_by_a_parameter(tmp_path):
    spec, _ = compile_with_cli(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    condition = [t for t in tasks.values() if "compress_bits" in t.get("triggerPolicy", {}).get("condition", "")]
    assert len(condition) == 1
    branch = spec["components"][condition[0]["componentRef"]["name"]]["dag"]["tasks"]
    inputs = branch["compress"]["inputs"]["parameters"]
    assert inputs["finetune_steps"] == {"componentInputParameter": "pipelinechannel--compress_finetune_steps"}
    assert inputs["bits"] == {"componentInputParameter": "pipelinechannel--compress_bits"}
    assert spec["root"]["inputDefinitions"]["parameters"]["compress_finetune_steps"]["defaultValue"] == 0


def test_pipeline_module_importable_without_the_cli():
    # `python -c "import pipeline"` is how users build their own variants.
    result = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.MODES)"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_training_stages_keep_their_resume_files_on_the_data_volume(tmp_path):
    spec, platform = compile_with_cli(tmp_path, "--data-mount", "/data")
    env = {name: {e["name"]: e["value"] for e in ex["container"].get("env", [])}
           for name, ex in executors(spec).items()}
    assert env["exec-train-shared"]["DCML_RESUME_ROOT"] == "/data/.dcml/resume"
    assert env["exec-finetune"]["DCML_RESUME_ROOT"] == "/data/.dcml/resume"
    assert "DCML_RESUME_ROOT" not in env["exec-evaluate"]


def test_index_is_switched_by_a_parameter_and_tracked(tmp_path):
    spec, _ = compile_with_cli(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    condition = [t for t in tasks.values() if "index_gallery" in t.get("triggerPolicy", {}).get("condition", "")]
    assert len(condition) == 1
    branch = spec["components"][condition[0]["componentRef"]["name"]]["dag"]["tasks"]
    assert set(branch) == {"index", "track-3"}
    inputs = branch["index"]["inputs"]
    assert inputs["parameters"]["index_type"] == {"componentInputParameter": "pipelinechannel--index_type"}
    assert inputs["parameters"]["target_recall"] == {"componentInputParameter": "pipelinechannel--index_target_recall"}
    assert set(inputs["artifacts"]) == {"manifest", "model"}
    # The MLflow step logs the index's record (its metrics output) like an evaluation.
    track = branch["track-3"]["inputs"]["artifacts"]["metrics"]["taskOutputArtifact"]
    assert track == {"outputArtifactKey": "metrics", "producerTask": "index"}
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["index_gallery"]["defaultValue"] is False and defaults["index_type"]["defaultValue"] == "auto"


TRAINING_EXECUTORS = ("exec-train-shared", "exec-finetune", "exec-train-worker", "exec-merge-finetune",
                      "exec-train-dfml")
GPUS_CHANNEL = "{{$.inputs.parameters['pipelinechannel--gpus_per_task']}}"


def test_training_stages_request_gpus_per_task_gpus_and_run_that_many_processes(tmp_path):
    spec, _ = compile_with_cli(tmp_path)
    for name, executor in executors(spec).items():
        resources = executor["container"].get("resources", {})
        if name in TRAINING_EXECUTORS:
            assert resources["accelerator"]["resourceCount"] == GPUS_CHANNEL, name
        elif any(stage in name for stage in GPU_EXECUTORS):
            assert resources["accelerator"]["resourceCount"] == "1", name  # single-process GPU stages
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("train-shared", "finetune"):
        assert tasks[name]["inputs"]["parameters"]["gpus_per_task"] == {"componentInputParameter": "gpus_per_task"}
    assert spec["root"]["inputDefinitions"]["parameters"]["gpus_per_task"]["defaultValue"] == 1
    # One node: no TrainJob launcher, no workspace.
    assert not any("taskConfigPassthroughs" in c for c in spec["components"].values())
    assert "num_nodes" not in tasks["train-shared"]["inputs"]["parameters"]


def test_a_fixed_gpu_count_is_also_the_default_process_count(tmp_path):
    spec, _ = compile_with_cli(tmp_path, "--gpus", "4")
    assert spec["root"]["inputDefinitions"]["parameters"]["gpus_per_task"]["defaultValue"] == 4
    assert executors(spec)["exec-train-shared"]["container"]["resources"]["accelerator"]["resourceCount"] == "4"


def test_build_pipeline_bakes_given_values_into_the_defaults_and_refuses_unknown_names(tmp_path):
    import pipeline
    from dcml.contracts import params

    out = tmp_path / "p.yaml"
    values = params.validate({"epochs": "9", "loss": "multi_similarity", "gpus_per_task": "2"})
    pipeline.compile_pipeline(str(out), image_tag="t1", cluster=pipeline.ClusterSettings(gpus_per_task=4),
                              defaults=values)
    defaults = next(yaml.safe_load_all(out.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert defaults["epochs"]["defaultValue"] == 9 and defaults["loss"]["defaultValue"] == "multi_similarity"
    assert defaults["gpus_per_task"]["defaultValue"] == 2  # a value given wins over --gpus's default
    assert defaults["seed"]["defaultValue"] == params.PARAMS["seed"].default
    with pytest.raises(ValueError, match="not pipeline parameters: epoch"):
        pipeline.build_pipeline(image_tag="t1", defaults={"epoch": 3})


@pytest.mark.parametrize("mode", ["shared", "parallel", "dfml"])
def test_several_nodes_compile_the_training_stages_as_trainjob_launchers(tmp_path, mode):
    structure = ["--method", "dfml"] if mode == "dfml" else ["--mode", mode]
    spec, k8s = compile_with_cli(tmp_path, *structure, "--nodes", "2", "--trainjob-timeout", "7200",
                                 "--workspace-size", "500Gi", "--workspace-storage-class", "nfs-rwx",
                                 "--resume-dir", "/data/dcml-resume", "--toleration", "nvidia.com/gpu:NoSchedule",
                                 "--node-selector", "accelerator=a100", "--gpu-cpu", "32", "--gpu-memory", "256Gi")
    platform = yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text())
    config = list(platform)[1]["platforms"]["kubernetes"]["pipelineConfig"]
    assert config["workspace"] == {"size": "500Gi", "kubernetes": {"pvcSpecPatch": {
        "accessModes": ["ReadWriteMany"], "storageClassName": "nfs-rwx"}}}

    launchers = [n for n in spec["components"] if "taskConfigPassthroughs" in spec["components"][n]]
    expected = {"shared": {"comp-train-shared", "comp-finetune"}, "parallel": {"comp-train-worker", "comp-merge-finetune"},
                "dfml": {"comp-train-dfml"}}[mode]
    assert set(launchers) == expected
    for name in launchers:
        passthroughs = {p["field"]: p.get("applyToTask", False) for p in spec["components"][name]["taskConfigPassthroughs"]}
        # Resources, tolerations, node selector and affinity are the job's nodes', not the launcher pod's;
        # env and volumes (data PVC, workspace) go to both.
        assert passthroughs == {"RESOURCES": False, "KUBERNETES_TOLERATIONS": False, "KUBERNETES_NODE_SELECTOR": False,
                                "KUBERNETES_AFFINITY": False, "ENV": True, "KUBERNETES_VOLUMES": True}
        assert spec["components"][name]["inputDefinitions"]["parameters"]["task_config"]["parameterType"] == "TASK_CONFIG"

    def training_tasks(dag):
        for task in dag["tasks"].values():
            ref = task["componentRef"]["name"]
            if ref in expected:
                yield ref, task
            inner = spec["components"][ref].get("dag")
            if inner:
                yield from training_tasks(inner)

    found = dict(training_tasks(spec["root"]["dag"]))
    assert set(found) == expected
    for ref, task in found.items():
        inputs = task["inputs"]["parameters"]
        assert inputs["num_nodes"] == {"runtimeValue": {"constant": 2.0}}
        assert inputs["workspace_path"] == {"runtimeValue": {"constant": "{{$.workspace_path}}"}}
        image = "registry.example/ml/dcml-" + ("finetune" if "finetune" in ref else "train") + ":0123abcd"
        assert inputs["trainjob"]["runtimeValue"]["constant"] == {
            "runtime": "torch-distributed", "image": image, "timeout_s": 7200.0, "shm_size": "8Gi"}
        executor = executors(spec)["exec-" + ref.removeprefix("comp-")]
        resources = executor["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == GPUS_CHANNEL  # per node, through TaskConfig
        assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == ("32", "256Gi")
        assert {"name": "DCML_RESUME_ROOT", "value": "/data/dcml-resume"} in executor["container"]["env"]
        cfg = k8s["exec-" + ref.removeprefix("comp-")]
        assert cfg["nodeSelector"]["labels"] == {"accelerator": "a100"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in cfg["tolerations"]
        assert cfg["pvcMount"][0]["mountPath"] == "/data"
    # The other stages are unchanged: no pass-throughs, no workspace.
    assert "taskConfigPassthroughs" not in spec["components"]["comp-evaluate"]
    assert "workspace_path" not in spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]["parameters"]


def test_bad_scale_options_are_one_line_errors(tmp_path):
    for option, value, fragment in (("--nodes", "0", "--nodes 0"), ("--gpus", "0", "--gpus 0"),
                                    ("--trainjob-timeout", "0", "--trainjob-timeout 0")):
        result = CliRunner().invoke(cli, ["compile", "--out", str(tmp_path / "p.yaml"), "--image-tag", "t1",
                                          option, value])
        assert result.exit_code != 0 and fragment in str(result.exception or result.output), (option, result.output)
    assert not (tmp_path / "p.yaml").exists()
